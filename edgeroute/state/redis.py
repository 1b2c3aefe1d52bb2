"""Shared state in Redis: every change is one atomic Lua script, one EVALSHA per call
(the concurrent decides of a route: one call for the batch, see "decide batches" below).

This module speaks the state contract (what goes into each script call and what comes back,
by the names in `wire`); `pipeline` coalesces calls into pipelined batches on one redis-py
connection, `cluster` routes them by slot, `sentinel` finds the primary (every sentinel at
once), and `topology` turns the URL into servers (standalone, Cluster, Sentinel; TLS, ACLs).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from redis.crc import key_slot
from redis.exceptions import BusyLoadingError, MasterDownError, ReadOnlyError, ResponseError

from edgeroute.errors import StateUnavailable
from edgeroute.state import wire
from edgeroute.state.base import RouteSpec, StateHealth, StateView
from edgeroute.state.cluster import ClusterRouter
from edgeroute.state.memory import latency_us
from edgeroute.state.pipeline import FixedAddress, Pipeline, connection_factory
from edgeroute.state.resp import Arg, command, encode_args
from edgeroute.state.scripts import load_scripts
from edgeroute.state.sentinel import SentinelResolver
from edgeroute.state.topology import parse_state_url
from edgeroute.strategy import Candidate, RoutingDecision, RoutingStrategy
from edgeroute.types import (
    Admission,
    CircuitState,
    Outcome,
    OutcomeKind,
    RouteSnapshot,
    TargetSnapshot,
    TargetSpec,
)

# Reply layout, by name from the wire table (decoded positionally on the hot path).
_HEAD = len(wire.DECIDE_HEAD)
_ROW = len(wire.CANDIDATE_ROW)
_C = {name: i for i, name in enumerate(wire.CANDIDATE_ROW)}
_C_POSITION, _C_STATE, _C_SCORE = _C["position"], _C["state"], _C["score"]
_C_S, _C_LAT, _C_F = _C["successes"], _C["latency_us"], _C["failures"]
_C_INF, _C_HELD = _C["inflight"], _C["held"]
_C_EST, _C_ERR = _C["estimate_us"], _C["error_rate"]
_C_AGE, _C_EXPLORE, _C_WAIT = _C["estimate_age_ms"], _C["explore"], _C["waiting_ms"]
_C_CREDIT = _C["credit"]
_HALF_OPEN_CODE = wire.STATE_CODE[CircuitState.HALF_OPEN]
_H = {name: i for i, name in enumerate(wire.DECIDE_HEAD)}
_H_ADMITTED, _H_GENERATION, _H_PROBE = _H["admitted"], _H["generation"], _H["probe"]
_H_WAIT, _H_CURSOR, _H_COUNT = _H["wait_ms"], _H["rr_cursor"], _H["count"]
_H_ADMISSIBLE, _REPAIRED = _H["admissible"], _H["repaired"]
_H_NOW, _H_RESERVED, _H_QUOTA = _H["now_ms"], _H["reserved"], _H["quota_limited"]
_H_AFFINITY, _H_PIN_FROM = _H["affinity"], _H["pin_from"]
_RECORD_REPAIRED = wire.SCRIPT_REPLIES["record"].index("repaired")
_RESET_REPAIRED = wire.SCRIPT_REPLIES["reset"].index("repaired")

_CLOCK_REDIS = encode_args([0])  # the last ARGV when the scripts read Redis TIME

log = logging.getLogger("edgeroute.state")


@dataclass(frozen=True, slots=True)
class _RouteCommands:
    """A route's static EVALSHA prefixes, encoded once."""

    spec: RouteSpec
    decide: bytes
    decide_count: int
    record: bytes
    record_count: int
    reset: bytes
    reset_count: int
    slot: int


@dataclass(slots=True)
class _DecideBatch:
    """The decides of one route queued during one event-loop iteration: they leave as one
    script call (lua/decide.lua runs them in order) instead of one call each."""

    route: _RouteCommands
    requests: list[bytes]  # each request's ARGV (wire.DECIDE_REQUEST), encoded
    argc: int  # ARGV items across `requests`
    waiters: list[asyncio.Future[Any]]


@dataclass(frozen=True, slots=True)
class ScriptPrefix:
    """The static parts of one script call, encoded once: the head (EVALSHA, sha, keys,
    leading ARGV) and the constant ARGV that follow the per-call ones (before the clock)."""

    encoded: bytes
    count: int
    slot: int
    suffix: bytes = b""
    suffix_count: int = 0


def route_keys(prefix: str, route: str, group: str = "") -> tuple[str, str, str]:
    """A route's three keys. Routes sharing provider breakers share the tag of their
    `group` ('#' never appears in a route name), the route's name following it."""
    tag = f"{{{prefix}:{route}}}" if not group else f"{{{prefix}:#b:{group}}}:{route}"
    return f"{tag}:t", f"{tag}:w", f"{tag}:l"


def client_keys(prefix: str, name: str) -> tuple[str, str]:
    """A client's keys (wire.CLIENT_KEYS): its hash, and its leases under the same tag."""
    tag = f"{{{prefix}:client:{name}}}"
    return tag, f"{tag}:l"


def spec_keys(prefix: str, route: RouteSpec) -> list[str]:
    """Every key a route's scripts declare: its three, then the shared provider breakers'
    hash (breaker_scope provider), then its session pins (affinity); see lib.lua."""
    # Scope provider always takes a group tag (alone: its own name), so :p shares the slot.
    group = route.state_group or (route.name if route.breaker_scope == "provider" else "")
    keys = list(route_keys(prefix, route.name, group))
    if route.breaker_scope == "provider":
        keys.append(f"{{{prefix}:#b:{group}}}:p")
    if route.affinity is not None:
        keys.append(keys[0][:-2] + ":a")
    return keys


def route_params(route: RouteSpec) -> list[Arg]:
    """ARGV[1..] of every script, in wire.ROUTE_PARAMS order."""
    strategy, breaker, window = route.strategy, route.breaker, route.window
    estimator = route.estimator
    values: dict[str, Arg] = {
        "strategy": wire.STRATEGY_CODES[strategy.kind],
        "w_cost": repr(strategy.cost_weight),
        "w_latency": repr(strategy.latency_weight),
        "w_reliability": repr(strategy.reliability_weight),
        "failure_threshold": breaker.failure_threshold,
        "open_timeout_ms": breaker.open_timeout_ms,
        "success_threshold": breaker.success_threshold,
        "half_open_max_probes": breaker.half_open_max_probes,
        "max_open_timeout_ms": breaker.max_open_timeout_ms,
        "probe_ttl_ms": breaker.probe_ttl_ms,
        "bucket_ms": window.bucket_ms,
        "buckets": window.buckets,
        "lease_ttl_ms": route.lease_ttl_ms,
        "key_ttl_ms": route.key_ttl_ms,
        "max_cooldown_ms": route.max_cooldown_ms,
        "half_life_ms": estimator.half_life_ms,
        "explore_after_ms": estimator.explore_after_ms,
        "explore_max": estimator.explore_max,
        "explore_every": estimator.explore_every,
        "explore_ttl_ms": estimator.explore_ttl_ms,
        "load_penalty": repr(float(estimator.load_penalty)),
        "tolerance": repr(float(estimator.tolerance)),
        "within": wire.STRATEGY_CODES[strategy.within] if strategy.within else -1,
        "breaker_scope": 1 if route.breaker_scope == "provider" else 0,
        "affinity_ttl_ms": route.affinity.ttl_ms if route.affinity is not None else 0,
        "max_pins": route.affinity.max_pins if route.affinity is not None else 0,
    }
    return [values[name] for name in wire.ROUTE_PARAMS]


def outcome_args(outcome: Outcome, provider: str = "") -> list[Arg]:
    """One outcome, in wire.OUTCOME_FIELDS order; `provider`: RouteSpec.breaker_provider."""
    return [
        outcome.target_id,
        int(outcome.kind),
        latency_us(outcome.latency_ms),
        outcome.generation,
        outcome.token or "",
        1 if outcome.probe else 0,
        round(outcome.retry_after_s * 1000) if outcome.retry_after_s > 0 else 0,
        outcome.input_tokens,
        outcome.output_tokens,
        outcome.reserved_tokens,
        outcome.reserved_at_ms,
        round(outcome.limit_reset_s * 1000) if outcome.limit_reset_s > 0 else 0,
        provider,
    ]


class RedisState:
    """The fleet-wide state backend; see `edgeroute.state.topology` for the URL forms."""

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "edgeroute",
        timeout_ms: float = 50.0,
        cluster: bool = False,
        clock: Callable[[], float] | None = None,
        on_repair: Callable[[int], None] | None = None,
    ) -> None:
        """`clock` (seconds) replaces Redis TIME inside the scripts: for tests only, so a
        property test can step Lua and the reference model through the same instants."""
        self.url = url
        self._clock = clock
        self._on_repair = on_repair
        self.key_prefix = key_prefix
        self.timeout_s = timeout_ms / 1000.0
        self.target = parse_state_url(url, cluster=cluster)
        self._scripts = load_scripts()
        self._cluster: ClusterRouter | None = None
        self._pipeline: Pipeline | None = None
        self._sentinel: SentinelResolver | None = None
        target = self.target
        factory = connection_factory(target)
        if target.kind == "cluster":
            self._cluster = ClusterRouter(target, factory, self.timeout_s, self._scripts)
        elif target.kind == "sentinel":
            self._sentinel = SentinelResolver(target)
            self._pipeline = Pipeline(
                self._sentinel, factory, self.timeout_s, self._scripts, check_primary=True
            )
        else:
            self._pipeline = Pipeline(
                FixedAddress(target.nodes[0]), factory, self.timeout_s, self._scripts
            )
        self._routes: dict[str, _RouteCommands] = {}
        self._probe_routes: dict[int, RouteSpec] = {}
        self._token_prefix = os.urandom(4).hex() + "-"
        self._tokens = itertools.count(1)
        # Decides that failed on our side may still run on the server (a frozen Redis
        # thaws and executes what was in its socket buffer): their leases are released
        # by token once Redis answers again.
        self._orphans: deque[tuple[RouteSpec, str]] = deque(maxlen=10_000)
        self._reaper: asyncio.Task[None] | None = None
        self._batches: dict[str, _DecideBatch] = {}
        if self._pipeline is not None:
            # The pipeline's writer takes the queued decides along when it writes first.
            self._pipeline.before_write = self._send_decides

    @property
    def batches(self) -> int:
        """Round trips made so far (for benchmarks: decisions per round trip)."""
        if self._cluster is not None:
            return self._cluster.batches
        assert self._pipeline is not None
        return self._pipeline.batches

    def _commands(self, route: RouteSpec) -> _RouteCommands:
        cached = self._routes.get(route.name)
        if cached is not None and cached.spec is route:
            return cached
        keys = spec_keys(self.key_prefix, route)
        params = route_params(route)
        scripts = self._scripts

        def head(script: str) -> list[Arg]:
            return ["EVALSHA", scripts[script].sha, len(keys), *keys, *params]

        targets: list[Arg] = [len(route.targets)]
        for target in route.targets:
            targets += [
                target.id,
                repr(float(target.price_per_mtok)),
                target.priority,
                target.weight,
                route.breaker_provider(target.id),
            ]
        # Only targets with quotas are listed: a route without any costs one "0".
        quotas = [(position, t) for position, t in enumerate(route.targets, start=1) if t.has_quota]
        targets.append(len(quotas))
        for position, t in quotas:
            targets += [position, t.rpm, t.tpm, t.max_concurrency]
        decide, record, reset = head("decide") + targets, head("record"), head("reset")
        built = _RouteCommands(
            route,
            encode_args(decide),
            len(decide),
            encode_args(record),
            len(record),
            encode_args(reset),
            len(reset),
            key_slot(keys[0].encode()),
        )
        self._routes[route.name] = built
        return built

    def _clock_arg(self) -> int:
        """The scripts' last ARGV: 0 for Redis TIME, or the injected test clock in ms."""
        return 0 if self._clock is None else int(self._clock() * 1000)

    async def _call(self, cmd: bytes, slot: int = 0) -> Any:
        if self._cluster is not None:
            return await self._cluster.call(slot, cmd)
        assert self._pipeline is not None
        return self.checked(await self._pipeline.submit(cmd))

    def checked(self, reply: Any) -> Any:
        """A reply from the pipeline, or StateUnavailable for an error reply."""
        if isinstance(reply, ResponseError):
            if self._pipeline is not None and isinstance(
                reply, ReadOnlyError | MasterDownError | BusyLoadingError
            ):
                # A demoted primary (failover) or a restarting one: find the primary again.
                self._pipeline.drop_connection()
            code = getattr(reply, "status_code", None)
            raise StateUnavailable(f"redis refused the call: {f'{code} ' if code else ''}{reply}")
        return reply

    async def decide(
        self,
        route: RouteSpec,
        *,
        exclude: Collection[str] = (),
        outcome: Outcome | None = None,
        advance: bool = True,
        limit: int = 0,
        tokens: int = 0,
        session: str = "",
    ) -> RoutingDecision:
        static = self._commands(route)
        token = f"{self._token_prefix}{next(self._tokens):x}"
        mode = wire.MODE_ADVANCE if advance else wire.MODE_DECIDE
        request: list[Arg] = [mode, token, limit, tokens, session, len(exclude), *exclude]
        if outcome is None:
            request.append(0)
        else:
            request.append(1)
            request += outcome_args(outcome, route.breaker_provider(outcome.target_id))
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue_decide(static, encode_args(request), len(request), waiter)
        try:
            reply = await waiter
        except StateUnavailable:
            self._orphans.append((route, token))
            if self._reaper is None:
                self._reaper = asyncio.get_running_loop().create_task(self._reap())
            raise
        if reply[_REPAIRED]:
            self._repaired(route, reply[_REPAIRED])
        return _decision(route, reply, token)

    # ---- decide batches ----------------------------------------------------------------
    #
    # Concurrent decides of one route (a busy replica has dozens in flight) are queued for
    # the rest of the event-loop iteration and sent as one script call: the route's records
    # are read, parsed and written back once per batch instead of once per request, which
    # is most of a decide's Lua time. The requests run in arrival order, each seeing what
    # the ones before it changed, so a batch decides exactly as separate calls would.

    def _queue_decide(
        self, static: _RouteCommands, request: bytes, argc: int, waiter: asyncio.Future[Any]
    ) -> None:
        name = static.spec.name
        batch = self._batches.get(name)
        if batch is not None and batch.route is not static:
            self._send_batch(self._batches.pop(name))  # the route was reloaded meanwhile
            batch = None
        if batch is None:
            if not self._batches:
                # Sent at the latest on the next iteration, in order: no decide waits on
                # anything but its own timeout. The writer, woken now, runs right after.
                asyncio.get_running_loop().call_soon(self._send_decides)
                if self._pipeline is not None:
                    self._pipeline.kick()
            batch = self._batches[name] = _DecideBatch(static, [], 0, [])
        batch.requests.append(request)
        batch.argc += argc
        batch.waiters.append(waiter)

    def _send_decides(self) -> None:
        if not self._batches:
            return
        batches = list(self._batches.values())
        self._batches.clear()
        for batch in batches:
            self._send_batch(batch)

    def _send_batch(self, batch: _DecideBatch) -> None:
        static = batch.route
        size = encode_args([len(batch.waiters)])
        clock = _CLOCK_REDIS if self._clock is None else encode_args([self._clock_arg()])
        cmd = command(
            static.decide_count + 1 + batch.argc + 1, static.decide, size, *batch.requests, clock
        )
        sent: asyncio.Future[Any]
        if self._cluster is not None:
            sent = asyncio.ensure_future(self._cluster.call(static.slot, cmd))
        else:
            assert self._pipeline is not None
            sent = self._pipeline.submit(cmd)
        sent.add_done_callback(functools.partial(self._deliver, batch.waiters))

    def _deliver(self, waiters: list[asyncio.Future[Any]], sent: asyncio.Future[Any]) -> None:
        """Each request's reply to its waiter, or the batch's failure to every waiter."""
        error: BaseException | None
        if sent.cancelled():
            error = StateUnavailable("the decide batch was cancelled")
        else:
            error = sent.exception()
        replies: Any = None
        if error is None:
            try:
                replies = self.checked(sent.result())
            except StateUnavailable as exc:
                error = exc
        for j, waiter in enumerate(waiters):
            if waiter.done():
                continue  # its request gave up (cancelled): the lease expires by itself
            if error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(replies[j])

    def _repaired(self, route: RouteSpec, count: int) -> None:
        log.warning(
            "shared state of route %r held %d key(s) of the wrong type; replaced them",
            route.name,
            count,
        )
        if self._on_repair is not None:
            self._on_repair(count)

    async def explain(self, route: RouteSpec) -> StateView:
        static = self._commands(route)
        # Explain changes nothing and travels alone: a batch of one request.
        dynamic: list[Arg] = [1, wire.MODE_EXPLAIN, "", 0, 0, "", 0, 0, self._clock_arg()]
        replies = await self._call(
            command(static.decide_count + len(dynamic), static.decide, encode_args(dynamic)),
            static.slot,
        )
        reply = replies[0]
        decision = _decision(route, reply, "")
        head = wire.Row(wire.DECIDE_HEAD, reply[:_HEAD])
        start = _HEAD + head["count"] * _ROW
        targets = [
            TargetSnapshot(
                target_id=spec.id,
                state=wire.STATE_CODES[row["state"]],
                generation=row["generation"],
                consecutive_failures=row["consecutive_failures"],
                half_open_successes=row["half_open_successes"],
                open_remaining_ms=row["open_remaining_ms"],
                open_timeout_ms=row["open_timeout_ms"],
                cooldown_remaining_ms=row["cooldown_remaining_ms"],
                inflight=row["inflight"],
                probes_in_use=row["probes_in_use"],
                successes=row["successes"],
                failures=row["failures"],
                latency_sum_us=row["latency_us"],
                input_tokens=row["input_tokens"],
                output_tokens=row["output_tokens"],
                excluded=wire.EXCLUSION_REASONS[row["excluded"]],
                excluded_ms=row["excluded_ms"],
                estimate_us=_estimate(row["estimate_us"]),
                error_rate=float(row["error_rate"]),
                estimate_age_ms=None if row["estimate_age_ms"] < 0 else row["estimate_age_ms"],
                explorations_in_use=row["explorations_in_use"],
                stale=row["stale"] == 1,
                waiting_ms=row["waiting_ms"],
                current_weight=row["current_weight"],
            )
            for spec, row in zip(
                route.targets,
                wire.rows(reply, start, wire.TARGET_ROW, len(route.targets)),
                strict=True,
            )
        ]
        snapshot = RouteSnapshot(
            route.name, head["rr_cursor"], head["now_ms"], targets, head["pins"]
        )
        return StateView(decision, snapshot)

    async def snapshot(self, route: RouteSpec) -> RouteSnapshot:
        return (await self.explain(route)).snapshot

    async def _reap(self) -> None:
        """Release the leases of decides that failed here but may have run on the server."""
        delay = 0.02
        try:
            while self._orphans:
                await asyncio.sleep(delay)
                try:
                    await self.ping()
                except StateUnavailable:
                    delay = min(delay * 2, 2.0)
                    continue
                # Redis answers again: let what it still held from the dead connection run.
                await asyncio.sleep(0.05)
                batch = list(self._orphans)
                self._orphans.clear()
                releases = [
                    (
                        route,
                        Outcome(target_id="", kind=OutcomeKind.NEUTRAL, token=token, probe=True),
                    )
                    for route, token in batch
                ]
                try:
                    await self.record_many(releases)
                except StateUnavailable:
                    self._orphans.extendleft(reversed(batch))
        finally:
            self._reaper = None

    async def record(self, route: RouteSpec, outcome: Outcome) -> None:
        await self.record_many([(route, outcome)])

    async def record_many(self, items: Sequence[tuple[RouteSpec, Outcome]]) -> None:
        """One EVALSHA per route in `items`, all in the same pipelined batch."""
        by_route: dict[str, tuple[RouteSpec, list[Outcome]]] = {}
        for route, outcome in items:
            by_route.setdefault(route.name, (route, []))[1].append(outcome)
        calls = []
        routes = []
        for route, outcomes in by_route.values():
            routes.append(route)
            static = self._commands(route)
            dynamic: list[Arg] = [len(outcomes)]
            for outcome in outcomes:
                dynamic += outcome_args(outcome, route.breaker_provider(outcome.target_id))
            dynamic.append(self._clock_arg())
            cmd = command(static.record_count + len(dynamic), static.record, encode_args(dynamic))
            calls.append(self._call(cmd, static.slot))
        if len(calls) == 1:
            replies = [await calls[0]]
        elif calls:
            replies = await asyncio.gather(*calls)
        else:
            return
        for route, reply in zip(routes, replies, strict=True):
            if reply[_RECORD_REPAIRED]:
                self._repaired(route, reply[_RECORD_REPAIRED])

    def client_prefix(
        self, name: str, head: Sequence[Arg], suffix: Sequence[Arg] = ()
    ) -> ScriptPrefix:
        """The client script's call on the client's keys (client_keys): ARGV `head` first, the
        per-call ARGV (client_submit), then `suffix`, then the clock."""
        keys = client_keys(self.key_prefix, name)
        cmd: list[Arg] = ["EVALSHA", self._scripts["client"].sha, len(keys), *keys, *head]
        return ScriptPrefix(
            encode_args(cmd), len(cmd), key_slot(keys[0].encode()), encode_args(suffix), len(suffix)
        )

    def client_submit(self, prefix: ScriptPrefix, args: Sequence[Arg]) -> asyncio.Future[Any]:
        """Queue a client script call now, without a task: it leaves in the next pipelined
        write together with whatever else this loop iteration queues (the route's decide).
        `args`: the per-call ARGV between the prefix's head and suffix. The reply is raw:
        pass it through `checked`. (A cluster routes by slot in a task of its own, and
        checks the reply there.)"""
        clock = _CLOCK_REDIS if self._clock is None else encode_args([self._clock_arg()])
        cmd = command(
            prefix.count + len(args) + prefix.suffix_count + 1,
            prefix.encoded,
            encode_args(args),
            prefix.suffix,
            clock,
        )
        if self._cluster is not None:
            return asyncio.ensure_future(self._cluster.call(prefix.slot, cmd))
        assert self._pipeline is not None
        return self._pipeline.submit(cmd)

    async def client_call(self, name: str, args: Sequence[Arg]) -> list[Any]:
        """One call of the client script (lua/client.lua) on the client's keys;
        `args` in wire.SCRIPT_ARGS["client"] order without the clock."""
        keys = client_keys(self.key_prefix, name)
        cmd: list[Arg] = ["EVALSHA", self._scripts["client"].sha, len(keys), *keys, *args]
        cmd.append(self._clock_arg())
        reply: list[Any] = await self._call(
            command(len(cmd), encode_args(cmd)), key_slot(keys[0].encode())
        )
        return reply

    async def reset(self, route: RouteSpec, target_id: str) -> None:
        static = self._commands(route)
        dynamic: list[Arg] = [target_id, route.breaker_provider(target_id), self._clock_arg()]
        reply = await self._call(
            command(static.reset_count + len(dynamic), static.reset, encode_args(dynamic)),
            static.slot,
        )
        if reply[_RESET_REPAIRED]:
            self._repaired(route, reply[_RESET_REPAIRED])

    def health(self) -> StateHealth:
        return StateHealth("redis", "live")

    def shard_of(self, route: RouteSpec) -> int:
        """Which part of shared state serves `route`: its cluster slot, or 0 when one
        server (or one Sentinel-managed primary) holds everything."""
        return self._commands(route).slot if self.target.kind == "cluster" else 0

    async def probe(self, shard: int) -> None:
        """A real script call that writes, on the node serving `shard`: a decide and its
        release on a probe route of that slot. PING is not enough: a server out of memory
        answers PING and refuses every script that writes."""
        route = self._probe_routes.get(shard)
        if route is None:
            route = self._probe_routes[shard] = _probe_route(self.key_prefix, shard)
        decision = await self.decide(route, advance=False)
        if decision.admission is not None:
            await self.record(route, Outcome.for_admission(decision.admission, OutcomeKind.NEUTRAL))

    async def ping(self) -> None:
        """Raises StateUnavailable when Redis does not answer within the timeout."""
        reply = await self._call(command(1, encode_args(["PING"])))
        if reply != b"PONG":
            raise StateUnavailable(f"unexpected PING reply {reply!r}")

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        if self._cluster is not None:
            await self._cluster.close()
        if self._pipeline is not None:
            await self._pipeline.close()
        if self._sentinel is not None:
            await self._sentinel.close()


def _probe_route(prefix: str, slot: int) -> RouteSpec:
    """A one-target route whose keys hash to `slot` (found by trying names: a few thousand
    CRC16s, once per slot that ever degrades). Its keys expire by themselves."""
    name = "#probe"
    for i in itertools.count():
        name = f"#probe-{i}"
        if key_slot(route_keys(prefix, name)[0].encode()) == slot:
            break
    return RouteSpec(
        name=name,
        strategy=RoutingStrategy.cost_based(),
        targets=(TargetSpec("probe", "probe", "probe"),),
        lease_ttl_ms=10_000,
        idle_ttl_ms=60_000,
    )


def _estimate(value: bytes) -> float | None:
    estimate = float(value)
    return None if estimate < 0.0 else estimate


def _decision(route: RouteSpec, reply: list[Any], token: str) -> RoutingDecision:
    admitted, generation, probe = reply[_H_ADMITTED], reply[_H_GENERATION], reply[_H_PROBE]
    count = reply[_H_COUNT]
    targets = route.targets
    states = wire.STATE_CODES
    candidates = []
    for j in range(_HEAD, _HEAD + count * _ROW, _ROW):
        index = reply[j + _C_POSITION] - 1
        code = reply[j + _C_STATE]
        candidates.append(
            Candidate(
                targets[index],
                index,
                states[code],
                code == _HALF_OPEN_CODE,
                reply[j + _C_S],
                reply[j + _C_LAT],
                reply[j + _C_F],
                reply[j + _C_INF],
                float(reply[j + _C_SCORE]),
                reply[j + _C_HELD] == 1,
                float(reply[j + _C_EST]),
                float(reply[j + _C_ERR]),
                reply[j + _C_AGE],
                reply[j + _C_EXPLORE] == 1,
                reply[j + _C_WAIT],
                reply[j + _C_CREDIT],
            )
        )
    admission = None
    if admitted:
        admission = Admission(
            candidates[0].target.id,
            generation,
            token,
            probe == 1,
            reply[_H_RESERVED],
            reply[_H_NOW] if reply[_H_RESERVED] else 0,
        )
    return RoutingDecision(
        route.name,
        route.strategy,
        candidates,
        admission,
        reply[_H_WAIT] / 1000.0,
        reply[_H_CURSOR],
        reply[_H_ADMISSIBLE],
        reply[_H_QUOTA] == 1,
        wire.AFFINITY_STATES[reply[_H_AFFINITY]],
        targets[reply[_H_PIN_FROM] - 1].id if reply[_H_PIN_FROM] else "",
    )


__all__ = ["CircuitState", "RedisState", "route_keys"]
