"""Shared state heals when Redis loses or mangles a key (eviction, a stray DEL or SET).

In-flight counts live in the target records and the leases in their own sorted set: after
either is lost, the two agree again by the next decide. A key of the wrong type is replaced
(and counted), never left to fail every call on the route. Real Redis: this is about what
the scripts do.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from edgeroute.state import RedisState
from edgeroute.state.base import RouteSpec
from edgeroute.state.redis import route_keys, spec_keys
from edgeroute.strategy import RoutingStrategy
from edgeroute.types import Admission, AffinityParams, Outcome, OutcomeKind, TargetSpec


@pytest.fixture
async def state(redis_url: str) -> AsyncIterator[tuple[RedisState, list[int]]]:
    repairs: list[int] = []
    backend = RedisState(
        redis_url,
        key_prefix=f"repair-{uuid.uuid4().hex[:8]}",
        timeout_ms=2000,
        on_repair=repairs.append,
    )
    yield backend, repairs
    await backend.close()


def _route(strategy: RoutingStrategy | None = None) -> RouteSpec:
    return RouteSpec(
        name="r",
        strategy=strategy or RoutingStrategy.least_busy(),
        targets=(TargetSpec("a", "p", "m"), TargetSpec("b", "p", "m")),
    )


async def _inflight(state: RedisState, route: RouteSpec) -> dict[str, int]:
    snapshot = await state.snapshot(route)
    return {t.target_id: t.inflight for t in snapshot.targets}


async def _admit(state: RedisState, route: RouteSpec) -> Admission:
    decision = await state.decide(route)
    assert decision.admission is not None
    return decision.admission


async def test_a_lost_lease_set_leaves_no_phantom_in_flight(
    state: tuple[RedisState, list[int]], redis_url: str
) -> None:
    backend, _ = state
    route = _route()
    held = [await _admit(backend, route) for _ in range(4)]
    assert sorted(a.target_id for a in held) == ["a", "a", "b", "b"]
    client = aioredis.Redis.from_url(redis_url)
    await client.delete(route_keys(backend.key_prefix, "r")[2])  # the leases are gone
    # The very next decide counts again: nothing is in flight but what it admits.
    admission = await _admit(backend, route)
    assert await _inflight(backend, route) == {"a": 0, "b": 0} | {admission.target_id: 1}
    # Releases of the lost leases change nothing; least-busy keeps alternating.
    for lost in held:
        await backend.record(route, Outcome.for_admission(lost, OutcomeKind.SUCCESS, 5.0))
    await backend.record(route, Outcome.for_admission(admission, OutcomeKind.SUCCESS, 5.0))
    picks = []
    for _ in range(4):
        picked = await _admit(backend, route)
        picks.append(picked.target_id)
    assert sorted(picks) == ["a", "a", "b", "b"]
    await client.aclose()


async def test_a_lost_target_hash_never_goes_negative(
    state: tuple[RedisState, list[int]], redis_url: str
) -> None:
    backend, _ = state
    route = _route()
    held = [await _admit(backend, route) for _ in range(4)]
    client = aioredis.Redis.from_url(redis_url)
    await client.delete(route_keys(backend.key_prefix, "r")[0])  # records and cursor gone
    for lease in held[:3]:
        await backend.record(route, Outcome.for_admission(lease, OutcomeKind.NEUTRAL))
    # Explain reads the lease set itself: one lease is left, whatever the records say.
    assert sum((await _inflight(backend, route)).values()) == 1
    await _admit(backend, route)
    counts = await _inflight(backend, route)
    assert min(counts.values()) >= 0 and sum(counts.values()) == 2
    text = aioredis.Redis.from_url(redis_url, decode_responses=True)
    raw = await text.hgetall(route_keys(backend.key_prefix, "r")[0])
    await text.aclose()
    inflight = {str(k): int(str(v).split()[7]) for k, v in raw.items() if str(k)[0] != "#"}
    assert inflight == counts  # the stored counts were reconciled, not only the view
    await client.aclose()


@pytest.mark.parametrize("which", [0, 1, 2])
async def test_a_key_of_the_wrong_type_is_replaced_and_counted(
    state: tuple[RedisState, list[int]], redis_url: str, which: int
) -> None:
    backend, repairs = state
    route = _route(RoutingStrategy.latency_based())  # reads the window key too
    await _admit(backend, route)
    key = route_keys(backend.key_prefix, "r")[which]
    client = aioredis.Redis.from_url(redis_url)
    await client.set(key, "not what edgeroute wrote")
    admission = await _admit(backend, route)
    await backend.record(route, Outcome.for_admission(admission, OutcomeKind.SUCCESS, 5.0))
    assert repairs == [1]
    await _admit(backend, route)  # holds a lease, so every key exists again
    key_type = await client.type(key)
    assert key_type in ((b"zset", "zset") if which == 2 else (b"hash", "hash"))
    assert await client.pttl(key) > 0  # it expires again like every edgeroute key
    await client.aclose()


@pytest.mark.parametrize("which", [3, 4])
async def test_the_policy_keys_of_the_wrong_type_are_replaced_too(
    state: tuple[RedisState, list[int]], redis_url: str, which: int
) -> None:
    """The provider breakers' hash (scope provider) and the session pins (affinity)."""
    backend, repairs = state
    route = dataclasses.replace(
        _route(),
        breaker_scope="provider",
        affinity=AffinityParams("header", "x-s", 60_000, 10),
    )
    await backend.decide(route, session="s")
    key = spec_keys(backend.key_prefix, route)[which]
    client = aioredis.Redis.from_url(redis_url)
    await client.set(key, "not what edgeroute wrote")
    decision = await backend.decide(route, session="s")
    assert decision.admission is not None
    assert decision.affinity == ("new" if which == 4 else "kept")  # lost with the pins' key
    assert repairs == [1]
    assert await client.type(key) == (b"zset" if which == 4 else b"hash")
    assert (await backend.decide(route, session="s")).affinity == "kept"
    await client.aclose()
