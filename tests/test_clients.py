"""Client limits (server.clients[]): lua/client.lua against its reference model MemoryClients,
on one virtual clock, over memory, fakeredis, a real Redis and a real Redis Cluster."""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest

from edgeroute.clients import ClientLease, Clients, ClientSpec, MemoryClients, identify
from edgeroute.mock_provider import MockSettings
from edgeroute.state.base import RouteSpec
from edgeroute.state.redis import RedisState
from edgeroute.strategy import RoutingStrategy
from edgeroute.types import TargetSpec
from tests.support.backends import VirtualClock, redis_url_for, table
from tests.support.gateway import gateway_config, mock_upstreams, running_gateway

# 2027-01-31T23:59:00Z: a minute before both a day and a month end.
START = float(calendar.timegm((2027, 1, 31, 23, 59, 0)))


@dataclass
class Harness:
    clients: Clients
    clock: VirtualClock

    def wait(self, ms: float) -> None:
        self.clock.advance(ms)


@pytest.fixture(params=table(("memory", "fakeredis", "redis", "cluster")))
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    clock = VirtualClock(START)
    redis = None
    if request.param != "memory":
        redis = RedisState(
            redis_url_for(request.param, request),
            key_prefix=f"c-{uuid.uuid4().hex[:10]}",
            timeout_ms=2000,
            clock=clock,
        )
    yield Harness(Clients(redis, lease_ttl_ms=60_000, clock=clock), clock)
    if redis is not None:
        await redis.close()


def spec(**limits: object) -> ClientSpec:
    return ClientSpec(name=f"team-{uuid.uuid4().hex[:6]}", digest=b"", **limits)  # type: ignore[arg-type]


async def admitted(h: Harness, client: ClientSpec, tokens: int = 0) -> ClientLease:
    verdict, lease = await h.clients.admit(client, tokens)
    assert verdict.admitted and lease is not None, verdict
    return lease


async def test_rpm_admits_exactly_the_limit_then_says_when(harness: Harness) -> None:
    client = spec(rpm=3)
    for _ in range(3):
        await admitted(harness, client)
    verdict, lease = await harness.clients.admit(client, 0)
    assert lease is None and verdict.reason == "rpm"
    assert (verdict.requests, verdict.wait_ms) == (3, 61_000)
    harness.wait(61_000)
    await admitted(harness, client)


async def test_tpm_reserves_then_settles_with_real_usage(harness: Harness) -> None:
    client = spec(tpm=1000)
    lease = await admitted(harness, client, tokens=800)
    verdict, refused = await harness.clients.admit(client, 300)
    assert refused is None and verdict.reason == "tpm"
    await harness.clients.settle(lease, 100, 0.0)
    await admitted(harness, client, tokens=900)
    assert (await harness.clients.read(client)).tokens == 1000


async def test_concurrency_counts_unsettled_leases(harness: Harness) -> None:
    client = spec(max_concurrency=2)
    first = await admitted(harness, client)
    await admitted(harness, client)
    verdict, refused = await harness.clients.admit(client, 0)
    assert refused is None and verdict.reason == "concurrency"
    await harness.clients.settle(first, 0, 0.0)
    await admitted(harness, client)
    # A replica that never settles does not hold a slot beyond the lease TTL.
    harness.wait(60_001)
    assert (await harness.clients.read(client)).inflight == 0


async def test_a_budget_runs_out_and_renews_with_the_period(harness: Harness) -> None:
    daily = spec(budget_micro=1_000_000, period="day")
    monthly = spec(budget_micro=1_000_000, period="month")
    for client in (daily, monthly):
        lease = await admitted(harness, client)
        await harness.clients.settle(lease, 10, 0.6)
        lease = await admitted(harness, client)  # 0.6 < 1.0: still in
        await harness.clients.settle(lease, 10, 0.6)
        verdict, refused = await harness.clients.admit(client, 0)
        assert refused is None and verdict.reason == "budget"
        assert verdict.spent_micro == 1_200_000
        assert verdict.wait_ms == 60_000  # both end at midnight, 2027-02-01
    harness.wait(60_000)
    for client in (daily, monthly):
        assert (await harness.clients.read(client)).spent_micro == 0
        await admitted(harness, client)


async def test_a_month_is_a_calendar_month(harness: Harness) -> None:
    monthly = spec(budget_micro=1, period="month")
    harness.wait(60_000)  # 2027-02-01T00:00:00Z: February has 28 days
    verdict = await harness.clients.read(monthly)
    assert verdict.period_end_ms == 28 * 86_400_000


async def test_leases_of_a_replica_that_died_stop_counting_as_they_expire(
    harness: Harness,
) -> None:
    """Leases never settled (their replica died) count until their own expiry, each at its
    own time; a lease expiring exactly now no longer counts."""
    client = spec(max_concurrency=3)
    await admitted(harness, client)
    harness.wait(30_000)
    await admitted(harness, client)
    await admitted(harness, client)
    verdict, refused = await harness.clients.admit(client, 0)
    assert refused is None and (verdict.reason, verdict.inflight) == ("concurrency", 3)
    harness.wait(30_000)  # the first lease's expiry, to the millisecond
    assert (await harness.clients.read(client)).inflight == 2
    await admitted(harness, client)
    harness.wait(29_999)
    assert (await harness.clients.read(client)).inflight == 3
    harness.wait(1)
    assert (await harness.clients.read(client)).inflight == 1
    harness.wait(30_000)
    assert (await harness.clients.read(client)).inflight == 0
    for _ in range(3):
        await admitted(harness, client)


async def test_a_settle_of_an_unknown_token_releases_nothing_and_counts_its_spend(
    harness: Harness,
) -> None:
    client = spec(max_concurrency=2)
    await admitted(harness, client)
    stranger = ClientLease(client, "never-admitted", 0, 0)
    await harness.clients.settle(stranger, 0, 0.25)
    seen = await harness.clients.read(client)
    assert (seen.inflight, seen.spent_micro) == (1, 250_000)


async def test_a_lease_settled_twice_is_released_once(harness: Harness) -> None:
    """As the reference model: the lease goes once; each settle is an event, so its spend
    and its token correction count each time (never below zero)."""
    client = spec(max_concurrency=2, tpm=1000)
    lease = await admitted(harness, client, tokens=500)
    other = await admitted(harness, client, tokens=100)
    for _ in range(2):
        await harness.clients.settle(lease, 100, 0.5)
    seen = await harness.clients.read(client)
    assert (seen.inflight, seen.requests, seen.spent_micro) == (1, 2, 1_000_000)
    assert seen.tokens == 0  # 500 + 100 in one bucket, corrected by -400 twice: floor 0
    await harness.clients.settle(other, 100, 0.0)
    assert (await harness.clients.read(client)).inflight == 0


async def test_a_minute_of_traffic_matches_the_reference_model_verdict_by_verdict(
    harness: Harness,
) -> None:
    """Every limit on, a seeded mix of admits, late settles (corrections in older buckets,
    up and down, some after their bucket aged out), lease expiries and pauses over three
    minutes: each backend answers exactly what MemoryClients answers."""
    rng = random.Random(20270131)
    model = MemoryClients(harness.clock)
    # Tuned so that every limit refuses some admits (rpm, tpm, concurrency, budget).
    client = spec(rpm=10, tpm=3_000, max_concurrency=5, budget_micro=5_000_000)
    held: list[tuple[ClientLease, ClientLease]] = []
    for step in range(400):
        if held and rng.random() < 0.45:
            lease, twin = held.pop(rng.randrange(len(held)))
            used, cost = rng.randrange(0, 600), rng.randrange(0, 100_000)
            await harness.clients.settle(lease, used, cost / 1e6)
            model.settle_now(twin, used, cost)
            got, want = await harness.clients.read(client), model.read_now(client)
        else:
            tokens = rng.randrange(0, 900)
            got, new = await harness.clients.admit(client, tokens)
            want = model.admit_now(client, new.token if new else "-", tokens, 60_000)
            if new is not None:
                held.append((new, ClientLease(client, new.token, want.reserved, want.now_ms)))
        assert got == want, (step, got, want)
        harness.wait(rng.choice((0, 7, 250, 999, 1_000, 2_500, 4_000, 11_000)))


def test_identify_compares_digests_of_every_key() -> None:
    a = ClientSpec("a", hashlib.sha256(b"key-a").digest())
    b = ClientSpec("b", hashlib.sha256(b"key-b").digest())
    assert identify("key-b", [a, b]) is b
    assert identify("key-c", [a, b]) is None
    assert identify(None, [a, b]) is None


# ---- the gateway, in one process on MemoryState (the fleet tests run them on Redis) ---------


async def test_gateway_keys_clients_and_plain_api_keys_side_by_side() -> None:
    async with mock_upstreams(up=MockSettings()) as mocks:
        document = gateway_config(
            mocks,
            [
                {"model": "chat", "targets": [{"provider": "up", "model": "m"}]},
                {"model": "other", "targets": [{"provider": "up", "model": "m"}]},
            ],
            server={
                "api_keys": ["sk-unlimited"],
                "admin_token": "admin",
                "clients": [
                    {
                        "name": "team",
                        "key": "sha256:" + hashlib.sha256(b"sk-team").hexdigest(),
                        "rpm": 2,
                        "routes": ["chat"],
                    }
                ],
            },
        )
        body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
        async with running_gateway(document) as (url, _), aiohttp.ClientSession() as session:

            async def post(key: str, model: str = "chat") -> aiohttp.ClientResponse:
                async with session.post(
                    f"{url}/v1/chat/completions",
                    json={**body, "model": model},
                    headers={"Authorization": f"Bearer {key}"},
                ) as response:
                    await response.read()
                    return response

            assert (await post("sk-nobody")).status == 401
            assert (await post("sk-team", "other")).status == 404
            assert [(await post("sk-team")).status for _ in range(3)] == [200, 200, 429]
            refused = await post("sk-team")
            assert refused.headers["x-ratelimit-limit-requests"] == "2"
            assert refused.headers["x-ratelimit-remaining-requests"] == "0"
            assert [(await post("sk-unlimited")).status for _ in range(3)] == [200, 200, 200]
            async with session.get(
                f"{url}/admin/clients", headers={"Authorization": "Bearer admin"}
            ) as response:
                listed = await response.json()
            assert listed["clients"][0]["requests"] == {"limit": 2, "used": 2, "remaining": 0}
            async with session.get(f"{url}/metrics") as response:
                text = await response.text()
            assert 'edgeroute_client_requests_total{client="team",outcome="rpm"} 2.0' in text
            assert "sk-team" not in text


async def test_settle_soon_gives_the_lease_back_without_waiting(harness: Harness) -> None:
    """The request path settles without awaiting (nor a task per request, on one server):
    the call is queued at once and the lease is free when its reply is in."""
    client = spec(max_concurrency=1)
    lease = await admitted(harness, client)
    assert not (await harness.clients.admit(client, 0))[0].admitted
    harness.clients.settle_soon(lease, 0, 0.0)
    for _ in range(200):
        if (await harness.clients.read(client)).inflight == 0:
            break
        await asyncio.sleep(0.01)
    await admitted(harness, client)


async def test_a_clients_admit_and_the_routes_decide_share_one_round_trip(redis_url: str) -> None:
    """begin_admit queues the client's call before the decide's: one pipelined write, one
    round trip, no gather and no task (issue 12: client limits cost a second EVALSHA)."""
    state = RedisState(redis_url, key_prefix=f"c-{uuid.uuid4().hex[:10]}", timeout_ms=2000)
    clients = Clients(state, lease_ttl_ms=60_000)
    route = RouteSpec(
        name="r",
        strategy=RoutingStrategy.cost_based(),
        targets=(TargetSpec("t", "p", "m"),),
        lease_ttl_ms=60_000,
        idle_ttl_ms=60_000,
    )
    try:
        await state.ping()  # connected and scripts loaded: only the two calls remain
        before = state.batches
        tasks = len(asyncio.all_tasks())
        admitting = clients.begin_admit(spec(rpm=10), 5)
        decision = await state.decide(route)
        assert len(asyncio.all_tasks()) == tasks
        verdict, lease = await clients.finish_admit(admitting)
        assert state.batches == before + 1
        assert decision.admission is not None
        assert verdict.admitted and lease is not None and verdict.requests == 1
    finally:
        await state.close()


async def test_a_client_restricted_to_a_route_follows_its_operator_chosen_fallbacks() -> None:
    """`routes` says which models a client may *name*; a fallback chain is the operator's
    choice for that model, so a request the client was allowed to make may be served by a
    route the client could not ask for directly (and is charged at that route's price)."""
    async with mock_upstreams(sick=MockSettings(error_rate=1.0), spare=MockSettings()) as mocks:
        document = gateway_config(
            mocks,
            [
                {
                    "model": "chat",
                    "targets": [{"provider": "sick", "model": "m"}],
                    "fallbacks": ["backup"],
                },
                {"model": "backup", "targets": [{"provider": "spare", "model": "m"}]},
            ],
            server={
                "clients": [
                    {"name": "team", "key": "sk-team", "rpm": 100, "routes": ["chat"]},
                ],
            },
        )
        body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
        async with running_gateway(document) as (url, _), aiohttp.ClientSession() as session:

            async def post(model: str) -> aiohttp.ClientResponse:
                async with session.post(
                    f"{url}/v1/chat/completions",
                    json={**body, "model": model},
                    headers={"Authorization": "Bearer sk-team"},
                ) as response:
                    await response.read()
                    return response

            direct = await post("backup")
            assert direct.status == 404
            assert await mocks["spare"].requests() == 0
            served = await post("chat")
            assert served.status == 200
            assert served.headers["x-edgeroute-route"] == "backup"
            assert await mocks["spare"].requests() == 1
