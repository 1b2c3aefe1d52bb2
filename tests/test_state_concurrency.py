"""Atomicity under contention: many tasks, many connections, many processes, one breaker.

Every state change is one Lua script (RedisState) or one uninterrupted coroutine step
(MemoryState), so concurrent callers must see exactly the behaviour of some serial order:
a breaker opens once, a half-open breaker hands out exactly its probe budget, leases are
counted exactly and expire, round-robin is exactly fair.

Backends: `memory` (one MemoryState, many asyncio tasks), `redis-1` (one RedisState: one
connection, pipelined batches) and `redis-4` (four RedisState instances on the same key
prefix: four connections, as four replicas). The multi-process tests use the 'spawn'
context, so every worker is a fresh interpreter with its own connection.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier
from typing import Any

import pytest
import redis

from edgeroute.state.base import RouteSpec, StateBackend
from edgeroute.state.memory import MemoryState
from edgeroute.state.redis import RedisState
from edgeroute.strategy import RoutingDecision, RoutingStrategy
from edgeroute.types import (
    Admission,
    BreakerParams,
    CircuitState,
    Outcome,
    OutcomeKind,
    TargetSnapshot,
    TargetSpec,
    WindowParams,
)

REDIS_TIMEOUT_MS = 10_000  # generous: a loaded CI box must not turn contention into timeouts
PROCESSES = 4
WORKER_DEADLINE_S = 120.0


def make_route(
    *,
    targets: int = 1,
    strategy: str = "cost",
    failure_threshold: int = 3,
    open_timeout_ms: int = 60_000,
    success_threshold: int = 1,
    half_open_max_probes: int = 1,
    lease_ttl_ms: int = 600_000,
    name: str | None = None,
) -> RouteSpec:
    """A route with long timeouts unless told otherwise: nothing moves by itself mid-test."""
    return RouteSpec(
        name=name or f"route-{uuid.uuid4().hex[:8]}",
        strategy=RoutingStrategy.named(strategy),
        targets=tuple(
            TargetSpec(id=f"t{i}", provider=f"p{i}", model=f"m{i}", price_per_mtok=1.0 + i)
            for i in range(targets)
        ),
        breaker=BreakerParams(
            failure_threshold=failure_threshold,
            open_timeout_ms=open_timeout_ms,
            success_threshold=success_threshold,
            half_open_max_probes=half_open_max_probes,
            max_open_timeout_ms=max(open_timeout_ms, 60_000),
            probe_ttl_ms=600_000,
        ),
        window=WindowParams(bucket_ms=5_000, buckets=12),
        lease_ttl_ms=lease_ttl_ms,
        idle_ttl_ms=120_000,
    )


def delete_prefix(url: str, prefix: str) -> None:
    """Drop every key this test wrote (all of them carry the hash tag `{prefix:route}`)."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{{{prefix}:*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@dataclass
class Backends:
    """One or more handles on the same shared state; task i uses handle i % len."""

    kind: str
    states: list[StateBackend]

    def pick(self, i: int) -> StateBackend:
        return self.states[i % len(self.states)]

    @property
    def first(self) -> StateBackend:
        return self.states[0]

    async def decide_many(self, route: RouteSpec, count: int) -> list[RoutingDecision]:
        return list(await asyncio.gather(*(self.pick(i).decide(route) for i in range(count))))

    async def record_all(
        self, route: RouteSpec, admissions: list[Admission], kind: OutcomeKind
    ) -> None:
        await asyncio.gather(
            *(
                self.pick(i).record(route, Outcome.for_admission(a, kind, 10.0))
                for i, a in enumerate(admissions)
            )
        )

    async def target(self, route: RouteSpec, index: int = 0) -> TargetSnapshot:
        return (await self.first.snapshot(route)).targets[index]


@pytest.fixture(
    params=[
        pytest.param("memory", marks=pytest.mark.memory),
        pytest.param("redis-1", marks=pytest.mark.redis),
        pytest.param("redis-4", marks=pytest.mark.redis),
    ]
)
async def backends(request: pytest.FixtureRequest) -> AsyncIterator[Backends]:
    if request.param == "memory":
        yield Backends("memory", [MemoryState()])
        return
    url: str = request.getfixturevalue("redis_url")
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    count = 1 if request.param == "redis-1" else 4
    states: list[StateBackend] = [
        RedisState(url, key_prefix=prefix, timeout_ms=REDIS_TIMEOUT_MS) for _ in range(count)
    ]
    try:
        yield Backends(request.param, states)
    finally:
        for state in states:
            await state.close()
        delete_prefix(url, prefix)


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    yield prefix
    delete_prefix(redis_url, prefix)


def admissions_of(decisions: list[RoutingDecision]) -> list[Admission]:
    return [d.admission for d in decisions if d.admission is not None]


# ---- breaker: concurrent failures open it exactly once ---------------------------------


@pytest.mark.parametrize("failure_threshold", [1, 5])
async def test_concurrent_failures_open_the_breaker_exactly_once(
    backends: Backends, failure_threshold: int
) -> None:
    route = make_route(failure_threshold=failure_threshold)
    decisions = await backends.decide_many(route, 200)
    admissions = admissions_of(decisions)
    assert len(admissions) == 200
    initial = admissions[0].generation
    assert {a.generation for a in admissions} == {initial}
    before = await backends.target(route)
    assert (before.state, before.generation, before.inflight) == (
        CircuitState.CLOSED,
        initial,
        200,
    )

    # All but one of the threshold, concurrently: still closed, every failure counted.
    head, tail = admissions[: failure_threshold - 1], admissions[failure_threshold - 1 :]
    await backends.record_all(route, head, OutcomeKind.FAILURE)
    closed = await backends.target(route)
    assert (closed.state, closed.generation, closed.consecutive_failures) == (
        CircuitState.CLOSED,
        initial,
        failure_threshold - 1,
    )

    # The rest, concurrently: whichever lands first opens it; every later one carries the
    # closed generation and must neither re-open it nor move its generation again.
    await backends.record_all(route, tail, OutcomeKind.FAILURE)
    after = await backends.target(route)
    assert after.state is CircuitState.OPEN
    assert after.generation == initial + 1
    assert after.open_timeout_ms == route.breaker.open_timeout_ms  # opened once, not doubled
    assert after.open_remaining_ms > 0
    assert after.failures == 200  # the window counts every failure, late ones included
    assert after.inflight == 0
    assert after.probes_in_use == 0

    refused = await backends.first.decide(route)
    assert refused.admission is None
    assert refused.retry_after_s > 0


# ---- half-open: the probe budget holds under contention --------------------------------


@pytest.mark.parametrize("probes", [1, 3])
async def test_half_open_grants_exactly_the_probe_budget(backends: Backends, probes: int) -> None:
    route = make_route(failure_threshold=1, open_timeout_ms=300, half_open_max_probes=probes)
    await backends.first.record(route, Outcome(target_id="t0", kind=OutcomeKind.FAILURE))
    assert (await backends.target(route)).state is CircuitState.OPEN
    await asyncio.sleep(0.45)

    decisions = await backends.decide_many(route, 100)
    admissions = admissions_of(decisions)
    assert len(admissions) == probes
    assert all(a.probe for a in admissions)
    assert len({a.token for a in admissions}) == probes
    assert len({a.generation for a in admissions}) == 1
    refused = [d for d in decisions if d.admission is None]
    assert len(refused) == 100 - probes
    assert all(d.retry_after_s > 0 for d in refused)

    snapshot = await backends.target(route)
    assert snapshot.state is CircuitState.HALF_OPEN
    assert snapshot.generation == admissions[0].generation
    assert snapshot.probes_in_use == probes
    assert snapshot.inflight == probes


# ---- in-flight leases ------------------------------------------------------------------


async def test_inflight_counts_every_admission_and_records_release_them(
    backends: Backends,
) -> None:
    route = make_route(targets=3, strategy="least_busy")
    decisions = await backends.decide_many(route, 120)
    admissions = admissions_of(decisions)
    assert len(admissions) == 120
    per_target = Counter(a.target_id for a in admissions)
    # least_busy admits the target with the fewest leases: serialised, that is 40/40/40.
    assert per_target == {"t0": 40, "t1": 40, "t2": 40}
    snapshot = await backends.first.snapshot(route)
    assert {t.target_id: t.inflight for t in snapshot.targets} == per_target

    await backends.record_all(route, admissions, OutcomeKind.SUCCESS)
    snapshot = await backends.first.snapshot(route)
    assert [t.inflight for t in snapshot.targets] == [0, 0, 0]
    assert sum(t.successes for t in snapshot.targets) == 120

    # A duplicate delivery of the same outcomes releases nothing twice.
    await backends.record_all(route, admissions, OutcomeKind.NEUTRAL)
    snapshot = await backends.first.snapshot(route)
    assert [t.inflight for t in snapshot.targets] == [0, 0, 0]


async def test_leases_expire_when_nobody_reports_back(backends: Backends) -> None:
    route = make_route(targets=2, strategy="round_robin", lease_ttl_ms=400)
    decisions = await backends.decide_many(route, 60)
    admissions = admissions_of(decisions)
    assert len(admissions) == 60
    snapshot = await backends.first.snapshot(route)
    assert [t.inflight for t in snapshot.targets] == [30, 30]

    await asyncio.sleep(0.55)  # the replica that took them "died": nobody records
    snapshot = await backends.first.snapshot(route)
    assert [t.inflight for t in snapshot.targets] == [0, 0]  # even before a decide sweeps

    fresh = await backends.first.decide(route)  # sweeps the expired leases
    assert fresh.admission is not None
    assert all(c.inflight == 0 for c in fresh.candidates)
    snapshot = await backends.first.snapshot(route)
    assert sum(t.inflight for t in snapshot.targets) == 1

    # The dead replica's outcomes arriving after all must not release anything twice.
    await backends.record_all(route, admissions, OutcomeKind.SUCCESS)
    snapshot = await backends.first.snapshot(route)
    assert sum(t.inflight for t in snapshot.targets) == 1
    await backends.first.record(route, Outcome.for_admission(fresh.admission, OutcomeKind.NEUTRAL))
    snapshot = await backends.first.snapshot(route)
    assert [t.inflight for t in snapshot.targets] == [0, 0]


# ---- round-robin fairness --------------------------------------------------------------


@pytest.mark.parametrize(("count", "targets"), [(100, 3), (120, 4), (7, 5)])
async def test_round_robin_is_exactly_fair(backends: Backends, count: int, targets: int) -> None:
    route = make_route(targets=targets, strategy="round_robin")
    decisions = await backends.decide_many(route, count)
    admissions = admissions_of(decisions)
    assert len(admissions) == count
    per_target = Counter(a.target_id for a in admissions)
    low, high = count // targets, -(-count // targets)
    assert all(per_target[t.id] in (low, high) for t in route.targets), per_target
    assert sum(per_target.values()) == count
    # Every decide advanced the shared cursor exactly once: each saw a different value.
    assert sorted(d.rr_cursor for d in decisions) == list(range(1, count + 1))
    assert (await backends.first.snapshot(route)).rr_cursor == count + 1  # the next one


# ---- several OS processes --------------------------------------------------------------


async def _worker(
    job: str, url: str, prefix: str, route: RouteSpec, tasks: int, calls: int, barrier: Barrier
) -> dict[str, Any]:
    state = RedisState(url, key_prefix=prefix, timeout_ms=REDIS_TIMEOUT_MS)
    recorded = refused = 0
    generations: Counter[int] = Counter()
    probes = 0
    try:
        await state.snapshot(route)  # connect and load the scripts before the start line
        await asyncio.to_thread(barrier.wait, WORKER_DEADLINE_S)

        async def hammer() -> None:
            nonlocal recorded, refused
            for _ in range(calls):
                decision = await state.decide(route)
                admission = decision.admission
                if admission is None:
                    refused += 1
                    continue
                generations[admission.generation] += 1
                await state.record(
                    route, Outcome.for_admission(admission, OutcomeKind.FAILURE, 5.0)
                )
                recorded += 1

        async def probe() -> None:
            nonlocal refused, probes
            for _ in range(calls):
                decision = await state.decide(route)
                if decision.admission is None:
                    refused += 1
                else:
                    generations[decision.admission.generation] += 1
                    probes += decision.admission.probe

        body = hammer if job == "hammer" else probe
        await asyncio.gather(*(body() for _ in range(tasks)))
    finally:
        await state.close()
    return {
        "recorded": recorded,
        "refused": refused,
        "generations": dict(generations),
        "probes": probes,
    }


def _worker_main(
    job: str,
    url: str,
    prefix: str,
    route_kwargs: dict[str, Any],
    tasks: int,
    calls: int,
    barrier: Barrier,
    results: multiprocessing.Queue[tuple[str, Any]],
) -> None:
    """Entry point of a spawned process: one RedisState, `tasks` coroutines, `calls` each."""
    try:
        route = make_route(**route_kwargs)
        outcome = asyncio.run(_worker(job, url, prefix, route, tasks, calls, barrier))
        results.put(("ok", outcome))
    except BaseException as exc:  # report, don't hang the parent
        barrier.abort()
        results.put(("error", f"{type(exc).__name__}: {exc}"))


async def run_processes(
    job: str,
    url: str,
    prefix: str,
    route_kwargs: dict[str, Any],
    *,
    tasks: int,
    calls: int,
) -> list[dict[str, Any]]:
    """Start PROCESSES spawned workers, release them together, collect their counts."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES + 1)
    results: multiprocessing.Queue[tuple[str, Any]] = ctx.Queue()
    workers = [
        ctx.Process(
            target=_worker_main,
            args=(job, url, prefix, route_kwargs, tasks, calls, barrier, results),
            daemon=True,
        )
        for _ in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    outcomes: list[dict[str, Any]] = []
    try:
        await asyncio.to_thread(barrier.wait, WORKER_DEADLINE_S)
        deadline = time.monotonic() + WORKER_DEADLINE_S
        for _ in workers:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                status, value = await asyncio.to_thread(results.get, True, remaining)
            except queue.Empty:
                pytest.fail("a worker process did not report back in time")
            assert status == "ok", f"worker failed: {value}"
            outcomes.append(value)
    finally:
        for worker in workers:
            await asyncio.to_thread(worker.join, 10)
            if worker.is_alive():
                worker.kill()
                worker.join(5)
        results.close()
    return outcomes


@pytest.mark.slow
async def test_processes_hammering_one_breaker_open_it_exactly_once(
    redis_url: str, redis_prefix: str
) -> None:
    threshold = 60
    route_kwargs: dict[str, Any] = {
        "name": "hammered",
        "failure_threshold": threshold,
        "open_timeout_ms": 60_000,
    }
    route = make_route(**route_kwargs)
    outcomes = await run_processes(
        "hammer", redis_url, redis_prefix, route_kwargs, tasks=8, calls=40
    )

    recorded = sum(o["recorded"] for o in outcomes)
    generations: Counter[int] = Counter()
    for o in outcomes:
        generations.update({int(g): n for g, n in o["generations"].items()})
    assert recorded >= threshold
    assert recorded + sum(o["refused"] for o in outcomes) == PROCESSES * 8 * 40
    assert set(generations) == {0}  # everything admitted was admitted while closed

    state = RedisState(redis_url, key_prefix=redis_prefix, timeout_ms=REDIS_TIMEOUT_MS)
    try:
        target = (await state.snapshot(route)).targets[0]
    finally:
        await state.close()
    assert target.state is CircuitState.OPEN
    assert target.generation == 1  # closed (0) -> open (1), exactly once
    assert target.open_timeout_ms == 60_000
    assert target.failures == recorded
    assert target.inflight == 0


@pytest.mark.slow
@pytest.mark.parametrize("probes", [1, 3])
async def test_processes_share_one_probe_budget(
    redis_url: str, redis_prefix: str, probes: int
) -> None:
    route_kwargs: dict[str, Any] = {
        "name": "probed",
        "failure_threshold": 1,
        "open_timeout_ms": 300,
        "half_open_max_probes": probes,
    }
    route = make_route(**route_kwargs)
    state = RedisState(redis_url, key_prefix=redis_prefix, timeout_ms=REDIS_TIMEOUT_MS)
    try:
        await state.record(route, Outcome(target_id="t0", kind=OutcomeKind.FAILURE))
        assert (await state.snapshot(route)).targets[0].state is CircuitState.OPEN
        # Workers start only when the parent reaches the barrier, well after the timeout.
        await asyncio.sleep(0.45)
        outcomes = await run_processes(
            "probe", redis_url, redis_prefix, route_kwargs, tasks=25, calls=1
        )
        target = (await state.snapshot(route)).targets[0]
    finally:
        await state.close()

    admitted = sum(sum(o["generations"].values()) for o in outcomes)
    assert admitted == probes
    assert sum(o["probes"] for o in outcomes) == probes
    assert sum(o["refused"] for o in outcomes) == PROCESSES * 25 - probes
    assert target.state is CircuitState.HALF_OPEN
    assert target.generation == 2  # closed 0 -> open 1 -> half-open 2
    assert target.probes_in_use == probes
    assert target.inflight == probes
