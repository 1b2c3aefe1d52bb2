"""Provider quotas hold for the fleet: three real `edgeroute serve` replicas on one Redis.

Same machinery as tests/test_fleet.py (real processes, mock upstreams in this process that
count what they receive, the official `openai` SDK as client). Claims are exact counts from
the mocks (the most requests one ever held at once) and from explain.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from edgeroute.mock_provider import MockSettings
from tests.support.gateway import mock_upstreams
from tests.support.redis_servers import RedisServer
from tests.test_fleet import (
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
