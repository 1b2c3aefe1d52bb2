"""Client keys with limits (server.clients[]): who is calling, and whether they may, fleet-wide.

Each client has two keys of its own in Redis under one hash tag (state/redis.py
client_keys: its minute and spend, its in-flight leases), changed only by lua/client.lua:
admit (rpm, tpm, max_concurrency, budget) before the route's decide, settle (release the
in-flight lease, replace the token estimate with the real usage, add the spend) when the
request ends. `MemoryClients` is the reference model of the same rules (and what a
replica without Redis uses). The key itself never leaves this module: metrics, logs and
/admin/clients know a client by `name` only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import hmac
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edgeroute.config import Config
from edgeroute.errors import StateUnavailable
from edgeroute.replicas import Replicas
from edgeroute.state import wire
from edgeroute.state.redis import RedisState, ScriptPrefix
from edgeroute.state.resp import Arg

log = logging.getLogger("edgeroute.clients")

_BUCKET_MS, _SPAN = 1000, 61  # as lua/client.lua: no minute anywhere holds more than a limit
_CONCURRENCY_WAIT_MS = 1000
_DAY_MS = 86_400_000
_MAX_UNSETTLED = 10_000
# How many of Clients._rest an admit and a settle send per call (the rest is encoded once).
_ADMIT, _SETTLE = 2, 6


@dataclass(frozen=True, slots=True)
class ClientSpec:
    name: str
    digest: bytes  # sha256 of the key; the key itself is never kept
    rpm: int = 0
    tpm: int = 0
    max_concurrency: int = 0
    budget_micro: int = 0  # micro-USD per period; 0: no budget
    period: str = "day"
    routes: frozenset[str] = frozenset()  # empty: every route
    on_state_loss: str = "local_share"  # edgeroute/replicas.py

    def allows(self, route: str) -> bool:
        return not self.routes or route in self.routes

    @property
    def limited(self) -> bool:
        return bool(self.rpm or self.tpm or self.max_concurrency or self.budget_micro)


@dataclass(frozen=True, slots=True)
class Verdict:
    """A client's standing after admit/settle/read (wire.SCRIPT_REPLIES["client"])."""

    admitted: bool
    reason: str | None  # wire.CLIENT_REASONS
    wait_ms: int
    requests: int  # counted in the last minute
    tokens: int
    inflight: int
    spent_micro: int  # this budget period
    reset_requests_ms: int
    reset_tokens_ms: int
    period_end_ms: int
    reserved: int
    now_ms: int


_VERDICT_WIDTH = len(wire.SCRIPT_REPLIES["client"])
if tuple(f.name for f in dataclasses.fields(Verdict)) != tuple(wire.SCRIPT_REPLIES["client"]):
    raise ImportError("Verdict's fields must be lua/client.lua's REPLY (state/wire.py), in order")


@dataclass(frozen=True, slots=True)
class ClientLease:
    spec: ClientSpec
    token: str
    reserved: int
    reserved_at_ms: int


class Admitting:
    """An admit under way (Clients.begin_admit): its script call is already queued."""

    __slots__ = ("reply", "spec", "token", "tokens")

    def __init__(
        self, spec: ClientSpec, token: str, tokens: int, reply: asyncio.Future[Any] | None = None
    ) -> None:
        self.spec = spec
        self.token = token
        self.tokens = tokens
        self.reply = reply  # the Redis reply to come; None: counted in this process


@dataclass(frozen=True, slots=True)
class _Prefixes:
    """One client's static script arguments for admit and settle, encoded once."""

    spec: ClientSpec
    admit: ScriptPrefix
    settle: ScriptPrefix


def compile_clients(config: Config) -> list[ClientSpec]:
    specs = []
    for client in config.server.clients:
        key = client.key
        digest = (
            bytes.fromhex(key[7:])
            if key.startswith("sha256:")
            else hashlib.sha256(key.encode()).digest()
        )
        specs.append(
            ClientSpec(
                name=client.name,
                digest=digest,
                rpm=client.rpm or 0,
                tpm=client.tpm or 0,
                max_concurrency=client.max_concurrency or 0,
                budget_micro=round(client.budget.usd * 1_000_000) if client.budget else 0,
                period=client.budget.period if client.budget else "day",
                routes=frozenset(client.routes),
                on_state_loss=client.on_state_loss or config.state.on_state_loss,
            )
        )
    return specs


def identify(presented: str | None, clients: Sequence[ClientSpec]) -> ClientSpec | None:
    """The client whose key was presented; every key is compared (constant time)."""
    if presented is None:
        return None
    digest = hashlib.sha256(presented.encode()).digest()
    found = None
    for client in clients:
        if hmac.compare_digest(digest, client.digest):
            found = client
    return found


class _Record:
    __slots__ = ("leases", "period", "slots", "spent")

    def __init__(self) -> None:
        self.slots: list[list[int]] = []  # [bucket, requests, tokens], oldest first
        self.leases: dict[str, int] = {}
        self.spent = 0
        self.period = -1


def _period_start(day: int, period: str) -> int:
    if period == "day":
        return day
    date = time.gmtime(day * 86400)
    return day - (date.tm_mday - 1)


def _next_period_ms(now: int, period: str) -> int:
    today = now // _DAY_MS
    if period == "day":
        return (today + 1) * _DAY_MS
    start = _period_start(today, period)
    day = today + 1
    while _period_start(day, period) == start:
        day += 1
    return day * _DAY_MS


class MemoryClients:
    """The reference model of lua/client.lua (and one replica's limits without Redis)."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock or time.time
        self._records: dict[str, _Record] = {}

    def _load(self, spec: ClientSpec, now: int) -> _Record:
        record = self._records.setdefault(spec.name, _Record())
        oldest = now // _BUCKET_MS - _SPAN
        record.slots = [s for s in record.slots if s[0] > oldest]
        record.leases = {t: e for t, e in record.leases.items() if e > now}
        this_period = _period_start(now // _DAY_MS, spec.period)
        if record.period != this_period:
            record.period, record.spent = this_period, 0
        return record

    @staticmethod
    def _wait(slots: list[list[int]], now: int, column: int, over: int) -> int:
        freed = 0
        for slot in slots:
            freed += slot[column]
            if freed >= over:
                return (slot[0] + _SPAN) * _BUCKET_MS - now
        return _SPAN * _BUCKET_MS

    def _verdict(
        self,
        spec: ClientSpec,
        record: _Record,
        now: int,
        admitted: bool,
        reason: int,
        wait: int,
        reserve: int,
    ) -> Verdict:
        slots = record.slots
        reset = self._wait(slots, now, 1, 1) if slots else 0
        return Verdict(
            admitted,
            wire.CLIENT_REASONS[reason],
            max(0, wait),
            sum(s[1] for s in slots),
            sum(s[2] for s in slots),
            len(record.leases),
            record.spent,
            reset,
            reset,
            _next_period_ms(now, spec.period) - now,
            reserve,
            now,
        )

    def admit_now(self, spec: ClientSpec, token: str, tokens: int, lease_ttl_ms: int) -> Verdict:
        now = int(self._clock() * 1000)
        record = self._load(spec, now)
        slots = record.slots
        requests = sum(s[1] for s in slots)
        used = sum(s[2] for s in slots)
        reserve = min(max(tokens, 1), spec.tpm) if spec.tpm else 0
        if spec.budget_micro and record.spent >= spec.budget_micro:
            return self._verdict(
                spec, record, now, False, 4, _next_period_ms(now, spec.period) - now, 0
            )
        if spec.max_concurrency and len(record.leases) >= spec.max_concurrency:
            return self._verdict(spec, record, now, False, 3, _CONCURRENCY_WAIT_MS, 0)
        if spec.rpm and requests + 1 > spec.rpm:
            wait = self._wait(slots, now, 1, requests + 1 - spec.rpm)
            return self._verdict(spec, record, now, False, 1, wait, 0)
        if spec.tpm and used + reserve > spec.tpm:
            wait = self._wait(slots, now, 2, used + reserve - spec.tpm)
            return self._verdict(spec, record, now, False, 2, wait, 0)
        bucket = now // _BUCKET_MS
        if not slots or slots[-1][0] != bucket:
            slots.append([bucket, 0, 0])
        slots[-1][1] += 1
        slots[-1][2] += reserve
        if spec.max_concurrency:
            record.leases[token] = now + lease_ttl_ms
        return self._verdict(spec, record, now, True, 0, 0, reserve)

    def settle_now(self, lease: ClientLease, used: int, cost_micro: int) -> Verdict:
        now = int(self._clock() * 1000)
        spec = lease.spec
        record = self._load(spec, now)
        record.leases.pop(lease.token, None)
        if lease.reserved:
            delta = used - lease.reserved
            bucket = lease.reserved_at_ms // _BUCKET_MS
            slot = next((s for s in record.slots if s[0] == bucket), None)
            if slot is not None:
                slot[2] = max(0, slot[2] + delta)
            elif delta > 0:
                current = now // _BUCKET_MS
                if not record.slots or record.slots[-1][0] != current:
                    record.slots.append([current, 0, 0])
                record.slots[-1][2] += delta
        record.spent += cost_micro
        return self._verdict(spec, record, now, False, 0, 0, 0)

    def refuse_now(self, spec: ClientSpec) -> Verdict:
        """fail_closed without shared state: refused, ask again in a second."""
        now = int(self._clock() * 1000)
        return self._verdict(spec, self._load(spec, now), now, False, 5, 1000, 0)

    def read_now(self, spec: ClientSpec) -> Verdict:
        now = int(self._clock() * 1000)
        return self._verdict(spec, self._load(spec, now), now, False, 0, 0, 0)


class Clients:
    """The gateway's client limits: in Redis when the state is, else in this process.

    A refused or failed Redis call falls back to this replica's own counts (MemoryClients):
    the fleet-wide guarantee holds only while Redis answers (see docs/limits.md, on_state_loss). A
    settle Redis missed is replayed once it answers again (lease back, spend counted).
    """

    def __init__(
        self,
        redis: RedisState | None,
        *,
        lease_ttl_ms: int,
        clock: Callable[[], float] | None = None,
        replicas: Replicas | None = None,
    ) -> None:
        self.redis = redis
        self.replicas = replicas or Replicas()
        # Keyed by the spec itself: a reload that changes a client's limits shares the new ones.
        self._shares: dict[tuple[ClientSpec, int], ClientSpec] = {}
        self.local = MemoryClients(clock)
        self.lease_ttl_ms = lease_ttl_ms
        # A client key lives as long as its longest memory: a month's spend.
        self.key_ttl_ms = 32 * _DAY_MS
        self._prefix = os.urandom(4).hex() + "-c"
        self._tokens = itertools.count(1)
        self._prefixes: dict[str, _Prefixes] = {}
        # Settles Redis missed while away (bounded: the oldest go first, their leases expire).
        self._unsettled: deque[tuple[ClientLease, int, int]] = deque(maxlen=_MAX_UNSETTLED)
        self._replaying: asyncio.Task[None] | None = None

    # lua/client.lua's ARGV (wire.SCRIPT_ARGS["client"]) in two parts: what a client's
    # limits fix (encoded once per client and op) and what each call adds.

    @staticmethod
    def _head(op: str, spec: ClientSpec) -> list[Arg]:
        return [
            wire.CLIENT_OPS[op],
            spec.rpm,
            spec.tpm,
            spec.max_concurrency,
            spec.budget_micro,
            wire.CLIENT_PERIODS[spec.period],
        ]

    def _rest(
        self,
        token: str = "",
        tokens: int = 0,
        reserved: int = 0,
        reserved_at: int = 0,
        used: int = 0,
        cost: int = 0,
    ) -> list[Arg]:
        return [
            token,
            tokens,
            reserved,
            reserved_at,
            used,
            cost,
            self.lease_ttl_ms,
            self.key_ttl_ms,
        ]

    def _prefixes_of(self, redis: RedisState, spec: ClientSpec) -> _Prefixes:
        """Of `_rest`, an admit sends the first two per call (the others are constant), a
        settle the first six."""
        cached = self._prefixes.get(spec.name)
        if cached is None or cached.spec is not spec:  # a reload may change the limits
            constant = self._rest()
            cached = self._prefixes[spec.name] = _Prefixes(
                spec,
                redis.client_prefix(spec.name, self._head("admit", spec), constant[_ADMIT:]),
                redis.client_prefix(spec.name, self._head("settle", spec), constant[_SETTLE:]),
            )
        return cached

    @staticmethod
    def _decode(reply: list[int]) -> Verdict:
        # Positional: Verdict's fields are the reply's, in order (checked at import).
        return Verdict(reply[0] == 1, wire.CLIENT_REASONS[reply[1]], *reply[2:_VERDICT_WIDTH])

    async def admit(self, spec: ClientSpec, tokens: int) -> tuple[Verdict, ClientLease | None]:
        return await self.finish_admit(self.begin_admit(spec, tokens))

    def begin_admit(self, spec: ClientSpec, tokens: int) -> Admitting:
        """Queue the admit now (no task, no await): called just before the route's decide,
        both leave in the same pipelined write. Always follow with `finish_admit`."""
        token = f"{self._prefix}{next(self._tokens):x}"
        redis = self.redis
        if redis is None:
            return Admitting(spec, token, tokens)
        prefixes = self._prefixes_of(redis, spec)
        args = self._rest(token, tokens)[:_ADMIT]
        return Admitting(spec, token, tokens, redis.client_submit(prefixes.admit, args))

    async def finish_admit(self, admitting: Admitting) -> tuple[Verdict, ClientLease | None]:
        spec, token, tokens = admitting.spec, admitting.token, admitting.tokens
        verdict: Verdict | None = None
        if self.redis is not None and admitting.reply is not None:
            try:
                verdict = self._decode(self.redis.checked(await admitting.reply))
                self._replay_soon()
            except StateUnavailable as exc:
                log.warning("client limits of %r on local counts: %s", spec.name, exc)
                policy = spec.on_state_loss
                if policy == "fail_closed":
                    verdict = self.local.refuse_now(spec)
                else:
                    # fail_open: no limits; local_share: this replica's part of each.
                    spec = self._local_spec(spec, share=policy == "local_share")
        if verdict is None:
            verdict = self.local.admit_now(spec, token, tokens, self.lease_ttl_ms)
        if not verdict.admitted:
            return verdict, None
        return verdict, ClientLease(spec, token, verdict.reserved, verdict.now_ms)

    def _local_spec(self, spec: ClientSpec, *, share: bool) -> ClientSpec:
        """The limits this replica holds alone while Redis is away (counted under the same
        name, so the spend it settles locally is seen by the same local record)."""
        live = self.replicas.live if share else 0
        cached = self._shares.get((spec, live))
        if cached is not None:
            return cached

        def part(limit: int) -> int:
            return self.replicas.share(limit) if share and limit else 0

        local = dataclasses.replace(
            spec,
            rpm=part(spec.rpm),
            tpm=part(spec.tpm),
            max_concurrency=part(spec.max_concurrency),
            budget_micro=part(spec.budget_micro),
        )
        self._shares[(spec, live)] = local
        return local

    def _submit_settle(
        self, redis: RedisState, lease: ClientLease, used: int, cost: int
    ) -> asyncio.Future[Any]:
        prefix = self._prefixes_of(redis, lease.spec).settle
        rest = self._rest(lease.token, 0, lease.reserved, lease.reserved_at_ms, used, cost)
        return redis.client_submit(prefix, rest[:_SETTLE])

    async def settle(self, lease: ClientLease, used: int, cost_usd: float) -> None:
        cost = round(cost_usd * 1_000_000)
        if self.redis is not None:
            try:
                self.redis.checked(await self._submit_settle(self.redis, lease, used, cost))
                self._replay_soon()
                return
            except StateUnavailable as exc:
                self._kept_locally(lease, used, cost, exc)
        self.local.settle_now(lease, used, cost)

    def settle_soon(self, lease: ClientLease, used: int, cost_usd: float) -> None:
        """`settle` without waiting (the request path): the call is queued now, and a
        failure is settled locally when its reply comes, without a task per request."""
        cost = round(cost_usd * 1_000_000)
        if self.redis is None:
            self.local.settle_now(lease, used, cost)
            return
        reply = self._submit_settle(self.redis, lease, used, cost)
        reply.add_done_callback(functools.partial(self._settled, lease, used, cost))

    def _settled(
        self, lease: ClientLease, used: int, cost: int, reply: asyncio.Future[Any]
    ) -> None:
        if reply.cancelled():
            return
        try:
            assert self.redis is not None
            self.redis.checked(reply.result())
        except StateUnavailable as exc:
            self._kept_locally(lease, used, cost, exc)
            self.local.settle_now(lease, used, cost)
            return
        self._replay_soon()

    def _kept_locally(
        self, lease: ClientLease, used: int, cost: int, exc: StateUnavailable
    ) -> None:
        log.warning("client spend of %r kept locally: %s", lease.spec.name, exc)
        # Replayed once Redis answers again: else the lease would hold a concurrency slot
        # there until it expires, and the fleet's budget would never see the spend.
        self._unsettled.append((lease, used, cost))

    def _replay_soon(self) -> None:
        """Redis answered: send the settles it missed, off the request path (a task only
        while there are any)."""
        if self._unsettled and (self._replaying is None or self._replaying.done()):
            self._replaying = asyncio.get_running_loop().create_task(self._replay())

    async def _replay(self) -> None:
        while self._unsettled and self.redis is not None:
            lease, used, cost = self._unsettled.popleft()
            try:
                self.redis.checked(await self._submit_settle(self.redis, lease, used, cost))
            except StateUnavailable:
                self._unsettled.appendleft((lease, used, cost))
                return

    async def read(self, spec: ClientSpec) -> Verdict:
        if self.redis is not None:
            try:
                verdict = self._decode(
                    await self.redis.client_call(spec.name, self._head("read", spec) + self._rest())
                )
                self._replay_soon()
                return verdict
            except StateUnavailable:
                pass
        return self.local.read_now(spec)
