"""Traffic policies across a fleet (issue 11): three real `edgeroute serve` replicas on one
Redis (and a Redis Cluster where slots matter), mock upstreams in this process, the official
`openai` SDK as the client. Every claim is an exact count: what each mock received, what
the clients got back (`x-edgeroute-*` headers), what explain and /metrics say."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edgeroute.mock_provider import MockSettings
from tests.support.gateway import mock_upstreams, wait_until
from tests.support.redis_servers import RedisServer
from tests.test_fleet import (
    MESSAGES,
    Replica,
    StateServer,
    by_target,
    fleet,
    fleet_config,
    fleet_redis,
    route,
    settled,
    target,
)

__all__ = ["fleet_redis"]  # the standalone/cluster fixture, shared with test_fleet

pytestmark = pytest.mark.slow


async def ask(
    replica: Replica, model: str, *, session: str | None = None, user: str | None = None
) -> tuple[str, int, str]:
    """One chat request: (provider that served, attempts, x-edgeroute-affinity)."""
    extra: dict[str, Any] = {}
    if session is not None:
        extra["extra_headers"] = {"x-session-id": session}
    if user is not None:
        extra["user"] = user
    raw = await replica.client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, **extra
    )
    assert raw.parse().choices[0].message.content
    headers = raw.headers
    return (
        headers["x-edgeroute-provider"],
        int(headers["x-edgeroute-attempts"]),
        headers.get("x-edgeroute-affinity", ""),
    )


async def metrics_text(replica: Replica) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{replica.url}/metrics") as response,
    ):
        return await response.text()


# ---- strategy priority ---------------------------------------------------------------------


async def test_priority_fails_over_in_config_order_fleet_wide(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with mock_upstreams(
        primary=MockSettings(), second=MockSettings(), third=MockSettings()
    ) as mocks:
        document = fleet_config(
            mocks,
            [
                route(
                    "chat",
                    "priority",
                    [target("primary"), target("second"), target("third")],
                    breaker={"failure_threshold": 3, "open_timeout_s": 600},
                )
            ],
            redis_server,
        )
        async with fleet(document, tmp_path) as replicas:
            cycle = itertools.cycle(replicas)
            assert {(await ask(next(cycle), "chat"))[:2] for _ in range(9)} == {("primary", 1)}
            explanation = await replicas[0].explain("chat")
            assert explanation["priority_groups"] == [
                {"priority": 0, "targets": ["primary"]},
                {"priority": 1, "targets": ["second"]},
                {"priority": 2, "targets": ["third"]},
            ]
            await mocks["primary"].configure(error_rate=1)
            # Each request tries primary first and fails over to the next in order, until
            # three failures fleet-wide open primary's breaker for every replica.
            for _ in range(3):
                assert (await ask(next(cycle), "chat"))[:2] == ("second", 2)
            assert await mocks["primary"].requests() == 9 + 3
            for replica in replicas:
                assert (await ask(replica, "chat"))[:2] == ("second", 1)
            assert await mocks["primary"].requests() == 12
            await mocks["second"].configure(error_rate=1)
            assert (await ask(replicas[1], "chat"))[:2] == ("third", 2)
            await settled(replicas[0], "chat")


# ---- strategy weighted ---------------------------------------------------------------------


async def test_weighted_70_20_10_is_exact_across_three_replicas(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with mock_upstreams(a=MockSettings(), b=MockSettings(), c=MockSettings()) as mocks:
        targets = [
            {**target("a"), "weight": 70},
            {**target("b"), "weight": 20},
            {**target("c"), "weight": 10},
        ]
        document = fleet_config(mocks, [route("split", "weighted", targets)], redis_server)
        async with fleet(document, tmp_path) as replicas:
            # One request at a time, each from the next replica: decisions in a known order.
            cycle = itertools.cycle(replicas)
            seen = [(await ask(next(cycle), "split"))[0] for _ in range(300)]
            assert Counter(seen) == {"a": 210, "b": 60, "c": 30}
            for start in range(201):
                window = Counter(seen[start : start + 100])
                for name, share in (("a", 70), ("b", 20), ("c", 10)):
                    assert abs(window[name] - share) <= 1, (start, window)
            # 300 more, all at once over the three replicas: still exactly the split.
            burst = await asyncio.gather(*(ask(replicas[i % 3], "split") for i in range(300)))
            assert Counter(p for p, _, _ in burst) == {"a": 210, "b": 60, "c": 30}
            assert [await mocks[n].requests() for n in "abc"] == [420, 120, 60]
            explanation = await replicas[2].explain("split")
            rows = by_target(explanation)
            assert [rows[n]["weight"] for n in "abc"] == [70, 20, 10]
            assert [rows[n]["current_weight"] for n in "abc"] == [0, 0, 0]  # a full period


# ---- breaker scope provider ----------------------------------------------------------------


async def test_a_provider_breaker_opened_through_one_route_is_seen_from_another(
    fleet_redis: StateServer, tmp_path: Path
) -> None:
    async with mock_upstreams(sick=MockSettings(), a=MockSettings(), b=MockSettings()) as mocks:
        breaker = {"scope": "provider", "failure_threshold": 2, "open_timeout_s": 600}
        document = fleet_config(
            mocks,
            [
                route("chat", "cost", [target("sick", 1), target("a", 5)]),
                route("chat-rr", "cost", [target("sick", 1), target("b", 5)]),
                route("other", "cost", [target("a", 1)]),  # target scope: its own slot
            ],
            fleet_redis,
            breaker=breaker,
        )
        document["routes"][2]["breaker"] = {"scope": "target"}
        async with fleet(document, tmp_path) as replicas:
            await mocks["sick"].configure(error_rate=1)
            for replica in replicas[:2]:
                assert (await ask(replica, "chat"))[:2] == ("a", 2)
            assert await mocks["sick"].requests() == 2
            # Route chat-rr never sent sick a request, yet every replica skips it there.
            for replica in replicas:
                assert (await ask(replica, "chat-rr"))[:2] == ("b", 1)
                row = await replica.target("chat-rr", "sick")
                assert row["breaker"] == "open" and row["excluded"] == "breaker_open"
            assert await mocks["sick"].requests() == 2
            explanation = await replicas[0].explain("chat-rr")
            assert explanation["breaker_scope"] == "provider"
            assert (await ask(replicas[0], "other"))[0] == "a"


# ---- sticky sessions -----------------------------------------------------------------------


async def test_a_session_sticks_across_replicas_and_moves_when_its_target_opens(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with mock_upstreams(x=MockSettings(), y=MockSettings(), z=MockSettings()) as mocks:
        targets = [target("x"), target("y"), target("z")]
        document = fleet_config(
            mocks,
            [
                route(
                    "chat",
                    "round_robin",
                    targets,
                    affinity={"key": "header:x-session-id", "ttl_s": 600},
                    breaker={"failure_threshold": 1, "open_timeout_s": 600},
                ),
                route("by-user", "round_robin", targets, affinity={"key": "body:user"}),
            ],
            redis_server,
        )
        secret = "session-4f1c-very-private"
        async with fleet(document, tmp_path) as replicas:
            cycle = itertools.cycle(replicas)
            first = await ask(next(cycle), "chat", session=secret)
            assert first[2] == "new"
            pinned = first[0]
            for _ in range(11):
                assert await ask(next(cycle), "chat", session=secret) == (pinned, 1, "kept")
            # Without a session the round-robin goes on as usual.
            plain = Counter([(await ask(next(cycle), "chat"))[0] for _ in range(6)])
            assert plain == {"x": 2, "y": 2, "z": 2}
            # body:user: the SDK's `user` field pins just the same.
            users = {(await ask(next(cycle), "by-user", user="alice"))[0] for _ in range(6)}
            assert len(users) == 1
            # The pinned target fails: its breaker opens (threshold 1), the pin moves.
            await mocks[pinned].configure(error_rate=1)
            moved_to, attempts, state = await ask(replicas[0], "chat", session=secret)
            assert moved_to != pinned and attempts == 2 and state == "moved"
            for _ in range(6):
                assert await ask(next(cycle), "chat", session=secret) == (moved_to, 1, "kept")
            explanation = await replicas[1].explain("chat")
            assert explanation["affinity"]["pins"] == 1
            assert explanation["affinity"]["key"] == "header:x-session-id"
            text = await metrics_text(replicas[0])
            assert f'edgeroute_affinity_moves_total{{route="chat",target="{pinned}"}} 1.0' in text
            for replica in replicas:
                assert secret not in await metrics_text(replica)
                assert secret not in replica.process.log()

            async def none_in_flight() -> bool:
                rows = (await replicas[0].explain("chat"))["targets"]
                return all(t["in_flight"] == 0 for t in rows)

            await wait_until(none_in_flight, 15.0, interval=0.05)
