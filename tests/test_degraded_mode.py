"""Degraded mode comes back only when shared state really works, once per event, and only
for the routes whose part of shared state is away (issue 9 item 9, issue 16 item 2).

Real servers: a Redis out of memory (answers PING, refuses every script that writes) and a
Redis Cluster with one primary frozen (SIGSTOP) while the others serve.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid

import pytest
import redis
from redis.crc import key_slot

from edgeroute import RoutingStrategy
from edgeroute.state import RedisState
from edgeroute.state.base import RouteSpec
from edgeroute.state.fallback import FallbackState
from edgeroute.state.redis import route_keys
from edgeroute.types import Outcome, OutcomeKind
from tests.support.redis_servers import RedisCluster, RedisServer
from tests.test_state_conformance import make_route

pytestmark = pytest.mark.usefixtures("redis_server_binary")


async def _serve(state: FallbackState, route: RouteSpec) -> None:
    decision = await state.decide(route)
    assert decision.admission is not None  # served, shared or local
    await state.record(route, Outcome.for_admission(decision.admission, OutcomeKind.SUCCESS, 2.0))


async def _traffic(state: FallbackState, routes: list[RouteSpec], seconds: float) -> int:
    """Rounds of one decision per route until `seconds` have passed; returns the rounds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    rounds = 0
    while loop.time() < end:
        for route in routes:
            await _serve(state, route)
        rounds += 1
        await asyncio.sleep(0.02)
    return rounds


async def test_out_of_memory_redis_is_one_degraded_spell_not_a_flapping_one(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    changes: list[bool] = []
    primary = RedisState(redis_server.url, key_prefix=f"oom-{uuid.uuid4().hex[:6]}")
    state = FallbackState(primary, probe_min_s=0.02, probe_max_s=0.1, on_change=changes.append)
    route = make_route(RoutingStrategy.round_robin())
    client = redis.Redis.from_url(redis_server.url)
    try:
        await _serve(state, route)
        assert not state.degraded
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", "1")  # always over: every write is refused
        assert client.ping()  # PING still answers: it must not pass for "back"
        with caplog.at_level(logging.WARNING, logger="edgeroute.state"):
            await _traffic(state, [route], 1.5)
            assert state.degraded
            assert changes == [True]
            client.config_set("maxmemory", "0")
            await _traffic(state, [route], 1.0)
        assert changes == [True, False]
        lines = [r.getMessage() for r in caplog.records if r.name == "edgeroute.state"]
        assert sum("unavailable" in line for line in lines) == 1, lines
        assert sum("is back" in line for line in lines) == 1, lines
    finally:
        client.config_set("maxmemory", "0")
        await state.close()


async def test_a_flapping_shard_stays_degraded_longer_each_time(
    redis_server: RedisServer,
) -> None:
    changes: list[bool] = []
    primary = RedisState(redis_server.url, key_prefix=f"flap-{uuid.uuid4().hex[:6]}")
    state = FallbackState(
        primary,
        probe_min_s=0.02,
        probe_max_s=0.05,
        flap_dwell_s=0.6,
        on_change=changes.append,
    )
    route = make_route()
    loop = asyncio.get_running_loop()
    try:
        spells = []
        for _ in range(3):
            began = loop.time()  # the spell starts a little after this, on the first call
            redis_server.pause()
            await _traffic(state, [route], 0.3)
            redis_server.resume()
            while state.degraded:
                await _serve(state, route)
                await asyncio.sleep(0.01)
            spells.append(loop.time() - began)
        assert changes == [True, False] * 3
        # Each quick relapse stays degraded at least twice as long as the one before.
        assert spells[1] >= 0.6 and spells[2] >= 1.2, spells
    finally:
        redis_server.resume()
        await state.close()


async def test_a_frozen_cluster_node_sends_only_its_routes_to_local_state(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with RedisCluster(primaries=3) as cluster:
        url = "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in cluster.startup_nodes)
        prefix = f"part-{uuid.uuid4().hex[:6]}"
        changes: list[bool] = []
        # Roomy: a healthy node must never time out here, even on a loaded machine.
        primary = RedisState(url, key_prefix=prefix, timeout_ms=500)
        state = FallbackState(primary, probe_min_s=0.02, probe_max_s=0.2, on_change=changes.append)
        routes = [make_route(RoutingStrategy.round_robin()) for _ in range(12)]
        owner = {}
        client = redis.Redis(host=cluster.startup_nodes[0][0], port=cluster.startup_nodes[0][1])
        slots = client.execute_command("CLUSTER SLOTS")
        for route in routes:
            slot = key_slot(route_keys(prefix, route.name)[0].encode())
            for start, end, node, *_ in slots:
                if start <= slot <= end:
                    owner[route.name] = int(node[1])
        frozen_port = owner[routes[0].name]
        frozen = next(n for n in cluster.nodes if n.port == frozen_port)
        broken = [r for r in routes if owner[r.name] == frozen_port]
        healthy = [r for r in routes if owner[r.name] != frozen_port]
        assert healthy, "12 routes all on one node"
        try:
            rounds = await _traffic(state, routes, 0.2)
            assert changes == []
            with caplog.at_level(logging.WARNING, logger="edgeroute.state"):
                frozen.pause()
                rounds += await _traffic(state, routes, 3.0)
                assert changes == [True]  # one spell, no flapping
                degraded = set(state.degraded_shards)
                assert degraded == {
                    key_slot(route_keys(prefix, r.name)[0].encode()) for r in broken
                }
                # The healthy routes kept shared state: every decision moved their cursor
                # in Redis (the next request takes rounds + 1).
                for route in healthy:
                    snapshot = await primary.snapshot(route)
                    assert snapshot.rr_cursor == rounds + 1
                frozen.resume()
                await _traffic(state, routes, 1.5)
            assert changes == [True, False]
            lines = [r.getMessage() for r in caplog.records if r.name == "edgeroute.state"]
            named = [
                int(m.group(1))
                for m in map(re.compile(r"unavailable for slot (\d+)").search, lines)
                if m
            ]
            assert sorted(named) == sorted(degraded), lines  # each broken slot once, no other
        finally:
            frozen.resume()
            await state.close()
