"""A route's slot in migration must not refuse its scripts (issue 16, item 3).

Redis answers a multi-key command on a migrating or importing slot with TRYAGAIN when only
some of its keys exist on the node; a route with nothing in flight used to have no lease
set, so every call failed for the whole migration. The three keys of a route now exist
together (placeholders, one shared TTL), so calls run on the source until the keys move and
follow ASK to the target afterwards. Real Redis Cluster."""

from __future__ import annotations

import uuid

import redis
from redis.crc import key_slot

from edgeroute import RoutingStrategy
from edgeroute.state import RedisState
from edgeroute.state.redis import route_keys
from edgeroute.types import Outcome, OutcomeKind
from tests.support.redis_servers import RedisCluster
from tests.test_redis_topologies import cluster_url, node_id, node_of
from tests.test_state_conformance import make_route


async def _serve_one(state: RedisState, route: object) -> str:
    decision = await state.decide(route)  # type: ignore[arg-type]
    assert decision.admission is not None
    await state.record(
        route,  # type: ignore[arg-type]
        Outcome.for_admission(decision.admission, OutcomeKind.SUCCESS, 4.0),
    )
    return decision.target_id


async def test_an_idle_route_keeps_working_while_its_slot_migrates(
    redis_cluster: RedisCluster,
) -> None:
    prefix = f"mig-{uuid.uuid4().hex[:6]}"
    # A short timeout: TRYAGAIN retried until it runs out would be a degraded spell.
    state = RedisState(cluster_url(redis_cluster), key_prefix=prefix, timeout_ms=500)
    route = make_route(RoutingStrategy.round_robin())
    await _serve_one(state, route)  # nothing left in flight
    keys = route_keys(prefix, route.name)
    slot = key_slot(keys[0].encode())
    source = node_of(redis_cluster, slot)
    target = next(addr for addr in redis_cluster.startup_nodes if addr != source)
    source_client = redis.Redis(host=source[0], port=source[1])
    target_client = redis.Redis(host=target[0], port=target[1])
    assert source_client.exists(*keys) == 3  # all three exist, though nothing is in flight
    target_client.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", node_id(*source))
    source_client.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", node_id(*target))
    try:
        # Held in migration with the keys still on the source: served there.
        served = [await _serve_one(state, route) for _ in range(6)]
        assert sorted(served) == ["t0", "t0", "t1", "t1", "t2", "t2"]
        source_client.execute_command("MIGRATE", target[0], target[1], "", 0, 5000, "KEYS", *keys)
        # Keys moved, slot still migrating: ASK to the importing node, state intact.
        served = [await _serve_one(state, route) for _ in range(3)]
        assert sorted(served) == ["t0", "t1", "t2"]
        assert (await state.snapshot(route)).rr_cursor == 11
    finally:
        for host, port in redis_cluster.startup_nodes:
            redis.Redis(host=host, port=port).execute_command(
                "CLUSTER SETSLOT", slot, "NODE", node_id(*target)
            )
        await state.close()
