#!/usr/bin/env python
"""How fast can edgeroute decide? MemoryState and RedisState side by side, in one run.

    python bench/decide.py [--quick] [--redis-url URL] [--json] [--loop auto|uvloop|asyncio]
    python bench/decide.py --profile redis-c64|memory-c1 [--profile-sort tottime|cumulative]

What one cell measures: `concurrency` asyncio tasks in this process, each awaiting
`state.decide(route)` in a closed loop. Every admitted decision's SUCCESS outcome is queued and
recorded through `state.record_many` by a background task in batches (the real gateway records
every attempt, off the request path). `decisions/s` counts the whole loop (decide plus the
recording it causes); p50/p99 are the latency of `await state.decide(route)` alone.

By default a private `redis-server` is spawned on a free port (so other users of the machine's
Redis neither disturb the numbers nor get disturbed); `--redis-url` uses an existing server
instead (keys get a unique prefix and are deleted afterwards; commandstats deltas then include
whatever else that server runs). See bench/README.md for what every figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import csv
import dataclasses
import datetime as dt
import io
import json
import os
import platform
import pstats
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import hiredis
import redis as redis_py
from _goals import Goals  # bench/ is on sys.path
from _processes import RedisServer  # bench/ is on sys.path; the tests' launcher
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.cluster import ClusterNode, NodesManager
from redis.asyncio.connection import Connection

from edgeroute.clients import Clients, ClientSpec
from edgeroute.errors import StateUnavailable
from edgeroute.state import wire
from edgeroute.state.base import RouteSpec, StateBackend
from edgeroute.state.cluster import SLOTS, slot_map
from edgeroute.state.memory import MemoryState
from edgeroute.state.pipeline import Pipeline
from edgeroute.state.redis import RedisState, route_keys
from edgeroute.state.resp import command, encode_args
from edgeroute.state.scripts import load_scripts
from edgeroute.state.topology import parse_state_url
from edgeroute.strategy import RoutingStrategy
from edgeroute.types import Outcome, OutcomeKind, TargetSpec, WindowParams

T = TypeVar("T")

TARGET_COUNTS = (2, 8, 32)
CONCURRENCIES = (1, 64)
# (strategy, targets) rows of the table: hybrid (the most expensive) at every size, plus
# round_robin at 8 targets.
CONFIGS: tuple[tuple[str, int], ...] = (
    *(("hybrid", n) for n in TARGET_COUNTS),
    ("round_robin", 8),
)
RECORD_BATCH = 64  # outcomes per record_many call made by the background recorder
YIELD_EVERY = 32  # MemoryState never suspends: workers yield to the loop every this many
MEMORY_TARGET_COUNTS = (8, 32)
MEMORY_BUCKETS = 12  # the default window's bucket count

GOAL_MEMORY_RATE = 100_000.0
GOAL_REDIS_RATE = 15_000.0
GOAL_REDIS_P50_MS = 0.3
GOAL_BYTES_PER_TARGET = 2048.0
# Target and client limits on: at most 25 % slower than off (decisions/s and Lua time).
GOAL_QUOTA_RATIO = 0.8  # 1 / 1.25
# Quotas that never bind: the cost of checking and counting them, not of refusing.
QUOTA_NEVER_BINDS = {"rpm": 10**9, "tpm": 10**12, "max_concurrency": 10**6}
# A client's admit+settle while it holds few or many requests in flight: the cost must not
# grow with the client's concurrency (lua/client.lua).
CLIENT_HELD = (1, 500)
GOAL_CLIENT_GROWTH = 1.5
CLIENT_WORKERS = 8

_PROVIDERS = ("openai", "azure", "anthropic", "bedrock")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    cell_s: float
    warmup_s: float
    accounting_decisions: int
    benchmark_requests: int
    memory_bucket_ms: int
    memory_samples_per_bucket: int
    full_window_decides: int  # decides timed while every window is full
    client_pairs: int  # admit+settle pairs timed per CLIENT_HELD level

    @classmethod
    def make(cls, quick: bool, duration: float | None) -> Settings:
        quick_settings = cls(0.15, 0.05, 512, 3_000, 25, 2, 64, 400)
        base = quick_settings if quick else cls(3.0, 0.4, 20_000, 100_000, 100, 16, 500, 5_000)
        if duration is None:
            return base
        return cls(
            duration,
            base.warmup_s,
            base.accounting_decisions,
            base.benchmark_requests,
            base.memory_bucket_ms,
            base.memory_samples_per_bucket,
            base.full_window_decides,
            base.client_pairs,
        )


# ---------------------------------------------------------------------------------------------
# Routes and outcomes
# ---------------------------------------------------------------------------------------------


def make_targets(n: int) -> tuple[TargetSpec, ...]:
    # Ids as long as real ones ("azure-gpt-4o-mini-03"): they are hash fields and lease members.
    return tuple(
        TargetSpec(
            id=f"{_PROVIDERS[i % len(_PROVIDERS)]}-model-{i:02d}",
            provider=_PROVIDERS[i % len(_PROVIDERS)],
            model=f"model-{i:02d}",
            price_per_mtok=round(0.5 + 0.37 * ((i * 7) % n), 2),
        )
        for i in range(n)
    )


def make_route(
    name: str,
    strategy: str,
    n: int,
    window: WindowParams | None = None,
    *,
    quotas: bool = False,
) -> RouteSpec:
    targets = make_targets(n)
    if quotas:
        q = QUOTA_NEVER_BINDS
        targets = tuple(
            dataclasses.replace(t, rpm=q["rpm"], tpm=q["tpm"], max_concurrency=q["max_concurrency"])
            for t in targets
        )
    return RouteSpec(
        name=name,
        strategy=RoutingStrategy.named(strategy),
        targets=targets,
        window=window or WindowParams(),
    )


class OutcomeMaker:
    """Cheap, deterministic, realistic-looking outcomes: latency depends on the target."""

    def __init__(self, route: RouteSpec) -> None:
        self._latency = {
            t.id: [150.0 + 40.0 * i + 13.0 * (k % 7) for k in range(16)]
            for i, t in enumerate(route.targets)
        }
        self._k = 0

    def success(self, decision_target: str, generation: int, token: str, probe: bool) -> Outcome:
        self._k += 1
        latency = self._latency[decision_target][self._k & 15]
        return Outcome(
            decision_target,
            OutcomeKind.SUCCESS,
            latency,
            generation,
            token,
            probe,
            0.0,
            800,
            250,
        )

    def sample(self, target_id: str, k: int) -> Outcome:
        """A standalone outcome (no lease): every 7th is a failure, never three in a row."""
        kind = OutcomeKind.FAILURE if k % 7 == 3 else OutcomeKind.SUCCESS
        latency = self._latency[target_id][k & 15] * (1.0 + (k % 5) * 0.5)
        return Outcome(target_id, kind, latency, -1, None, False, 0.0, 400 + 37 * k, 120 + 11 * k)


class Recorder:
    """Queues outcomes; a background task records them `batch` at a time with record_many."""

    def __init__(self, state: StateBackend, batch: int = RECORD_BATCH) -> None:
        self._state = state
        self._batch = batch
        self._pending: list[tuple[RouteSpec, Outcome]] = []
        self._task: asyncio.Task[None] | None = None
        self.calls = 0
        self.scripts = 0  # RedisState sends one EVALSHA per route per record_many call
        self.outcomes = 0

    def add(self, route: RouteSpec, outcome: Outcome) -> None:
        self._pending.append((route, outcome))
        if len(self._pending) >= self._batch and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while len(self._pending) >= self._batch:
                items, self._pending = self._pending, []
                await self._record(items)
        finally:
            self._task = None

    async def _record(self, items: list[tuple[RouteSpec, Outcome]]) -> None:
        self.calls += 1
        self.scripts += len({route.name for route, _ in items})
        self.outcomes += len(items)
        await self._state.record_many(items)

    async def drain(self) -> None:
        while self._task is not None:
            await self._task
        if self._pending:
            items, self._pending = self._pending, []
            await self._record(items)


# ---------------------------------------------------------------------------------------------
# The closed loop
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class LoopResult:
    decisions: int
    errors: int
    seconds: float
    latencies_ns: list[int]
    cpu_s: float


async def closed_loop(
    state: StateBackend,
    route: RouteSpec,
    concurrency: int,
    *,
    seconds: float | None = None,
    decisions: int | None = None,
    recorder: Recorder | None = None,
    gate: Callable[[], Coroutine[Any, Any, object]] | None = None,
) -> LoopResult:
    """`concurrency` tasks deciding until `seconds` pass or `decisions` were made in total.
    `gate` (the client-limit call) runs alongside each decide, as the gateway pipelines it."""
    maker = OutcomeMaker(route)
    stop = [False]
    budget = [decisions if decisions is not None else -1]
    errors = [0]
    latencies: list[list[int]] = [[] for _ in range(concurrency)]

    async def worker(lat: list[int]) -> None:
        decide = state.decide
        perf = time.perf_counter_ns
        append = lat.append
        success = maker.success
        add = recorder.add if recorder is not None else None
        i = 0
        while not stop[0]:
            if budget[0] == 0:
                return
            budget[0] -= 1
            t0 = perf()
            try:
                if gate is None:
                    decision = await decide(route)
                else:
                    decision, _ = await asyncio.gather(decide(route), gate())
            except StateUnavailable:
                errors[0] += 1
                await asyncio.sleep(0.001)
                continue
            append(perf() - t0)
            admission = decision.admission
            if add is not None and admission is not None:
                add(
                    route,
                    success(
                        admission.target_id, admission.generation, admission.token, admission.probe
                    ),
                )
            i += 1
            if i % YIELD_EVERY == 0:
                await asyncio.sleep(0)

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(worker(lat)) for lat in latencies]
    if seconds is not None:
        await asyncio.sleep(seconds)
        stop[0] = True
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    if recorder is not None:
        await recorder.drain()
    merged = [x for lat in latencies for x in lat]
    return LoopResult(len(merged), errors[0], elapsed, merged, cpu)


def percentile_ms(sorted_ns: Sequence[int], q: float) -> float:
    if not sorted_ns:
        return float("nan")
    index = min(len(sorted_ns) - 1, max(0, round(q * len(sorted_ns) + 0.5) - 1))
    return sorted_ns[index] / 1e6


# ---------------------------------------------------------------------------------------------
# Redis: a private server, and INFO deltas
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def spawned_redis() -> Iterator[str]:
    """A throw-away redis-server on a free port (the tests' launcher); yields its URL."""
    with RedisServer(name="bench-decide") as server:
        yield server.url


@dataclass(frozen=True, slots=True)
class ServerSample:
    commands: dict[str, tuple[int, int]]  # command -> (calls, usec)
    cpu_s: float


class ServerProbe:
    """INFO commandstats/cpu over a separate (synchronous) connection."""

    def __init__(self, url: str) -> None:
        self.client = redis_py.Redis.from_url(url, socket_timeout=10.0)

    def sample(self) -> ServerSample:
        stats = self.client.info("commandstats")
        commands = {
            key.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
            for key, v in stats.items()
            if isinstance(v, dict)
        }
        cpu = self.client.info("cpu")
        return ServerSample(commands, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]))

    @staticmethod
    def delta(a: ServerSample, b: ServerSample) -> tuple[dict[str, tuple[int, int]], float]:
        out = {}
        for name, (calls, usec) in b.commands.items():
            calls0, usec0 = a.commands.get(name, (0, 0))
            if calls != calls0:
                out[name] = (calls - calls0, usec - usec0)
        return out, b.cpu_s - a.cpu_s

    def close(self) -> None:
        self.client.close()


# ---------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Cell:
    backend: str
    strategy: str
    targets: int
    concurrency: int
    decisions: int
    errors: int
    seconds: float
    decisions_per_s: float
    p50_ms: float
    p99_ms: float
    outcomes_recorded: int
    client_cpu_us_per_decision: float
    # RedisState only (None for MemoryState)
    commands_per_decision: float | None = None
    record_scripts_per_decision: float | None = None
    round_trips_per_decision: float | None = None
    lua_us_per_decision: float | None = None
    redis_cpu_us_per_decision: float | None = None


async def run_cell(
    state: StateBackend,
    route: RouteSpec,
    concurrency: int,
    settings: Settings,
    probe: ServerProbe | None,
    *,
    label: str | None = None,
    gate: Callable[[], Coroutine[Any, Any, object]] | None = None,
) -> Cell:
    await closed_loop(
        state, route, concurrency, seconds=settings.warmup_s, recorder=Recorder(state), gate=gate
    )
    redis_state = state if isinstance(state, RedisState) else None
    before = probe.sample() if probe is not None else None
    batches0 = redis_state.batches if redis_state is not None else 0
    recorder = Recorder(state)
    result = await closed_loop(
        state, route, concurrency, seconds=settings.cell_s, recorder=recorder, gate=gate
    )
    latencies = sorted(result.latencies_ns)
    n = max(1, result.decisions)
    cell = Cell(
        backend=state.name,
        strategy=label or route.strategy.kind,
        targets=len(route.targets),
        concurrency=concurrency,
        decisions=result.decisions,
        errors=result.errors,
        seconds=round(result.seconds, 4),
        decisions_per_s=result.decisions / result.seconds,
        p50_ms=percentile_ms(latencies, 0.50),
        p99_ms=percentile_ms(latencies, 0.99),
        outcomes_recorded=recorder.outcomes,
        client_cpu_us_per_decision=result.cpu_s / n * 1e6,
    )
    if probe is not None and before is not None and redis_state is not None:
        commands, cpu = ServerProbe.delta(before, probe.sample())
        calls, usec = commands.get("evalsha", (0, 0))
        attempts = max(1, result.decisions + result.errors)
        cell.commands_per_decision = (calls - recorder.scripts) / attempts
        cell.record_scripts_per_decision = recorder.scripts / attempts
        cell.round_trips_per_decision = (redis_state.batches - batches0) / attempts
        cell.lua_us_per_decision = usec / attempts
        cell.redis_cpu_us_per_decision = cpu / attempts * 1e6
    return cell


# ---------------------------------------------------------------------------------------------
# Accounting: what exactly one decide and one recorded outcome cost Redis
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Accounting:
    decisions: int
    evalsha_calls: int
    commands_per_decision: float
    round_trips_per_decision: float
    lua_us_per_decide: float
    script_commands_per_decide: dict[str, float]
    outcomes: int
    record_calls: int
    lua_us_per_outcome: float
    script_commands_per_outcome: dict[str, float]


async def run_accounting(
    state: RedisState, probe: ServerProbe, settings: Settings, prefix: str
) -> Accounting:
    """Decide-only (no recording) at concurrency 64, then record every outcome in batches."""
    route = make_route(f"{prefix}-accounting", "hybrid", 8)
    await closed_loop(state, route, 8, decisions=256, recorder=Recorder(state))  # warm
    maker = OutcomeMaker(route)
    admissions: list[Outcome] = []

    count = settings.accounting_decisions
    before = probe.sample()
    batches0 = state.batches
    # A decide-only closed loop: exactly `count` decides, nothing else on this server.
    budget = [count]

    async def worker() -> None:
        while budget[0] > 0:
            budget[0] -= 1
            decision = await state.decide(route)
            a = decision.admission
            if a is not None:
                admissions.append(maker.success(a.target_id, a.generation, a.token, a.probe))

    await asyncio.gather(*(worker() for _ in range(64)))
    middle = probe.sample()
    batches1 = state.batches
    decide_cmds, _ = ServerProbe.delta(before, middle)
    calls, usec = decide_cmds.pop("evalsha", (0, 0))
    decide_cmds.pop("info", None)

    for start in range(0, len(admissions), RECORD_BATCH):
        chunk = admissions[start : start + RECORD_BATCH]
        await state.record_many([(route, outcome) for outcome in chunk])
    after = probe.sample()
    record_cmds, _ = ServerProbe.delta(middle, after)
    rcalls, rusec = record_cmds.pop("evalsha", (0, 0))
    record_cmds.pop("info", None)
    outcomes = max(1, len(admissions))
    return Accounting(
        decisions=count,
        evalsha_calls=calls,
        commands_per_decision=calls / count,
        round_trips_per_decision=(batches1 - batches0) / count,
        lua_us_per_decide=usec / count,
        script_commands_per_decide={k: v[0] / count for k, v in sorted(decide_cmds.items())},
        outcomes=len(admissions),
        record_calls=rcalls,
        lua_us_per_outcome=rusec / outcomes,
        script_commands_per_outcome={k: v[0] / outcomes for k, v in sorted(record_cmds.items())},
    )


# ---------------------------------------------------------------------------------------------
# A client's limits at low and high client concurrency
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class ClientCost:
    held: int  # the client's leases in flight (never settled) while the pairs are timed
    pairs: int
    lua_us_per_pair: float  # one admit + one settle (commandstats usec of both EVALSHAs)
    inflight: int  # what the script reported after the timed pairs


async def measure_client_cost(
    url: str, probe: ServerProbe, settings: Settings, prefix: str
) -> list[ClientCost]:
    """Lua time of a client's admit+settle while it holds `CLIENT_HELD` leases, its minute
    window full (one admit in each of the 61 one-second buckets first, on a stepped clock so
    that takes no real minute). Every limit is on and never binds."""
    now = [time.time()]
    state = RedisState(url, key_prefix=prefix, timeout_ms=5_000, clock=lambda: now[0])
    clients = Clients(state, lease_ttl_ms=3_600_000, clock=lambda: now[0])
    q = QUOTA_NEVER_BINDS
    figures = []
    try:
        for held in CLIENT_HELD:
            now[0] += 3600.0  # the previous level's leases expire: each level starts clean
            team = ClientSpec(
                f"held-{held}",
                b"",
                rpm=q["rpm"],
                tpm=q["tpm"],
                max_concurrency=q["max_concurrency"],
            )
            for _ in range(61):
                await _client_pair(clients, team)
                now[0] += 1.0
            await asyncio.gather(*(clients.admit(team, 100) for _ in range(held)))
            before = probe.sample()
            await _client_pairs(clients, team, settings.client_pairs)
            commands, _ = ServerProbe.delta(before, probe.sample())
            _, usec = commands.get("evalsha", (0, 0))
            inflight = (await clients.read(team)).inflight
            figures.append(
                ClientCost(held, settings.client_pairs, usec / settings.client_pairs, inflight)
            )
    finally:
        await state.close()
    return figures


async def _client_pair(clients: Clients, team: ClientSpec) -> None:
    _, lease = await clients.admit(team, 100)
    assert lease is not None
    await clients.settle(lease, 90, 0.000_01)


async def _client_pairs(clients: Clients, team: ClientSpec, count: int) -> None:
    """`count` admit+settle pairs by CLIENT_WORKERS tasks in closed loops."""
    left = [count]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            await _client_pair(clients, team)

    await asyncio.gather(*(worker() for _ in range(CLIENT_WORKERS)))


# ---------------------------------------------------------------------------------------------
# Memory per target
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class MemoryFigure:
    targets: int
    bytes_total: int
    bytes_per_target: float
    buckets_filled: int
    leases: int
    # Lua time of one decide while every target's window holds all buckets (steady state).
    full_window_lua_us_per_decide: float = 0.0
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)


async def measure_memory(
    state: RedisState, probe: ServerProbe, n: int, settings: Settings, prefix: str
) -> MemoryFigure:
    """Fill every bucket of a 12-bucket window for each target, hold leases, sum MEMORY USAGE.

    The default window is 12 x 5 s; filling it would take a minute, so this route uses
    12 x `memory_bucket_ms` buckets (same shape; its bucket numbers have two more digits).
    Then, with every window still full, time decides: what a decide costs in steady state.
    """
    window = WindowParams(bucket_ms=settings.memory_bucket_ms, buckets=MEMORY_BUCKETS)
    route = make_route(f"{prefix}-memory-{n}", "hybrid", n, window)
    maker = OutcomeMaker(route)
    k = 0
    first_bucket = None
    while True:
        bucket = time.time_ns() // 1_000_000 // window.bucket_ms
        if first_bucket is None:
            first_bucket = bucket
        items = []
        for target in route.targets:
            for _ in range(settings.memory_samples_per_bucket):
                k += 1
                items.append((route, maker.sample(target.id, k)))
        # Real traffic too: decides reported at once (take and release leases).
        decisions = await asyncio.gather(
            state.record_many(items), *(state.decide(route) for _ in range(n))
        )
        admitted = [d.admission for d in decisions[1:] if d is not None and d.admission]
        await state.record_many(
            [(route, maker.success(a.target_id, a.generation, a.token, a.probe)) for a in admitted]
        )
        if bucket - first_bucket >= MEMORY_BUCKETS - 1:
            break
        # Sleep into the next bucket (Redis TIME and ours agree closely on one machine).
        now_ms = time.time_ns() / 1e6
        await asyncio.sleep(max(0.0, ((bucket + 1) * window.bucket_ms - now_ms) / 1000 + 0.002))
    # Leases in flight: two per target, never reported.
    for _ in range(2 * n):
        await state.decide(route)

    client = probe.client
    keys = route_keys(state.key_prefix, route.name)
    figure = MemoryFigure(n, 0, 0.0, 0, 0)
    for key in keys:
        usage = client.memory_usage(key, samples=0) or 0
        encoding = client.object("encoding", key)
        figure.keys[key] = {
            "bytes": int(usage),
            "encoding": encoding.decode() if isinstance(encoding, bytes) else encoding,
        }
        figure.bytes_total += int(usage)
    figure.bytes_per_target = figure.bytes_total / n
    # Lease members hold '|'; the '#' placeholder keeps the set alive (lua/lib.lua).
    figure.leases = sum(1 for m in client.zrange(keys[2], 0, -1) if b"|" in m)
    fields = [
        bytes(v) if isinstance(v, bytes) else v.encode()
        for k, v in client.hgetall(keys[1]).items()
        if k != b"#"
    ]
    figure.buckets_filled = min((v.count(b";") + 1 for v in fields), default=0)
    if len(fields) < n:
        figure.buckets_filled = 0

    # Every window still holds all its buckets (decide never trims them): decide-only timing.
    before = probe.sample()
    budget = [settings.full_window_decides]

    async def decider() -> None:
        while budget[0] > 0:
            budget[0] -= 1
            await state.decide(route)

    await asyncio.gather(*(decider() for _ in range(16)))
    commands, _ = ServerProbe.delta(before, probe.sample())
    calls, usec = commands.get("evalsha", (0, 0))
    figure.full_window_lua_us_per_decide = usec / max(1, calls)
    return figure


# ---------------------------------------------------------------------------------------------
# The ceiling: redis-benchmark running the very same EVALSHA
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Ceiling:
    requests: int
    clients: int
    pipeline: int
    rps: float
    p50_ms: float | None
    args: list[str]
    redis_state_c64_rate: float
    ratio: float
    note: str = ""


async def capture_decide_args(state: RedisState, route: RouteSpec) -> list[str]:
    """The exact EVALSHA argument list RedisState sends for one decide of `route`."""
    sent: list[bytes] = []
    original = Pipeline.submit

    def spy(self: Pipeline, cmd: bytes, *, asking: bool = False) -> asyncio.Future[Any]:
        sent.append(cmd)
        return original(self, cmd, asking=asking)

    sha = load_scripts()["decide"].sha.encode()
    Pipeline.submit = spy  # type: ignore[method-assign]
    try:
        await state.decide(route)
    finally:
        Pipeline.submit = original  # type: ignore[method-assign]
    for data in sent:
        reader = hiredis.Reader()
        reader.feed(data)
        while (args := reader.gets()) is not False:
            if isinstance(args, list) and args[:2] == [b"EVALSHA", sha]:
                return [a.decode() for a in args]
    raise RuntimeError("could not capture the decide EVALSHA sent by RedisState")


def run_redis_benchmark(
    url: str, args: list[str], requests: int, clients: int = 64, pipeline: int = 16
) -> tuple[float, float | None]:
    binary = shutil.which("redis-benchmark") or shutil.which("valkey-benchmark")
    if binary is None:
        raise FileNotFoundError("redis-benchmark")
    target = parse_state_url(url)
    host, port = target.nodes[0]
    cmd = [
        binary,
        "-h",
        host,
        "-p",
        str(port),
        "-n",
        str(requests),
        "-c",
        str(clients),
        "-P",
        str(pipeline),
        "--csv",
    ]
    if target.db:
        cmd += ["--dbnum", str(target.db)]
    if target.username:
        cmd += ["--user", target.username]
    env = dict(os.environ)
    if target.password is not None:
        env["REDISCLI_AUTH"] = target.password
    out = subprocess.run(
        [*cmd, *args], capture_output=True, text=True, check=True, timeout=300, env=env
    ).stdout
    rows = list(csv.reader(io.StringIO(out)))
    header = next((r for r in rows if r and r[0] == "test"), None)
    data = [r for r in rows if r and r[0] != "test"]
    if not data:
        raise RuntimeError(f"unexpected redis-benchmark output: {out!r}")
    row = data[-1]
    rps = float(row[1])
    p50 = None
    if header is not None and "p50_latency_ms" in header:
        p50 = float(row[header.index("p50_latency_ms")])
    return rps, p50


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    cells = {
        (c["backend"], c["strategy"], c["targets"], c["concurrency"]): c for c in report["cells"]
    }
    table = Goals()
    add = table.add

    mem = cells.get(("memory", "hybrid", 8, 1))
    add(
        "MemoryState decisions/s, 8 targets, c=1",
        mem and mem["decisions_per_s"],
        GOAL_MEMORY_RATE,
        "/s",
        True,
    )
    red64 = cells.get(("redis", "hybrid", 8, 64))
    add(
        "RedisState decisions/s, 8 targets, c=64",
        red64 and red64["decisions_per_s"],
        GOAL_REDIS_RATE,
        "/s",
        True,
    )
    red1 = cells.get(("redis", "hybrid", 8, 1))
    add(
        "RedisState decide p50, 8 targets, c=1",
        red1 and red1["p50_ms"],
        GOAL_REDIS_P50_MS,
        "ms",
        False,
    )
    for figure in report.get("memory") or []:
        add(
            f"Redis memory per target, {figure['targets']} targets",
            figure["bytes_per_target"],
            GOAL_BYTES_PER_TARGET,
            "B",
            False,
        )
    for label in ("hybrid+quota", "hybrid+q+client"):
        on = cells.get(("redis", label, 8, 64))
        add(
            f"{label} / off decisions/s, 8 tgts, c=64",
            on and red64 and on["decisions_per_s"] / red64["decisions_per_s"],
            GOAL_QUOTA_RATIO,
            "x",
            True,
        )
        on1 = cells.get(("redis", label, 8, 1))
        add(
            f"off / {label} Lua us, 8 tgts, c=1",
            on1
            and red1
            and on1["lua_us_per_decision"]
            and red1["lua_us_per_decision"]
            and red1["lua_us_per_decision"] / on1["lua_us_per_decision"],
            GOAL_QUOTA_RATIO,
            "x",
            True,
        )
    costs = {c["held"]: c["lua_us_per_pair"] for c in report.get("client_cost") or []}
    low, high = (costs.get(held) for held in (CLIENT_HELD[0], CLIENT_HELD[-1]))
    add(
        f"client Lua us, {CLIENT_HELD[-1]} / {CLIENT_HELD[0]} leases held",
        low and high and high / low,
        GOAL_CLIENT_GROWTH,
        "x",
        False,
    )
    accounting = report.get("accounting")
    if accounting:
        value = accounting["commands_per_decision"]
        table.rows.append(
            {
                # Concurrent decides of a route share one call: at most one each.
                "name": "Redis commands per decide (EVALSHA only), c=64",
                "value": value,
                "goal": 1.0,
                "unit": "",
                "comparison": "<=",
                "status": "PASS" if 0 < value <= 1.0 else "MISS",
            }
        )
    return table.rows


def render(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        f"edgeroute decide benchmark  {meta['date']}",
        f"machine: {meta['cpus']} CPUs, {meta['platform']}; Python {meta['python']}; "
        f"event loop: {meta['loop']}; Redis {meta['redis_version']} ({meta['redis']})",
        "",
        "What is measured: N asyncio tasks in one process, each awaiting state.decide(route) in",
        "a closed loop (strategy hybrid, the most expensive, unless noted). Every admitted",
        "decision's SUCCESS outcome is recorded by a background task via state.record_many in",
        f"batches of {RECORD_BATCH}. decisions/s = decisions / wall time of the whole loop",
        "(decide + the recording it causes); p50/p99 = latency of `await state.decide()` alone.",
        f"{meta['cell_s']:g} s per cell after {meta['warmup_s']:g} s warm-up. RedisState columns:",
        "cmd/dec = EVALSHA calls by decide / decisions (INFO commandstats delta minus the",
        "recorder's own EVALSHAs); rt/dec = RedisState.batches delta / decisions (round trips,",
        "recorder batches included); lua us = EVALSHA usec per decision (decide + record share);",
        "srv cpu us = redis-server CPU per decision; cli cpu us = this process's CPU per decision.",
        "",
        f"{'backend':<8}{'strategy':<12}{'tgts':>4}{'conc':>5}{'decisions/s':>13}"
        f"{'p50 ms':>9}{'p99 ms':>9}{'cmd/dec':>8}{'rt/dec':>8}{'lua us':>8}"
        f"{'srv cpu us':>11}{'cli cpu us':>11}{'errors':>7}",
    ]
    for c in report["cells"]:
        lines.append(
            f"{c['backend']:<8}{c['strategy']:<12}{c['targets']:>4}{c['concurrency']:>5}"
            f"{c['decisions_per_s']:>13,.0f}{c['p50_ms']:>9.3f}{c['p99_ms']:>9.3f}"
            f"{_fmt(c['commands_per_decision'], '.2f'):>8}"
            f"{_fmt(c['round_trips_per_decision'], '.3f'):>8}"
            f"{_fmt(c['lua_us_per_decision'], '.1f'):>8}"
            f"{_fmt(c['redis_cpu_us_per_decision'], '.1f'):>11}"
            f"{c['client_cpu_us_per_decision']:>11.1f}{c['errors']:>7}"
        )
    transport = report.get("transport")
    if transport:
        lines += [
            "",
            "Transport: the same decide EVALSHA (8-target hybrid, captured from the wire and "
            "replayed unchanged),",
            "decide only, through edgeroute's pipeline and through redis-py's own client:",
            f"  {'transport':<44}{'conc':>5}{'calls/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
            f"{'cli cpu us':>11}{'rt/call':>8}",
        ]
        for row in transport["rows"]:
            lines.append(
                f"  {row['transport']:<44}{row['concurrency']:>5}{row['calls_per_s']:>10,.0f}"
                f"{row['p50_ms']:>9.3f}{row['p99_ms']:>9.3f}"
                f"{row['client_cpu_us_per_call']:>11.1f}"
                f"{_fmt(row['round_trips_per_call'], '.3f'):>8}"
            )
        lines.append("  encoding one decide EVALSHA (no I/O):")
        for enc in transport["encoding"]:
            lines.append(f"    {enc['encoder']:<72}{enc['ns_per_call'] / 1000:>7.2f} us")
        lines.append("  cluster slot map from one CLUSTER SLOTS reply (3 primaries; no I/O):")
        for enc in transport.get("slot_map") or []:
            lines.append(f"    {enc['encoder']:<72}{enc['ns_per_call'] / 1e6:>7.2f} ms")
    acc = report.get("accounting")
    if acc:
        lines += [
            "",
            f"Redis accounting (decide-only loop, hybrid, 8 targets, c=64, {acc['decisions']} "
            "decides, nothing else on the server):",
            f"  Redis commands per decision: {acc['commands_per_decision']:.2f} "
            f"(EVALSHA calls {acc['evalsha_calls']} / decisions {acc['decisions']})",
            f"  round trips per decision:    {acc['round_trips_per_decision']:.3f}",
            f"  Lua time per decide:         {acc['lua_us_per_decide']:.1f} us (commandstats usec;"
            f" {acc['decisions'] / max(1, acc['evalsha_calls']):.1f} decides per script call)",
            "  commands run inside decide:  "
            + ", ".join(f"{k} {v:.2f}" for k, v in acc["script_commands_per_decide"].items()),
            f"  record: {acc['outcomes']} outcomes in {acc['record_calls']} EVALSHAs "
            f"({RECORD_BATCH} per call): Lua {acc['lua_us_per_outcome']:.1f} us per outcome",
            "  commands run inside record, per outcome: "
            + ", ".join(f"{k} {v:.2f}" for k, v in acc["script_commands_per_outcome"].items()),
        ]
    if report.get("memory"):
        lines += [
            "",
            "Redis memory per target (hybrid route; window samples in all "
            f"{MEMORY_BUCKETS} buckets, 2 leases in flight per target; "
            "sum of MEMORY USAGE of route_keys() / targets):",
        ]
        for m in report["memory"]:
            keys = ", ".join(
                f"{k.rsplit(':', 1)[-1]} {v['bytes']} B {v['encoding']}"
                for k, v in m["keys"].items()
            )
            lines.append(
                f"  {m['targets']:>3} targets: {m['bytes_total']:>7} B total, "
                f"{m['bytes_per_target']:>7.0f} B/target  (buckets filled {m['buckets_filled']},"
                f" leases {m['leases']}; keys t/w/l: {keys})"
            )
        lines += [
            "",
            "Steady state: Lua time of one decide while every target's window holds all "
            f"{MEMORY_BUCKETS} buckets",
            "(the cells above run for seconds, so their windows hold only 1-2 buckets):",
        ]
        for m in report["memory"]:
            us = m["full_window_lua_us_per_decide"]
            lines.append(
                f"  {m['targets']:>3} targets: {us:6.1f} us per decide -> at most "
                f"{1e6 / us if us else 0:,.0f} decides/s per Redis core"
            )
    if report.get("client_cost"):
        lines += [
            "",
            "A client's admit+settle (lua/client.lua, every limit on, never binding; its minute",
            f"window full; {CLIENT_WORKERS} tasks) while it holds leases in flight:",
        ]
        for c in report["client_cost"]:
            lines.append(
                f"  {c['held']:>5} leases held: {c['lua_us_per_pair']:6.1f} us Lua per "
                f"admit+settle ({c['pairs']} pairs; inflight after: {c['inflight']})"
            )
    ceiling = report.get("ceiling")
    if ceiling:
        lines += [
            "",
            "Ceiling: redis-benchmark running the same EVALSHA as a real 8-target "
            "hybrid decide (same SHA, keys, args)",
        ]
        if ceiling.get("rps"):
            lines += [
                f"  redis-benchmark -n {ceiling['requests']} -c {ceiling['clients']} "
                f"-P {ceiling['pipeline']}: {ceiling['rps']:,.0f} EVALSHA/s"
                + (f", p50 {ceiling['p50_ms']:.3f} ms" if ceiling["p50_ms"] is not None else ""),
                f"  RedisState c=64: {ceiling['redis_state_c64_rate']:,.0f} decisions/s = "
                f"{ceiling['ratio']:.2f} of the ceiling",
            ]
        if ceiling.get("note"):
            lines.append(f"  note: {ceiling['note']}")
    lines += ["", "Targets (PASS/MISS, not assertions: the machine is noisy and shared):"]
    for g in report["goals"]:
        value = g["value"]
        shown = (
            "-"
            if value is None
            else (f"{value:,.0f}" if g["unit"] in ("/s", "B") else f"{value:.3g}")
        )
        goal = f"{g['goal']:,.0f}" if g["unit"] in ("/s", "B") else f"{g['goal']:g}"
        lines.append(
            f"  {g['name']:<44}{shown:>10} {g['unit']:<3}{g['comparison']:>3} {goal:>8} "
            f"{g['unit']:<3} {g['status']}"
        )
    lines.append(f"\ntotal runtime {meta['runtime_s']:.1f} s")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Transport: the hand-written parts of the Redis client, each beside redis-py doing the same job
# ---------------------------------------------------------------------------------------------

# The decide EVALSHA's trailing arguments that change per call (a batch of one request from
# `b` on, as the wire table lists them; no exclusions, no outcome); everything before them is
# the route's, encoded once.
_DECIDE_ARGS = wire.SCRIPT_ARGS["decide"]
DYNAMIC_DECIDE_ARGS = sum(
    1
    for name in (*_DECIDE_ARGS[_DECIDE_ARGS.index("b") :], *wire.DECIDE_REQUEST)
    if not name.startswith(("*", "["))
)


@dataclass(slots=True)
class TransportRow:
    transport: str
    concurrency: int
    calls: int
    calls_per_s: float
    p50_ms: float
    p99_ms: float
    client_cpu_us_per_call: float
    round_trips_per_call: float | None


@dataclass(slots=True)
class EncodingRow:
    encoder: str
    ns_per_call: float


async def _call_loop(
    call: Callable[[], Coroutine[Any, Any, Any]], concurrency: int, seconds: float
) -> tuple[int, float, float, list[int]]:
    stop = [False]
    latencies: list[list[int]] = [[] for _ in range(concurrency)]

    async def worker(lat: list[int]) -> None:
        perf = time.perf_counter_ns
        while not stop[0]:
            t0 = perf()
            await call()
            lat.append(perf() - t0)

    cpu0, t0 = time.process_time(), time.perf_counter()
    tasks = [asyncio.create_task(worker(lat)) for lat in latencies]
    await asyncio.sleep(seconds)
    stop[0] = True
    await asyncio.gather(*tasks)
    merged = sorted(x for lat in latencies for x in lat)
    return len(merged), time.perf_counter() - t0, time.process_time() - cpu0, merged


async def run_transport(
    url: str, state: RedisState, route: RouteSpec, settings: Settings
) -> tuple[list[TransportRow], list[EncodingRow]]:
    """The same decide EVALSHA (captured from the wire, replayed unchanged so Redis does the
    same work for both) through edgeroute's pipeline and through redis-py's asyncio client.

    edgeroute's pipeline: RedisState's per-call encoding (route prefix encoded once, the
    dynamic tail per call) and its auto-pipelining writer/reader pair on a redis-py
    Connection. redis-py: `Redis.execute_command` with a pool as large as the concurrency,
    which packs every argument per call and waits for each reply before the connection
    takes the next command.
    """
    args = await capture_decide_args(state, route)
    split = len(args) - DYNAMIC_DECIDE_ARGS
    prefix, dynamic = encode_args(args[:split]), args[split:]
    count = len(args)

    async def edgeroute_call() -> Any:
        return await state._call(command(count, prefix, encode_args(dynamic)))

    client = AsyncRedis.from_url(url, max_connections=64, protocol=2)

    async def redis_py_call() -> Any:
        return await client.execute_command(*args)  # type: ignore[no-untyped-call]

    rows: list[TransportRow] = []
    try:
        for concurrency in CONCURRENCIES:
            for name, call in (
                ("edgeroute pipeline on redis-py Connection", edgeroute_call),
                ("redis-py asyncio Redis client (pool)", redis_py_call),
            ):
                await _call_loop(call, concurrency, settings.warmup_s)
                batches0 = state.batches
                calls, elapsed, cpu, latencies = await _call_loop(
                    call, concurrency, settings.cell_s
                )
                n = max(1, calls)
                rows.append(
                    TransportRow(
                        name,
                        concurrency,
                        calls,
                        calls / elapsed,
                        percentile_ms(latencies, 0.50),
                        percentile_ms(latencies, 0.99),
                        cpu / n * 1e6,
                        (state.batches - batches0) / n if call is edgeroute_call else 1.0,
                    )
                )
                log(f"  transport {name} c={concurrency}: {calls / elapsed:,.0f} calls/s")
    finally:
        await client.aclose()

    packer = Connection()
    repeat = max(2_000, int(200_000 * settings.cell_s / 3.0))
    encoders: list[tuple[str, Callable[[], object]]] = [
        (
            f"route prefix encoded once + {DYNAMIC_DECIDE_ARGS} args per call (edgeroute resp.py)",
            lambda: command(count, prefix, encode_args(dynamic)),
        ),
        (
            f"all {count} args per call (redis-py Connection.pack_command)",
            lambda: packer.pack_command(*args),
        ),
    ]
    encoding = []
    for name, encode in encoders:
        t0 = time.perf_counter_ns()
        for _ in range(repeat):
            encode()
        encoding.append(EncodingRow(name, (time.perf_counter_ns() - t0) / repeat))
    return rows, encoding


def _cluster_slots_reply() -> list[Any]:
    """A 3-primary, 3-replica cluster's CLUSTER SLOTS reply, as the server sends it."""
    third = SLOTS // 3
    ranges = [(0, third - 1), (third, 2 * third - 1), (2 * third, SLOTS - 1)]
    return [
        [start, end, [b"10.0.0.1", 7000 + i, b"p%d" % i], [b"10.0.0.2", 7100 + i, b"r%d" % i]]
        for i, (start, end) in enumerate(ranges)
    ]


class _CannedNode(ClusterNode):
    """A seed node that answers CLUSTER SLOTS from memory: only the map building is timed."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        return _cluster_slots_reply()


async def run_slot_maps(settings: Settings) -> list[EncodingRow]:
    """Building the cluster slot map from one CLUSTER SLOTS reply, no I/O: edgeroute's list
    filled range by range against redis-py's NodesManager.initialize (slot-by-slot dicts)."""
    repeat = max(5, int(100 * settings.cell_s / 3.0))
    manager = NodesManager([_CannedNode("10.0.0.1", 7000)], False, {})
    rows = []
    t0 = time.perf_counter_ns()
    for _ in range(repeat):
        slot_map(_cluster_slots_reply(), ("10.0.0.1", 7000))
    rows.append(
        EncodingRow(
            "edgeroute cluster.slot_map: one list, filled range by range",
            (time.perf_counter_ns() - t0) / repeat,
        )
    )
    t0 = time.perf_counter_ns()
    for _ in range(repeat):
        await manager.initialize()
    rows.append(
        EncodingRow(
            "redis-py NodesManager.initialize: dicts, slot by slot",
            (time.perf_counter_ns() - t0) / repeat,
        )
    )
    return rows


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------


def loop_factory(choice: str) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise SystemExit("uvloop is not installed") from None
        else:
            version = getattr(uvloop, "__version__", "?")
            return uvloop.new_event_loop, f"uvloop {version}"
    return None, "asyncio (default)"


def redis_version(url: str) -> str:
    with redis_py.Redis.from_url(url, socket_timeout=5.0) as client:
        return str(client.info("server")["redis_version"])


async def run_all(url: str, settings: Settings, prefix: str, report: dict[str, Any]) -> None:
    probe = ServerProbe(url)
    memory = MemoryState()
    redis_state = RedisState(url, key_prefix=prefix, timeout_ms=5_000)
    routes: dict[tuple[str, int, int], RouteSpec] = {}
    try:
        await redis_state.ping()
        for strategy, n in CONFIGS:
            for concurrency in CONCURRENCIES:
                route = make_route(f"{strategy}-{n}-c{concurrency}", strategy, n)
                routes[(strategy, n, concurrency)] = route
                for state in (memory, redis_state):
                    cell = await run_cell(
                        state, route, concurrency, settings, probe if state is redis_state else None
                    )
                    report["cells"].append(asdict(cell))
                    log(
                        f"  {cell.backend:<7}{strategy:<12}{n:>3} targets c={concurrency:<3}"
                        f"{cell.decisions_per_s:>10,.0f}/s p50 {cell.p50_ms:.3f} ms"
                        f" p99 {cell.p99_ms:.3f} ms"
                    )

        # Limits on: the same hybrid 8-target route with every target's rpm/tpm/concurrency
        # checked and counted (never binding), then also a client's limits (lua/client.lua,
        # pipelined with each decide as the gateway does).
        clients = Clients(redis_state, lease_ttl_ms=60_000)
        q = QUOTA_NEVER_BINDS
        team = ClientSpec(
            "bench", b"", rpm=q["rpm"], tpm=q["tpm"], max_concurrency=q["max_concurrency"]
        )

        async def client_gate() -> object:
            return await clients.admit(team, 100)

        for concurrency in CONCURRENCIES:
            route = make_route(f"quota-8-c{concurrency}", "hybrid", 8, quotas=True)
            for label, gate in (("hybrid+quota", None), ("hybrid+q+client", client_gate)):
                cell = await run_cell(
                    redis_state, route, concurrency, settings, probe, label=label, gate=gate
                )
                report["cells"].append(asdict(cell))
                log(
                    f"  redis  {label:<16} 8 targets c={concurrency:<3}"
                    f"{cell.decisions_per_s:>10,.0f}/s p50 {cell.p50_ms:.3f} ms"
                    f" lua {cell.lua_us_per_decision or 0:.1f} us"
                )

        # The ceiling, right after the cells while the 8-target route's window is warm.
        route = routes[("hybrid", 8, 64)]
        c64 = next(
            c
            for c in report["cells"]
            if (c["backend"], c["strategy"], c["targets"], c["concurrency"])
            == ("redis", "hybrid", 8, 64)
        )
        args = await capture_decide_args(redis_state, route)
        ceiling = Ceiling(
            settings.benchmark_requests, 64, 16, 0.0, None, args, c64["decisions_per_s"], 0.0
        )
        reply = probe.client.execute_command(*args)  # type: ignore[no-untyped-call]
        if not isinstance(reply, list):
            ceiling.note = f"the captured EVALSHA did not return a decision: {reply!r}"
        elif url.startswith("rediss://"):
            ceiling.note = "skipped: redis-benchmark is not run against TLS endpoints"
        else:
            try:
                rps, p50 = await asyncio.to_thread(
                    run_redis_benchmark, url, args, settings.benchmark_requests
                )
            except (FileNotFoundError, subprocess.SubprocessError, RuntimeError) as exc:
                ceiling.note = f"redis-benchmark failed: {exc}"
            else:
                ceiling.rps, ceiling.p50_ms = rps, p50
                ceiling.ratio = c64["decisions_per_s"] / rps
                log(f"  ceiling {rps:,.0f} EVALSHA/s; RedisState c=64 = {ceiling.ratio:.2f}")
        report["ceiling"] = asdict(ceiling)

        rows, encoding = await run_transport(url, redis_state, routes[("hybrid", 8, 64)], settings)
        report["transport"] = {
            "rows": [asdict(row) for row in rows],
            "encoding": [asdict(row) for row in encoding],
            "slot_map": [asdict(row) for row in await run_slot_maps(settings)],
        }

        for cost in await measure_client_cost(url, probe, settings, f"{prefix}-held"):
            report["client_cost"].append(asdict(cost))
            log(
                f"  client admit+settle, {cost.held} leases held: "
                f"lua {cost.lua_us_per_pair:.1f} us per pair"
            )

        accounting = await run_accounting(redis_state, probe, settings, "acct")
        report["accounting"] = asdict(accounting)
        log(f"  accounting: {accounting.commands_per_decision:.2f} commands per decision")

        for n in MEMORY_TARGET_COUNTS:
            figure = await measure_memory(redis_state, probe, n, settings, "mem")
            report["memory"].append(asdict(figure))
            log(f"  memory {n} targets: {figure.bytes_per_target:.0f} B/target")
    finally:
        await redis_state.close()
        probe.close()
        if not report["meta"]["spawned"]:
            delete_keys(url, prefix)


def delete_keys(url: str, prefix: str) -> None:
    """Remove this run's keys from a server we share (never FLUSH somebody else's Redis)."""
    with (
        contextlib.suppress(redis_py.RedisError),
        redis_py.Redis.from_url(url, socket_timeout=10.0) as client,
    ):
        keys = list(client.scan_iter(match=f"{{{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])


async def run_profile(
    url: str | None, which: str, settings: Settings, sort: str, spawned: bool
) -> str:
    """One 8-target hybrid cell under cProfile; returns the top functions."""
    concurrency = 64 if which.endswith("c64") else 1
    route = make_route(f"profile-{which}", "hybrid", 8)
    prefix = f"edgeroute-bench-{uuid.uuid4().hex[:8]}"
    state: StateBackend
    if which.startswith("redis"):
        assert url is not None
        state = RedisState(url, key_prefix=prefix, timeout_ms=5_000)
    else:
        state = MemoryState()
    try:
        await closed_loop(
            state, route, concurrency, seconds=settings.warmup_s, recorder=Recorder(state)
        )
        profiler = cProfile.Profile()
        profiler.enable()
        result = await closed_loop(
            state, route, concurrency, seconds=settings.cell_s, recorder=Recorder(state)
        )
        profiler.disable()
    finally:
        await state.close()
        if url is not None and not spawned:
            delete_keys(url, prefix)
    out = io.StringIO()
    print(
        f"profile {which}: {result.decisions} decisions in {result.seconds:.2f} s "
        f"({result.decisions / result.seconds:,.0f}/s under cProfile)",
        file=out,
    )
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats(sort).print_stats(30)
    return out.getvalue()


def run_with_loop(
    factory: Callable[[], asyncio.AbstractEventLoop] | None, coro: Coroutine[Any, Any, T]
) -> T:
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="very short cells (smoke test)")
    parser.add_argument("--redis-url", help="use this Redis instead of spawning a private one")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--duration", type=float, help="seconds per cell (default 3, quick 0.15)")
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    parser.add_argument(
        "--profile",
        choices=("redis-c64", "redis-c1", "memory-c1", "memory-c64"),
        help="run one 8-target hybrid cell under cProfile and print hot spots",
    )
    parser.add_argument("--profile-sort", default="tottime", choices=("tottime", "cumulative"))
    options = parser.parse_args(argv)
    settings = Settings.make(options.quick, options.duration)
    factory, loop_name = loop_factory(options.loop)
    started = time.perf_counter()

    with contextlib.ExitStack() as stack:
        spawned = options.redis_url is None
        needs_redis = options.profile is None or options.profile.startswith("redis")
        url: str | None = options.redis_url
        if url is None and needs_redis:
            url = stack.enter_context(spawned_redis())
        if options.profile:
            print(f"event loop: {loop_name}")
            print(
                run_with_loop(
                    factory,
                    run_profile(url, options.profile, settings, options.profile_sort, spawned),
                )
            )
            return 0
        assert url is not None
        prefix = f"edgeroute-bench-{uuid.uuid4().hex[:8]}"
        report: dict[str, Any] = {
            "meta": {
                "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "cpus": os.cpu_count(),
                "platform": platform.platform(terse=True),
                "python": platform.python_version(),
                "loop": loop_name,
                "redis": "private redis-server " + url if spawned else url,
                "redis_version": redis_version(url),
                "spawned": spawned,
                "quick": options.quick,
                "cell_s": settings.cell_s,
                "warmup_s": settings.warmup_s,
                "record_batch": RECORD_BATCH,
                "measured": (
                    "closed-loop asyncio tasks awaiting state.decide(route); each admitted "
                    "decision's SUCCESS outcome recorded by a background task via "
                    f"state.record_many in batches of {RECORD_BATCH}; decisions/s over the "
                    "whole loop, p50/p99 of the decide call alone"
                ),
            },
            "cells": [],
            "memory": [],
            "client_cost": [],
            "accounting": None,
            "ceiling": None,
            "transport": None,
        }
        log(f"edgeroute decide benchmark: loop {loop_name}, Redis at {url}")
        run_with_loop(factory, run_all(url, settings, prefix, report))
    report["meta"]["runtime_s"] = round(time.perf_counter() - started, 2)
    report["goals"] = goals(report)
    if options.json:
        print(json.dumps(report, indent=2))
    else:
        print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
