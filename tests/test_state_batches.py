"""Concurrent decides of one route leave as one script call (lua/decide.lua runs the batch in
order); a batch must decide exactly as the same requests one by one on the reference model.

Both backends run on the same frozen clock, so nothing but the batching can set them apart:
each request's admitted target, its ranking, and the route's state after the batch (breakers,
in-flight counts, cursor, pins, weights) are compared with MemoryState's."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis

from edgeroute.errors import StateUnavailable
from edgeroute.state.memory import MemoryState
from edgeroute.state.redis import RedisState
from edgeroute.strategy import RoutingDecision, RoutingStrategy
from edgeroute.types import (
    Admission,
    AffinityParams,
    BreakerParams,
    Outcome,
    OutcomeKind,
    RouteSnapshot,
)
from tests.support.redis_servers import RedisServer
from tests.test_state_conformance import make_route

NOW_S = 1_000_000.0  # a frozen clock: every decide of either backend happens at this instant


def _route(strategy: RoutingStrategy, *, sticky: bool = False, quotas: bool = False) -> Any:
    route = make_route(strategy, breaker=BreakerParams(failure_threshold=2, open_timeout_ms=60_000))
    targets = tuple(
        dataclasses.replace(t, weight=w) for t, w in zip(route.targets, (5, 3, 2), strict=True)
    )
    if quotas:  # small enough that requests of one batch run into them
        targets = tuple(
            dataclasses.replace(t, rpm=rpm, tpm=900, max_concurrency=3)
            for t, rpm in zip(targets, (4, 6, 0), strict=True)
        )
    route = dataclasses.replace(route, targets=targets)
    if sticky:
        route = dataclasses.replace(route, affinity=AffinityParams("header", "x-s", 60_000, 2))
    return route


def _shape(decision: RoutingDecision) -> tuple[Any, ...]:
    return (
        decision.admission.target_id if decision.admission else None,
        decision.admission.probe if decision.admission else None,
        [c.target.id for c in decision.candidates],
        decision.affinity,
        decision.pin_moved_from,
    )


def _state(snapshot: RouteSnapshot) -> list[tuple[Any, ...]]:
    return [
        (
            t.target_id,
            t.state,
            t.consecutive_failures,
            t.inflight,
            t.successes,
            t.failures,
            t.current_weight,
        )
        for t in snapshot.targets
    ] + [("cursor", snapshot.rr_cursor, snapshot.pins)]


Request = Callable[[list[Admission]], dict[str, Any]]


def _failure(index: int) -> Request:
    """Carry the failure of the index-th warm-up admission (a failover's report)."""
    return lambda held: {"outcome": Outcome.for_admission(held[index], OutcomeKind.FAILURE, 9.0)}


def _success(index: int) -> Request:
    return lambda held: {"outcome": Outcome.for_admission(held[index], OutcomeKind.SUCCESS, 4.0)}


def _plain(**kwargs: Any) -> Request:
    return lambda held: dict(kwargs)


# Requests that change what the next one sees: outcomes opening a breaker mid-batch,
# exclusions, cursor moves without advancing, sessions pinned and evicted (max_pins 2).
REQUESTS: list[Request] = [
    _plain(),
    _plain(session="a"),
    _failure(0),
    _plain(exclude=("t1",)),
    _plain(session="a"),
    _failure(3),  # the second failure of t0 in a row: its breaker opens inside the batch
    _plain(session="b"),
    _plain(advance=False),
    _success(1),
    _plain(session="c"),  # a third pin: the least recently used goes
    _plain(session="a", exclude=("t2",)),
    _plain(limit=1),
    _plain(),
    _plain(tokens=400),  # with quotas: tpm 900 holds two of these per target
    _plain(tokens=400),
    _plain(tokens=400),
    _success(2),
    _plain(),
]

STRATEGIES = {
    "round_robin": RoutingStrategy.round_robin,
    "least_busy": RoutingStrategy.least_busy,
    "cost": RoutingStrategy.cost_based,
    "hybrid": RoutingStrategy.default_hybrid,
    "latency": RoutingStrategy.latency_based,
    "weighted": RoutingStrategy.weighted,
}


async def _warm_up(state: Any, route: Any) -> list[Admission]:
    """Four admissions held open, one after the other (t0 fails twice from them later)."""
    held = []
    for exclude in ((), ("t1", "t2"), ("t0", "t2"), ("t1", "t2")):
        decision = await state.decide(route, exclude=exclude)
        assert decision.admission is not None
        held.append(decision.admission)
    return held


@pytest.mark.parametrize("policy", ["plain", "sticky", "quotas"])
@pytest.mark.parametrize("kind", sorted(STRATEGIES))
async def test_a_batch_decides_as_the_same_requests_one_by_one(
    redis_url: str, kind: str, policy: str
) -> None:
    route = _route(STRATEGIES[kind](), sticky=policy == "sticky", quotas=policy == "quotas")
    client = redis.Redis.from_url(redis_url)
    memory = MemoryState(clock=lambda: NOW_S)
    shared = RedisState(
        redis_url, key_prefix=f"batch-{uuid.uuid4().hex[:8]}", timeout_ms=5000, clock=lambda: NOW_S
    )
    try:
        memory_held = await _warm_up(memory, route)
        redis_held = await _warm_up(shared, route)
        assert [a.target_id for a in memory_held] == [a.target_id for a in redis_held]

        expected = [
            _shape(await memory.decide(route, **request(memory_held))) for request in REQUESTS
        ]
        calls = _evalsha_calls(client)
        got = await asyncio.gather(
            *(shared.decide(route, **request(redis_held)) for request in REQUESTS)
        )
        assert _evalsha_calls(client) - calls == 1  # the whole batch: one script call
        assert [_shape(d) for d in got] == expected
        assert _state(await shared.snapshot(route)) == _state(await memory.snapshot(route))
    finally:
        await shared.close()
        client.close()


def _evalsha_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_batches_of_several_routes_stay_apart(redis_url: str) -> None:
    """Each route's batch runs on its own keys: concurrent decides of three routes, every
    one admitted, each route's cursor moved by its own requests only."""
    shared = RedisState(redis_url, key_prefix=f"apart-{uuid.uuid4().hex[:8]}", timeout_ms=5000)
    routes = [make_route(RoutingStrategy.round_robin()) for _ in range(3)]
    try:
        per_route = (4, 7, 11)
        decisions = await asyncio.gather(
            *(
                shared.decide(route)
                for route, k in zip(routes, per_route, strict=True)
                for _ in range(k)
            )
        )
        assert all(d.admission is not None for d in decisions)
        for route, k in zip(routes, per_route, strict=True):
            snapshot = await shared.snapshot(route)
            assert snapshot.rr_cursor == k + 1  # (explain: the cursor the next decide takes)
            assert sum(t.inflight for t in snapshot.targets) == k
    finally:
        await shared.close()


async def test_a_refused_batch_fails_every_request_in_it(redis_server: RedisServer) -> None:
    """A batch whose call Redis refuses (out of memory: its writes are denied) answers
    StateUnavailable to every request in it, and none of them holds a lease afterwards."""
    client = redis.Redis.from_url(redis_server.url)
    shared = RedisState(redis_server.url, key_prefix="oom", timeout_ms=5000)
    route = make_route(RoutingStrategy.round_robin())
    try:
        held = await shared.decide(route)
        assert held.admission is not None
        client.config_set("maxmemory", 1)
        results = await asyncio.gather(
            *(shared.decide(route) for _ in range(5)), return_exceptions=True
        )
        assert [type(r) for r in results] == [StateUnavailable] * 5, results
        assert "OOM" in str(results[0])
        client.config_set("maxmemory", 0)
        snapshot = await shared.snapshot(route)
        assert sum(t.inflight for t in snapshot.targets) == 1  # only the one admitted before
    finally:
        client.config_set("maxmemory", 0)
        await shared.close()
        client.close()
