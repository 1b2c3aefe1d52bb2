"""on_state_loss: what target quotas and client limits do while Redis is unreachable.

Redis here is a port nobody listens on (a real refused connection, no mock): every shared
call fails with StateUnavailable, the degraded-mode wrapper decides on local state, and the
client limits count locally; `live_replicas` stands for the count the fleet heartbeat last
saw (edgeroute/fleet.py: the same heartbeat /admin/fleet lists).
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.asyncio import Redis

from edgeroute import RoutingStrategy
from edgeroute.clients import Clients, ClientSpec
from edgeroute.mock_provider import MockSettings
from edgeroute.replicas import Replicas
from edgeroute.server import create_app
from edgeroute.state import FallbackState
from edgeroute.state.base import RouteSpec
from edgeroute.state.redis import RedisState
from edgeroute.types import TargetSpec
from tests.support.gateway import (
    gateway_config,
    get_json,
    loads,
    mock_upstreams,
    running_app,
    wait_until,
)
from tests.support.redis_servers import RedisServer, free_port


def unreachable() -> RedisState:
    return RedisState(f"redis://127.0.0.1:{free_port()}/0", timeout_ms=200)


def quota_route(policy: str) -> RouteSpec:
    return RouteSpec(
        name=f"route-{uuid.uuid4().hex[:8]}",
        strategy=RoutingStrategy.cost_based(),
        targets=(
            TargetSpec("t0", "p0", "m0", 1.0, rpm=6, on_state_loss=policy),
            TargetSpec("t1", "p1", "m1", 2.0),
        ),
    )


@pytest.mark.parametrize(
    ("policy", "served_by_t0"),
    [("local_share", 2), ("fail_open", 10), ("fail_closed", 0)],
)
async def test_target_quotas_while_redis_is_away(policy: str, served_by_t0: int) -> None:
    state = FallbackState(unreachable(), probe_min_s=60, probe_max_s=60)
    state.live_replicas = lambda: 3  # rpm 6 over three replicas: 2 each
    route = quota_route(policy)
    try:
        chosen = []
        for _ in range(10):
            decision = await state.decide(route)
            assert decision.admission is not None
            chosen.append(decision.admission.target_id)
        assert state.degraded
        assert chosen.count("t0") == served_by_t0
    finally:
        await state.close()


@pytest.mark.parametrize(
    ("policy", "admitted"), [("local_share", 3), ("fail_open", 12), ("fail_closed", 0)]
)
async def test_client_limits_while_redis_is_away(policy: str, admitted: int) -> None:
    redis = unreachable()
    clients = Clients(redis, lease_ttl_ms=60_000, replicas=Replicas(4))
    spec = ClientSpec("team", b"", rpm=12, on_state_loss=policy)
    try:
        verdicts = [(await clients.admit(spec, 0))[0] for _ in range(12)]
        assert sum(v.admitted for v in verdicts) == admitted
        if policy == "fail_closed":
            assert {v.reason for v in verdicts} == {"state_loss"}
    finally:
        await redis.close()


async def test_the_fleet_heartbeat_is_the_count_limits_share_by(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One heartbeat for /admin/fleet and local_share: two gateways on one real Redis see
    each other in both, under `{prefix:#fleet}` only; one leaves and the other counts 1."""
    monkeypatch.setenv("EDGEROUTE_HEARTBEAT_S", "0.2")
    prefix = f"hb-{uuid.uuid4().hex[:8]}"
    async with mock_upstreams(a=MockSettings()) as mocks:
        document = gateway_config(
            mocks,
            [{"model": "chat", "targets": [{"provider": "a", "model": "m"}]}],
            state={"redis_url": redis_url, "key_prefix": prefix},
            server={
                "admin_token": "admin",
                "clients": [{"name": "team", "key": "sk-team", "rpm": 10}],
            },
        )
        admin = {"Authorization": "Bearer admin"}

        async def counted(url: str, n: int) -> bool:
            _, ready = await get_json(f"{url}/readyz")
            _, view = await get_json(f"{url}/admin/fleet", headers=admin)
            return bool(ready["live_replicas"] == n and len(view["replicas"]) == n)

        async with running_app(create_app(loads(document))) as url:
            async with running_app(create_app(loads(document))):
                await wait_until(lambda: counted(url, 2), timeout=10)
                _, ready = await get_json(f"{url}/readyz")
                assert ready["on_state_loss"] == ["local_share"]
                redis = Redis.from_url(redis_url)
                try:
                    keys = {k.decode() async for k in redis.scan_iter(f"{{{prefix}:*")}
                finally:
                    await redis.aclose()
                assert keys and all(k.startswith(f"{{{prefix}:#fleet}}:") for k in keys), keys
            await wait_until(lambda: counted(url, 1), timeout=10)


def test_a_replica_share_of_a_limit() -> None:
    replicas = Replicas()
    assert replicas.live == 1 and replicas.share(100) == 100
    replicas.seen(3)
    assert replicas.share(100) == 33
    assert replicas.share(2) == 1  # never 0: 0 would mean no limit
    replicas.seen(0)  # a read that found none (this one's own beat expired): still one
    assert replicas.live == 1


async def test_a_settle_lost_to_a_redis_blip_is_replayed_when_redis_answers(
    redis_server: RedisServer,
) -> None:
    """A client's request admitted on Redis and finished while Redis is paused: its lease and
    spend reach Redis once it answers again, instead of the lease holding a concurrency slot
    until it expires (state.lease_ttl_s, 15 minutes by default) and the spend being lost to
    the fleet's budget."""
    redis = RedisState(redis_server.url, key_prefix=f"blip-{uuid.uuid4().hex[:8]}", timeout_ms=200)
    clients = Clients(redis, lease_ttl_ms=900_000)
    spec = ClientSpec("team", b"", max_concurrency=1, budget_micro=10_000_000)
    try:
        verdict, lease = await clients.admit(spec, 10)
        assert verdict.admitted and lease is not None
        # Out of memory: Redis refuses every script that writes (a paused server would run
        # the queued call on resuming, which is no loss at all).
        admin = Redis.from_url(redis_server.url)
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", "1")
        try:
            await clients.settle(lease, 10, 0.25)
            seen = await clients.read(spec)
            assert seen.inflight == 1  # read-only: still answers, the lease still held
        finally:
            await admin.config_set("maxmemory", "0")
            await admin.aclose()
        for _ in range(50):  # the replay runs off the request path
            seen = await clients.read(spec)
            if seen.inflight == 0:
                break
            await asyncio.sleep(0.05)
        assert (seen.inflight, seen.spent_micro) == (0, 250_000), seen
        verdict, lease = await clients.admit(spec, 10)
        assert verdict.admitted, verdict
    finally:
        await redis.close()
