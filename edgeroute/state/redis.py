"""Shared state in Redis: every change is one atomic Lua script, one round trip per call.

Concurrent calls are coalesced: while one batch is on the wire, new calls queue, and the
next batch goes out as one pipelined write the moment the previous replies are in. Each
call is still exactly one EVALSHA (one Redis command per decide), but a busy gateway pays
one network round trip per batch instead of per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import ssl
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import hiredis

from edgeroute.errors import StateUnavailable
from edgeroute.state.base import RouteSpec
from edgeroute.state.memory import latency_us
from edgeroute.state.resp import Arg, Endpoint, RespConnection, command, encode_args
from edgeroute.state.scripts import Script, load_scripts
from edgeroute.strategy import STRATEGY_CODES, Candidate, RoutingDecision
from edgeroute.types import (
    STATE_CODES,
    Admission,
    CircuitState,
    Outcome,
    RouteSnapshot,
    TargetSnapshot,
)

_HALF_OPEN_CODE = 2
_DECIDE_HEAD = 6
_DECIDE_ROW = 8
_SNAPSHOT_ROW = 14


def endpoint_from_url(url: str) -> Endpoint:
    """`redis://[user:pass@]host:port/db` or `rediss://...?ssl_ca_certs=/path` (TLS)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"unsupported redis URL scheme {parts.scheme!r}")
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    context: ssl.SSLContext | None = None
    if parts.scheme == "rediss":
        context = ssl.create_default_context(cafile=query.get("ssl_ca_certs"))
        if query.get("ssl_certfile"):
            context.load_cert_chain(query["ssl_certfile"], query.get("ssl_keyfile"))
        if query.get("ssl_cert_reqs", "required") == "none":
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif query.get("ssl_check_hostname", "true").lower() in ("false", "0", "no"):
            context.check_hostname = False
    db_text = parts.path.lstrip("/") or query.get("db", "0")
    return Endpoint(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 6379,
        username=parts.username or None,
        password=parts.password,
        db=int(db_text),
        ssl_context=context,
        server_hostname=parts.hostname,
    )


class _Pipeline:
    """Coalesces concurrent commands into pipelined batches on one connection."""

    def __init__(self, endpoint: Endpoint, timeout_s: float, scripts: dict[str, Script]) -> None:
        self._endpoint = endpoint
        self._timeout = timeout_s
        self._scripts = scripts
        self._queue: list[tuple[bytes, asyncio.Future[Any], float]] = []
        self._runner: asyncio.Task[None] | None = None
        self._connection: RespConnection | None = None
        self.batches = 0

    def submit(self, cmd: bytes) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((cmd, future, loop.time()))
        if self._runner is None:
            self._runner = loop.create_task(self._run())
        return future

    async def _run(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._send(batch)
        finally:
            self._runner = None

    async def _send(self, batch: list[tuple[bytes, asyncio.Future[Any], float]]) -> None:
        # No call waits longer than the timeout from the moment it was queued.
        deadline = batch[0][2] + self._timeout
        self.batches += 1
        try:
            async with asyncio.timeout_at(deadline):
                if self._connection is None:
                    connection = await RespConnection.open(self._endpoint)
                    # Load up front: a fresh server (or a promoted replica) has no scripts.
                    await self._load_scripts(connection)
                    self._connection = connection
                replies = await self._connection.execute([cmd for cmd, _, _ in batch])
                missing = [i for i, r in enumerate(replies) if _is_noscript(r)]
                if missing:
                    # Redis restarted or failed over: load the scripts, replay what bounced.
                    await self._load_scripts(self._connection)
                    again = await self._connection.execute([batch[i][0] for i in missing])
                    for i, reply in zip(missing, again, strict=True):
                        replies[i] = reply
        except (TimeoutError, OSError, ConnectionError, hiredis.ProtocolError) as exc:
            self._drop_connection()
            error = StateUnavailable(f"redis did not answer: {type(exc).__name__}: {exc}".strip())
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(error)
            return
        except BaseException:
            self._drop_connection()
            for _, future, _ in batch:
                if not future.done():
                    future.cancel()
            raise
        for (_, future, _), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(StateUnavailable(f"redis refused the call: {reply}"))
            else:
                future.set_result(reply)

    async def _load_scripts(self, connection: RespConnection) -> None:
        replies = await connection.execute(
            [
                command(3, encode_args(["SCRIPT", "LOAD", script.source]))
                for script in self._scripts.values()
            ]
        )
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                raise ConnectionError(f"redis refused to load the edgeroute scripts: {reply}")

    def _drop_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner
        self._drop_connection()


def _is_noscript(reply: Any) -> bool:
    return isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT")


@dataclass(frozen=True, slots=True)
class _RouteCommands:
    """A route's static EVALSHA prefixes, encoded once."""

    spec: RouteSpec
    decide: bytes
    decide_count: int
    record: bytes
    record_count: int
    snapshot: bytes
    snapshot_count: int
    reset: bytes
    reset_count: int


def route_keys(prefix: str, route: str) -> tuple[str, str, str]:
    tag = f"{{{prefix}:{route}}}"
    return f"{tag}:t", f"{tag}:w", f"{tag}:l"


def _route_header(route: RouteSpec) -> list[Arg]:
    strategy, breaker, window = route.strategy, route.breaker, route.window
    # Keys must outlive any open breaker and the window, whatever idle_ttl says.
    idle = max(
        route.idle_ttl_ms, 2 * breaker.max_open_timeout_ms, 2 * window.bucket_ms * window.buckets
    )
    return [
        STRATEGY_CODES[strategy.kind],
        repr(strategy.cost_weight),
        repr(strategy.latency_weight),
        repr(strategy.reliability_weight),
        breaker.failure_threshold,
        breaker.open_timeout_ms,
        breaker.success_threshold,
        breaker.half_open_max_probes,
        breaker.max_open_timeout_ms,
        breaker.probe_ttl_ms,
        window.bucket_ms,
        window.buckets,
        route.lease_ttl_ms,
        idle,
    ]


def outcome_args(outcome: Outcome) -> list[Arg]:
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
    ]


class RedisState:
    """The fleet-wide state backend. `url` is `redis://` or `rediss://` (TLS)."""

    name = "redis"

    def __init__(
        self, url: str, *, key_prefix: str = "edgeroute", timeout_ms: float = 50.0
    ) -> None:
        self.url = url
        self.key_prefix = key_prefix
        self.timeout_s = timeout_ms / 1000.0
        self._scripts = load_scripts()
        self._pipeline = _Pipeline(endpoint_from_url(url), self.timeout_s, self._scripts)
        self._routes: dict[str, _RouteCommands] = {}
        self._token_prefix = os.urandom(4).hex() + "-"
        self._tokens = itertools.count(1)

    @property
    def batches(self) -> int:
        """Round trips made so far (for benchmarks: decisions per round trip)."""
        return self._pipeline.batches

    def _commands(self, route: RouteSpec) -> _RouteCommands:
        cached = self._routes.get(route.name)
        if cached is not None and cached.spec is route:
            return cached
        keys = route_keys(self.key_prefix, route.name)
        header = _route_header(route)
        scripts = self._scripts

        def head(script: str) -> list[Arg]:
            return ["EVALSHA", scripts[script].sha, 3, *keys, *header]

        targets: list[Arg] = [len(route.targets)]
        for target in route.targets:
            targets += [target.id, repr(float(target.price_per_mtok))]
        ids: list[Arg] = [len(route.targets), *(t.id for t in route.targets)]
        parts = {
            "decide": head("decide") + targets,
            "record": head("record"),
            "snapshot": head("snapshot") + ids,
            "reset": head("reset"),
        }
        built = _RouteCommands(
            route,
            encode_args(parts["decide"]),
            len(parts["decide"]),
            encode_args(parts["record"]),
            len(parts["record"]),
            encode_args(parts["snapshot"]),
            len(parts["snapshot"]),
            encode_args(parts["reset"]),
            len(parts["reset"]),
        )
        self._routes[route.name] = built
        return built

    async def _call(self, cmd: bytes) -> Any:
        return await self._pipeline.submit(cmd)

    async def decide(
        self,
        route: RouteSpec,
        *,
        exclude: Collection[str] = (),
        outcome: Outcome | None = None,
        advance: bool = True,
    ) -> RoutingDecision:
        static = self._commands(route)
        token = f"{self._token_prefix}{next(self._tokens):x}"
        dynamic: list[Arg] = [token, b"1" if advance else b"0", len(exclude), *exclude]
        if outcome is None:
            dynamic.append(b"0")
        else:
            dynamic.append(b"1")
            dynamic += outcome_args(outcome)
        reply = await self._call(
            command(static.decide_count + len(dynamic), static.decide, encode_args(dynamic))
        )
        return _decision(route, reply, token)

    async def record(self, route: RouteSpec, outcome: Outcome) -> None:
        await self.record_many([(route, outcome)])

    async def record_many(self, items: Sequence[tuple[RouteSpec, Outcome]]) -> None:
        """One EVALSHA per route in `items`, all in the same pipelined batch."""
        by_route: dict[str, tuple[RouteSpec, list[Outcome]]] = {}
        for route, outcome in items:
            by_route.setdefault(route.name, (route, []))[1].append(outcome)
        futures = []
        for route, outcomes in by_route.values():
            static = self._commands(route)
            dynamic: list[Arg] = [len(outcomes)]
            for outcome in outcomes:
                dynamic += outcome_args(outcome)
            cmd = command(static.record_count + len(dynamic), static.record, encode_args(dynamic))
            futures.append(self._pipeline.submit(cmd))
        if futures:
            await asyncio.gather(*futures)

    async def snapshot(self, route: RouteSpec) -> RouteSnapshot:
        static = self._commands(route)
        reply = await self._call(command(static.snapshot_count, static.snapshot))
        targets = []
        for i, spec in enumerate(route.targets):
            row = reply[2 + i * _SNAPSHOT_ROW : 2 + (i + 1) * _SNAPSHOT_ROW]
            targets.append(TargetSnapshot(spec.id, STATE_CODES[row[0]], *row[1:]))
        return RouteSnapshot(route.name, reply[0], reply[1], targets)

    async def reset(self, route: RouteSpec, target_id: str) -> None:
        static = self._commands(route)
        await self._call(command(static.reset_count + 1, static.reset, encode_args([target_id])))

    async def ping(self) -> None:
        """Raises StateUnavailable when Redis does not answer within the timeout."""
        reply = await self._call(command(1, encode_args(["PING"])))
        if reply != b"PONG":
            raise StateUnavailable(f"unexpected PING reply {reply!r}")

    async def close(self) -> None:
        await self._pipeline.close()


def _decision(route: RouteSpec, reply: list[Any], token: str) -> RoutingDecision:
    admitted, generation, probe, wait_ms, rr_cursor, count = reply[:_DECIDE_HEAD]
    targets = route.targets
    candidates = []
    end = _DECIDE_HEAD + count * _DECIDE_ROW
    for j in range(_DECIDE_HEAD, end, _DECIDE_ROW):
        index = reply[j] - 1
        code = reply[j + 1]
        candidates.append(
            Candidate(
                targets[index],
                index,
                STATE_CODES[code],
                code == _HALF_OPEN_CODE,
                reply[j + 3],
                reply[j + 4],
                reply[j + 5],
                reply[j + 6],
                float(reply[j + 2]),
                reply[j + 7] == 1,
            )
        )
    admission = None
    if admitted:
        admission = Admission(candidates[0].target.id, generation, token, probe == 1)
    return RoutingDecision(
        route.name, route.strategy, candidates, admission, wait_ms / 1000.0, rr_cursor
    )


__all__ = ["CircuitState", "RedisState", "endpoint_from_url", "route_keys"]
