"""Provider quotas hold for the fleet: three real `edgeroute serve` replicas on one Redis.

Same machinery as tests/test_fleet.py (real processes, mock upstreams in this process that
count what they receive, the official `openai` SDK as client). Claims are exact counts from
the mocks (the most requests one ever held at once) and from explain.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from edgeroute.mock_provider import MockSettings
from tests.support.gateway import GatewayProcess, Mock, get_json, mock_upstreams, wait_until
from tests.support.redis_servers import RedisServer, free_port
from tests.test_fleet import (
    ADMIN_TOKEN,
    MESSAGES,
    Replica,
    fleet,
    fleet_config,
    route,
    settled,
    spread,
    target,
)

pytestmark = pytest.mark.slow


async def test_a_max_concurrency_target_never_sees_more_from_the_fleet(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """60 requests at once over three replicas: the capped target holds 4, never a 5th;
    the rest go to the next target, and every request is served."""
    async with mock_upstreams(
        capped=MockSettings(latency_ms=300), spare=MockSettings(latency_ms=300)
    ) as mocks:
        document = fleet_config(
            mocks,
            [
                route(
                    "chat",
                    "cost",
                    [{**target("capped", 1.0), "max_concurrency": 4}, target("spare", 2.0)],
                )
            ],
            redis_server,
        )
        async with fleet(document, tmp_path) as replicas:
            served = await asyncio.gather(
                *(replica.chat("chat") for replica in replicas for _ in range(20))
            )
            assert len(served) == 60
            capped = await mocks["capped"].stats()
            assert capped["peak_in_flight"] == 4
            counts = spread(served)
            assert counts["capped"] + counts["spare"] == 60
            assert counts["capped"] >= 4
            await settled(replicas[0], "chat")


async def chat_once(replica: Replica) -> str:
    raw = await replica.client.chat.completions.with_raw_response.create(
        model="chat", messages=MESSAGES, max_tokens=1
    )
    raw.parse()
    return str(raw.headers["x-edgeroute-provider"])


async def test_a_tpm_target_hands_over_when_spent_and_returns_after_the_window(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Requests one after another over all replicas: the metered target serves until its
    tokens of the minute are spent (real usage, corrected at record), then the next target
    serves, and the metered one is back once explain says its window has freed."""
    async with mock_upstreams(metered=MockSettings(), spare=MockSettings()) as mocks:
        document = fleet_config(
            mocks,
            [route("chat", "cost", [{**target("metered", 1.0), "tpm": 200}, target("spare", 2.0)])],
            redis_server,
        )
        async with fleet(document, tmp_path) as replicas:
            first_sent = time.monotonic()
            providers = []
            for i in range(40):
                providers.append(await chat_once(replicas[i % 3]))
                await settled(replicas[0], "chat")  # each usage corrected before the next
            switched = providers.index("spare")
            assert switched > 1
            assert set(providers[:switched]) == {"metered"}
            assert set(providers[switched:]) == {"spare"}
            # Every replica sees the same spent quota: keep asking, round the fleet, until
            # the metered target is back; its first tokens stop counting 61-62 s after they
            # were admitted (1 s buckets), so it is back by then and not before its minute.
            back = ""
            while back != "metered":
                await asyncio.sleep(1.0)
                back = await chat_once(replicas[len(providers) % 3])
                providers.append(back)
                assert time.monotonic() - first_sent < 64.0, providers
            assert time.monotonic() - first_sent >= 60.0
            assert (await mocks["metered"].requests()) == switched + 1


async def test_every_target_at_quota_is_a_429_with_retry_after(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with mock_upstreams(only=MockSettings()) as mocks:
        document = fleet_config(
            mocks, [route("chat", "cost", [{**target("only", 1.0), "rpm": 2}])], redis_server
        )
        async with fleet(document, tmp_path, replicas=2) as replicas:
            await chat_once(replicas[0])
            await chat_once(replicas[1])
            with pytest.raises(openai.RateLimitError) as caught:
                await chat_once(replicas[0])
            error: Any = caught.value.body
            assert error["code"] == "rate_limit_exceeded"
            retry_after = int(caught.value.response.headers["Retry-After"])
            assert 1 <= retry_after <= 61
            assert await mocks["only"].requests() == 2
            explained = await replicas[1].target("chat", "only")
            assert explained["excluded"] == "quota_rpm"


# ---- client keys -----------------------------------------------------------------------------


def client_fleet_config(mocks: Mapping[str, Mock], redis: RedisServer, **client: Any) -> Any:
    document = fleet_config(
        mocks,
        [
            route("chat", "cost", [{**target("only", 0.0), "output_cost_per_mtok": 100_000.0}]),
            route("other", "cost", [target("only", 0.0)]),
        ],
        redis,
    )
    document["server"]["clients"] = [{"name": "team", "key": "sk-team", **client}]
    return document


async def settled_spend(replica: Replica, usd: float) -> None:
    """The spend is settled off the request path: wait until the fleet's count has it."""

    async def landed() -> bool:
        status, listed = await get_json(
            f"{replica.url}/admin/clients", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        assert status == 200
        return bool(abs(listed["clients"][0]["budget"]["spent_usd"] - usd) < 1e-6)

    await wait_until(landed, timeout=15.0, interval=0.02)


def team_client(replica: Replica) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{replica.url}/v1", api_key="sk-team", max_retries=0, timeout=60
    )


async def test_a_client_with_rpm_100_gets_exactly_100_from_three_replicas(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with mock_upstreams(only=MockSettings(latency_ms=20)) as mocks:
        document = client_fleet_config(mocks, redis_server, rpm=100)
        async with fleet(document, tmp_path) as replicas:
            sdks = [team_client(replica) for replica in replicas]

            async def one(sdk: openai.AsyncOpenAI) -> str:
                try:
                    await sdk.chat.completions.create(model="chat", messages=MESSAGES)
                except openai.RateLimitError as exc:
                    body: Any = exc.body
                    assert body["code"] == "rate_limit_exceeded"
                    headers = exc.response.headers
                    assert 1 <= int(headers["Retry-After"]) <= 61
                    assert headers["x-ratelimit-limit-requests"] == "100"
                    assert headers["x-ratelimit-remaining-requests"] == "0"
                    assert headers["x-ratelimit-reset-requests"].endswith("s")
                    return "429"
                return "200"

            outcomes = await asyncio.gather(*(one(sdks[i % 3]) for i in range(300)))
            assert outcomes.count("200") == 100
            assert outcomes.count("429") == 200
            assert await mocks["only"].requests() == 100
            for sdk in sdks:
                await sdk.close()
            status, listed = await get_json(
                f"{replicas[0].url}/admin/clients",
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            )
            assert status == 200
            (team,) = listed["clients"]
            assert team["name"] == "team" and "key" not in team
            assert (team["requests"]["used"], team["requests"]["remaining"]) == (100, 0)


async def test_a_budget_runs_out_mid_stream_and_routes_are_restricted(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Each answer's completion tokens cost real money at the serving target's price: the
    budget admits requests while any is left, then every replica says insufficient_quota."""
    async with mock_upstreams(only=MockSettings()) as mocks:
        document = client_fleet_config(
            mocks, redis_server, budget={"usd": 2.0, "period": "day"}, routes=["chat"]
        )
        async with fleet(document, tmp_path) as replicas:
            sdks = [team_client(replica) for replica in replicas]
            with pytest.raises(openai.NotFoundError):
                await sdks[0].chat.completions.create(model="other", messages=MESSAGES)
            served = 0
            spent = 0.0
            for i in range(200):
                sdk = sdks[i % 3]
                try:
                    completion = await sdk.chat.completions.create(model="chat", messages=MESSAGES)
                except openai.RateLimitError as exc:
                    body: Any = exc.body
                    assert body["code"] == "insufficient_quota"
                    assert int(exc.response.headers["Retry-After"]) >= 1
                    break
                served += 1
                assert completion.usage is not None
                last = completion.usage.completion_tokens * 0.1
                spent += last
                await settled_spend(replicas[i % 3], spent)
            else:
                raise AssertionError("the budget never ran out")
            # Admitted while under budget, refused from the first request after it.
            assert spent >= 2.0 and spent - last < 2.0
            for sdk in sdks:
                with pytest.raises(openai.RateLimitError):
                    await sdk.chat.completions.create(model="chat", messages=MESSAGES)
                await sdk.close()
            assert await mocks["only"].requests() == served


# ---- Redis killed mid-run ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "admitted"), [("local_share", 10), ("fail_open", 30), ("fail_closed", 0)]
)
async def test_redis_killed_mid_run_each_on_state_loss_policy(
    redis_server: RedisServer, tmp_path: Path, policy: str, admitted: int
) -> None:
    """Three replicas learn from heartbeats that they are three; Redis dies; a client with
    rpm 30 then gets, from one replica: its share (10), everything (fail_open) or nothing
    (fail_closed, 503)."""
    async with mock_upstreams(only=MockSettings()) as mocks:
        document = client_fleet_config(mocks, redis_server, rpm=30, on_state_loss=policy)
        document["state"]["timeout_ms"] = 300
        gateways = [
            GatewayProcess(
                document, tmp_path, port=free_port(), env={"EDGEROUTE_LOG_LEVEL": "ERROR"}
            )
            for _ in range(3)
        ]
        try:
            await asyncio.gather(*(asyncio.to_thread(g.wait_ready, 60.0) for g in gateways))

            async def three() -> bool:
                for gateway in gateways:
                    _, ready = await get_json(f"{gateway.url}/readyz")
                    if ready.get("live_replicas") != 3 or ready["on_state_loss"] != [policy]:
                        return False
                return True

            await wait_until(three, timeout=20.0, interval=0.2)
            redis_server.kill()
            statuses = []
            async with aiohttp.ClientSession() as session:
                for _ in range(30):
                    async with session.post(
                        f"{gateways[0].url}/v1/chat/completions",
                        json={"model": "chat", "messages": MESSAGES},
                        headers={"Authorization": "Bearer sk-team"},
                    ) as response:
                        await response.read()
                        statuses.append(response.status)
            assert statuses.count(200) == admitted, statuses
            refused = (
                {429} if policy == "local_share" else {503} if policy == "fail_closed" else set()
            )
            assert set(statuses) - {200} == refused
            _, ready = await get_json(f"{gateways[0].url}/readyz")
            assert ready["live_replicas"] == 3  # the last count seen
        finally:
            for gateway in gateways:
                gateway.kill()
