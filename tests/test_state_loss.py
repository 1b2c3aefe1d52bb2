"""on_state_loss: what target quotas and client limits do while Redis is unreachable.

Redis here is a port nobody listens on (a real refused connection, no mock): every shared
call fails with StateUnavailable, the degraded-mode wrapper decides on local state, and the
client limits count locally; `live_replicas` stands for the count heartbeats last saw.
"""

from __future__ import annotations

import uuid

import pytest

from edgeroute import RoutingStrategy
from edgeroute.clients import Clients, ClientSpec
from edgeroute.replicas import Replicas
from edgeroute.state import FallbackState
from edgeroute.state.base import RouteSpec
from edgeroute.state.redis import RedisState
from edgeroute.types import TargetSpec
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


class _Replicas(Replicas):
    def __init__(self, live: int) -> None:
        super().__init__(None)
        self.live = live


@pytest.mark.parametrize(
    ("policy", "admitted"), [("local_share", 3), ("fail_open", 12), ("fail_closed", 0)]
)
async def test_client_limits_while_redis_is_away(policy: str, admitted: int) -> None:
    redis = unreachable()
    clients = Clients(redis, lease_ttl_ms=60_000, replicas=_Replicas(4))
    spec = ClientSpec("team", b"", rpm=12, on_state_loss=policy)
    try:
        verdicts = [(await clients.admit(spec, 0))[0] for _ in range(12)]
        assert sum(v.admitted for v in verdicts) == admitted
        if policy == "fail_closed":
            assert {v.reason for v in verdicts} == {"state_loss"}
    finally:
        await redis.close()


async def test_heartbeats_count_the_live_replicas(redis_server: RedisServer) -> None:
    prefix = f"hb-{uuid.uuid4().hex[:8]}"
    states = [RedisState(redis_server.url, key_prefix=prefix) for _ in range(3)]
    replicas = [Replicas(state) for state in states]
    try:
        for replica in replicas:
            await replica.beat()
        await replicas[0].beat()
        assert [r.live for r in replicas] == [3, 2, 3]
        assert replicas[0].share(100) == 33
        # Redis gone: the last count seen is kept.
        gone = Replicas(unreachable())
        gone.live = 3
        await gone.beat()
        assert gone.live == 3
    finally:
        for state in states:
            await state.close()
