"""Routing, failover and breakers seen end to end: the official OpenAI SDK over real loopback
HTTP to in-process gateways, which talk HTTP to mock upstreams.

Everything a test asserts about routing it proves twice where it can: by what the client got
back (status, body, `x-edgeroute-*` headers) and by what each mock upstream actually received
(its request counter), with `/v1/routes/{route}/explain` as the window into shared state.
The key breaker, round-robin and admin scenarios also run with the state in a real Redis,
and two gateways sharing one Redis must agree.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from edgeroute.mock_provider import MockSettings
from tests.support.backends import GATEWAY_KINDS, table
from tests.support.gateway import (
    Mock,
    gateway_config,
    get_json,
    mock_upstreams,
    running_gateway,
    wait_until,
)

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "route me, please"}]
ADMIN_TOKEN = "admin-s3cret-token"


# ---- building configs ----------------------------------------------------------------------


def target(provider: str, price: float = 0.0, *, model: str | None = None) -> dict[str, Any]:
    """A target whose id is its provider's name (so explain/admin URLs read naturally)."""
    return {
        "provider": provider,
        "model": model or f"{provider}-model",
        "id": provider,
        "input_cost_per_mtok": price,
    }


def route(name: str, strategy: str, targets: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": name, "strategy": strategy, "targets": targets, **extra}


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def dead_provider(name: str = "dead") -> dict[str, Any]:
    return {
        "name": name,
        "base_url": f"http://127.0.0.1:{closed_port()}/v1",
        "api_key": "sk-dead",
        "connect_timeout_s": 1.0,
    }


def set_provider(document: dict[str, Any], name: str, /, **fields: Any) -> None:
    for provider in document["providers"]:
        if provider["name"] == name:
            provider.update(fields)
            return
    raise KeyError(name)


def unique_prefix() -> str:
    return f"gwtest-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=table(GATEWAY_KINDS))
def state_section(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Extra config sections selecting the state backend: in-process, or a real Redis."""
    if request.param == "memory":
        return {}
    redis_url: str = request.getfixturevalue("redis_url")
    # A generous timeout: these tests are about routing on shared state, not degraded mode
    # (each Redis-backed gateway checks on the way out that it never fell back).
    return {"state": {"redis_url": redis_url, "key_prefix": unique_prefix(), "timeout_ms": 2000}}


# ---- talking to a gateway ------------------------------------------------------------------


@dataclass
class Gateway:
    url: str
    app: web.Application
    client: openai.AsyncOpenAI

    async def chat(
        self, model: str, *, request_id: str | None = None
    ) -> tuple[Mapping[str, str], ChatCompletion]:
        headers = {"x-request-id": request_id} if request_id else None
        raw = await self.client.chat.completions.with_raw_response.create(
            model=model, messages=MESSAGES, extra_headers=headers
        )
        return raw.headers, raw.parse()

    async def served_by(self, model: str) -> tuple[str, str]:
        """(provider, attempts) of one successful request."""
        headers, _ = await self.chat(model)
        return headers["x-edgeroute-provider"], headers["x-edgeroute-attempts"]

    async def explain(self, model: str) -> dict[str, Any]:
        status, body = await get_json(f"{self.url}/v1/routes/{model}/explain")
        assert status == 200, body
        assert isinstance(body, dict)
        return body

    async def target(self, model: str, target_id: str) -> dict[str, Any]:
        body = await self.explain(model)
        found: dict[str, Any] = next(t for t in body["targets"] if t["target"] == target_id)
        return found

    async def breaker(self, model: str, target_id: str) -> str:
        return str((await self.target(model, target_id))["breaker"])

    async def settled(self, model: str) -> None:
        """Wait until every outcome has been recorded (no lease left in flight)."""

        async def idle() -> bool:
            body = await self.explain(model)
            return all(t["in_flight"] == 0 for t in body["targets"])

        await wait_until(idle, 5.0)

    async def admin(
        self, method: str, path: str, *, token: str | None = ADMIN_TOKEN
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, f"{self.url}{path}", headers=headers) as response,
        ):
            return response.status, await response.json(content_type=None)


@asynccontextmanager
async def gateway(document: dict[str, Any]) -> AsyncIterator[Gateway]:
    async with (
        running_gateway(document) as (url, app),
        openai.AsyncOpenAI(
            base_url=f"{url}/v1", api_key="sk-client", max_retries=0, timeout=10.0
        ) as client,
    ):
        yield Gateway(url, app, client)
        if document.get("state", {}).get("redis_url"):
            status, ready = await get_json(f"{url}/readyz")
            assert status == 200, ready
            assert ready["state_backend"] == "redis"
            assert ready["shared_state"] == "live", ready  # never fell back to local state


async def counts(mocks: Mapping[str, Mock]) -> dict[str, int]:
    return {name: await mock.requests() for name, mock in mocks.items()}


# ---- strategies ----------------------------------------------------------------------------


async def test_cost_sends_everything_to_the_cheapest_target_with_routing_headers() -> None:
    async with mock_upstreams(a=MockSettings(), b=MockSettings(), c=MockSettings()) as mocks:
        document = gateway_config(
            mocks, [route("r", "cost", [target("a", 3.0), target("b", 0.5), target("c", 2.0)])]
        )
        async with gateway(document) as gw:
            seen_ids = set()
            for i in range(5):
                headers, completion = await gw.chat("r")
                assert headers["x-edgeroute-provider"] == "b"
                assert headers["x-edgeroute-model"] == "b-model"
                assert headers["x-edgeroute-attempts"] == "1"
                assert headers["x-edgeroute-reason"].startswith("cost: b at 0.5 $/Mtok")
                assert headers["x-request-id"]
                seen_ids.add(headers["x-request-id"])
                # The upstream got the target's model name, not the route name.
                assert completion.model == "b-model"
                assert i + 1 == await mocks["b"].requests()
            assert len(seen_ids) == 5  # a fresh id per request when the client sends none
            stats = await mocks["b"].stats()
            assert stats["last_body"]["model"] == "b-model"
            assert stats["last_authorization"] == "Bearer sk-b-secret"

            headers, _ = await gw.chat("r", request_id="client-req-42")
            assert headers["x-request-id"] == "client-req-42"
            assert await counts(mocks) == {"a": 0, "b": 6, "c": 0}


async def test_latency_moves_traffic_to_the_faster_target() -> None:
    async with mock_upstreams(a=MockSettings(), b=MockSettings(latency_ms=40)) as mocks:
        document = gateway_config(
            mocks,
            [
                route(
                    "r",
                    "latency",
                    [target("a"), target("b")],
                    latency={"explore_share": 1.0, "explore_after_s": 60.0},
                )
            ],
        )
        async with gateway(document) as gw:
            # Nothing measured: a (configuration order); then b is explored once a is measured.
            assert await gw.served_by("r") == ("a", "1")
            await gw.settled("r")
            assert await gw.served_by("r") == ("b", "1")
            await gw.settled("r")
            for _ in range(3):
                assert await gw.served_by("r") == ("a", "1")  # a is the faster one
                await gw.settled("r")
            assert await counts(mocks) == {"a": 4, "b": 1}

            # a turns slow: one slow sample lifts its estimate above b's, traffic moves to b.
            await mocks["a"].configure(latency_ms=400)
            assert await gw.served_by("r") == ("a", "1")
            await gw.settled("r")
            for _ in range(4):
                headers, _ = await gw.chat("r")
                assert headers["x-edgeroute-provider"] == "b"
                assert headers["x-edgeroute-reason"].startswith("latency: b estimate")
                await gw.settled("r")
            assert await counts(mocks) == {"a": 5, "b": 5}
            explanation = await gw.explain("r")
            latency = {t["target"]: t["estimate"]["latency_ms"] for t in explanation["targets"]}
            assert latency["a"] > latency["b"] > 0
            assert explanation["order"] == ["b", "a"]


def _without_age(explanation: dict[str, Any]) -> dict[str, Any]:
    """An explanation minus what ticks by itself: each estimate's age (and so staleness)."""
    targets = [
        {
            **t,
            "estimate": {
                k: v for k, v in t["estimate"].items() if k not in ("age_ms", "stale", "waiting_ms")
            },
        }
        for t in explanation["targets"]
    ]
    return {**explanation, "targets": targets}


def _hybrid_score(
    weights: Mapping[str, float], item: Mapping[str, Any], max_cost: float, max_latency: float
) -> float:
    """The seed formula on the time-decayed estimates (nothing in flight), written down
    independently of edgeroute.strategy. Never measured: latency term 0 (it is explored
    through the budget, not ranked first)."""
    cost_term = 1 - item["price_per_mtok"] / max_cost if max_cost > 0 else 1.0
    latency = item["estimate"]["latency_ms"]
    latency_term = 0.0  # never measured
    if latency is not None:
        latency_term = 1 - latency / max_latency if max_latency > 0 else 1.0
    reliability = 1.0 - float(item["estimate"]["error_rate"])
    return (
        weights["cost"] * cost_term
        + weights["latency"] * latency_term
        + weights["reliability"] * reliability
    )


async def test_hybrid_explain_numbers_match_the_seed_formula() -> None:
    async with mock_upstreams(
        a=MockSettings(), b=MockSettings(latency_ms=100), c=MockSettings(latency_ms=5)
    ) as mocks:
        weights = {"cost": 0.5, "latency": 0.3, "reliability": 0.2}
        document = gateway_config(
            mocks,
            [
                route(
                    "r",
                    "hybrid",
                    [target("a", 10.0), target("b", 2.0), target("c", 4.0)],
                    weights=weights,
                    # The formula alone orders: no sharing among near-best scores.
                    latency={"tolerance": 0.0},
                )
            ],
        )
        async with gateway(document) as gw:
            # Nothing measured yet: cost decides (no exploration without a measured target).
            explanation = await gw.explain("r")
            assert explanation["strategy"] == "hybrid"
            assert explanation["order"] == ["b", "c", "a"]
            assert await gw.served_by("r") == ("b", "1")
            await gw.settled("r")
            # b is measured: c (the better score of the two never measured) is explored.
            assert await gw.served_by("r") == ("c", "1")
            await gw.settled("r")
            # c fails once: failover, and the failure lowers c's success rate.
            await mocks["c"].configure(fault="status", status=503, fault_count=1)
            assert await gw.served_by("r") == ("b", "2")
            await gw.settled("r")
            assert await counts(mocks) == {"a": 0, "b": 2, "c": 2}

            explanation = await gw.explain("r")
            assert explanation["weights"] == pytest.approx(weights)
            targets = {t["target"]: t for t in explanation["targets"]}
            assert targets["c"]["window"]["success_rate"] == pytest.approx(0.5)
            assert 0.4 < targets["c"]["estimate"]["error_rate"] < 0.6  # decayed: ~ 1 of 2
            assert targets["b"]["estimate"]["latency_ms"] > targets["c"]["estimate"]["latency_ms"]
            assert targets["a"]["estimate"]["latency_ms"] is None  # never measured
            admissible = [t for t in explanation["targets"] if t["admissible"]]
            assert len(admissible) == 3
            max_cost = max(t["price_per_mtok"] for t in admissible)
            max_latency = max(
                (t["estimate"]["latency_ms"] or 0.0 for t in admissible),
                default=0.0,
            )
            for item in admissible:
                expected = _hybrid_score(weights, item, max_cost, max_latency)
                assert item["score"] == pytest.approx(expected, rel=1e-9, abs=1e-12), item
            by_score = sorted(admissible, key=lambda t: (-t["score"], t["rank"]))
            assert explanation["order"] == [t["target"] for t in by_score]
            assert [targets[t]["rank"] for t in explanation["order"]] == [
                1,
                2,
                3,
            ]  # 1: the first choice
            best = explanation["order"][0]
            assert explanation["reason"].startswith(
                f"hybrid: {best} score {targets[best]['score']:.3f}"
            )
            # The next request goes exactly where explain said it would.
            headers, _ = await gw.chat("r")
            assert headers["x-edgeroute-provider"] == best
            assert headers["x-edgeroute-reason"] == explanation["reason"]


async def test_hybrid_failover_header_after_a_failed_first_choice() -> None:
    async with mock_upstreams(a=MockSettings(), b=MockSettings()) as mocks:
        document = gateway_config(
            mocks, [route("r", "hybrid", [target("a", 1.0), target("b", 5.0)])]
        )
        async with gateway(document) as gw:
            await mocks["a"].configure(fault="status", status=503, fault_count=1)
            assert await gw.served_by("r") == ("b", "2")


async def test_round_robin_spreads_evenly(state_section: dict[str, Any]) -> None:
    async with mock_upstreams(a=MockSettings(), b=MockSettings(), c=MockSettings()) as mocks:
        document = gateway_config(
            mocks,
            [route("r", "round_robin", [target("a"), target("b"), target("c")])],
            **state_section,
        )
        async with gateway(document) as gw:
            order = [(await gw.served_by("r"))[0] for _ in range(9)]
            assert order == ["a", "b", "c"] * 3
            assert (await gw.explain("r"))["rr_cursor"] == 10  # the next request takes 10
            # Concurrent requests: the cursor moves atomically, so the spread stays exact.
            results = await asyncio.gather(*(gw.chat("r") for _ in range(30)))
            spread = {name: 0 for name in mocks}
            for headers, _ in results:
                spread[headers["x-edgeroute-provider"]] += 1
            assert spread == {"a": 10, "b": 10, "c": 10}
            assert await counts(mocks) == {"a": 13, "b": 13, "c": 13}
            assert (await gw.explain("r"))["rr_cursor"] == 40


async def test_least_busy_spreads_in_flight_requests() -> None:
    slow = MockSettings(latency_ms=400)
    async with mock_upstreams(a=slow, b=slow, c=slow) as mocks:
        document = gateway_config(
            mocks, [route("r", "least_busy", [target("a"), target("b"), target("c")])]
        )
        async with gateway(document) as gw:
            burst = asyncio.gather(*(gw.chat("r") for _ in range(6)))

            async def all_in_flight() -> bool:
                explanation = await gw.explain("r")
                return sum(int(t["in_flight"]) for t in explanation["targets"]) == 6

            await wait_until(all_in_flight, 3.0)
            explanation = await gw.explain("r")
            assert [t["in_flight"] for t in explanation["targets"]] == [2, 2, 2]
            assert [(await m.stats())["in_flight"] for m in mocks.values()] == [2, 2, 2]
            results = await burst
            spread = {name: 0 for name in mocks}
            for headers, _ in results:
                spread[headers["x-edgeroute-provider"]] += 1
                assert headers["x-edgeroute-reason"].startswith("least_busy: ")
            assert spread == {"a": 2, "b": 2, "c": 2}
            await gw.settled("r")


# ---- failover ------------------------------------------------------------------------------

# name -> (settings of the sick mock, None meaning a closed port; counts as a breaker failure?)
FAILURES: dict[str, tuple[dict[str, Any] | None, bool]] = {
    "connection_refused": (None, True),
    "server_error_rate": ({"error_rate": 1}, True),
    "server_status_503": ({"fault": "status", "status": 503}, True),
    "timeout": ({"fault": "hang"}, True),
    "reset_mid_response": ({"fault": "reset"}, True),
    "rate_limited_429": ({"fault": "rate_limit", "retry_after_s": 5}, False),
}


@pytest.mark.parametrize("failure", list(FAILURES))
async def test_failover_on_each_failure_class(failure: str) -> None:
    settings, counts_against_breaker = FAILURES[failure]
    async with mock_upstreams(sick=MockSettings(), good=MockSettings()) as mocks:
        if settings is not None:
            await mocks["sick"].configure(**settings)
        document = gateway_config(
            mocks, [route("r", "cost", [target("sick", 1.0), target("good", 2.0)])]
        )
        set_provider(document, "sick", timeout_s=0.3)
        if settings is None:
            set_provider(document, "sick", **dead_provider("sick"))
        async with gateway(document) as gw:
            headers, completion = await gw.chat("r")
            assert headers["x-edgeroute-provider"] == "good"
            assert headers["x-edgeroute-model"] == "good-model"
            assert headers["x-edgeroute-attempts"] == "2"
            assert headers["x-edgeroute-reason"]
            assert completion.choices[0].message.content
            assert await mocks["good"].requests() == 1
            assert await mocks["sick"].requests() == (0 if settings is None else 1)
            await gw.settled("r")
            sick = await gw.target("r", "sick")
            assert sick["breaker"] == "closed"
            assert sick["window"]["failures"] == 1
            if counts_against_breaker:
                assert sick["consecutive_failures"] == 1
            else:  # a 429 cools the target down; it is not a breaker failure
                assert sick["consecutive_failures"] == 0
                assert sick["cooldown_remaining_ms"] > 0


async def test_all_attempts_failing_is_502_listing_every_attempt() -> None:
    async with mock_upstreams(
        five=MockSettings(error_rate=1),
        slow=MockSettings(fault="hang"),
        reset=MockSettings(fault="reset"),
        limited=MockSettings(fault="rate_limit", retry_after_s=5),
    ) as mocks:
        document = gateway_config(
            mocks,
            [
                route(
                    "r",
                    "cost",
                    [
                        target("dead", 1.0),
                        target("five", 2.0),
                        target("slow", 3.0),
                        target("reset", 4.0),
                        target("limited", 5.0),
                    ],
                )
            ],
            server={"max_attempts": 5},
        )
        document["providers"].append(dead_provider("dead"))
        set_provider(document, "slow", timeout_s=0.3)
        async with gateway(document) as gw:
            with pytest.raises(openai.InternalServerError) as caught:
                await gw.chat("r", request_id="doomed-1")
            error = caught.value
            assert error.status_code == 502
            assert error.code == "all_providers_failed"
            assert error.response.headers["x-request-id"] == "doomed-1"
            assert error.response.headers["x-edgeroute-attempts"] == "5"
            assert isinstance(error.body, dict)
            assert error.body["type"] == "upstream_error"
            assert error.body["attempts"] == [
                {
                    "provider": "dead",
                    "model": "dead-model",
                    "error": "connect_error",
                    "status": None,
                },
                {"provider": "five", "model": "five-model", "error": "server_error", "status": 500},
                {"provider": "slow", "model": "slow-model", "error": "timeout", "status": None},
                {
                    "provider": "reset",
                    "model": "reset-model",
                    "error": "stream_error",
                    "status": None,
                },
                {
                    "provider": "limited",
                    "model": "limited-model",
                    "error": "rate_limited",
                    "status": 429,
                },
            ]
            for name in ("dead", "five", "slow", "reset", "limited"):
                assert f"{name}/{name}-model" in error.body["message"]
            assert await counts(mocks) == {"five": 1, "slow": 1, "reset": 1, "limited": 1}


@pytest.mark.parametrize(
    "max_attempts",
    [
        2,
        3,
        4,
        6,
        10,
    ],
)
async def test_max_attempts_bounds_upstream_attempts(max_attempts: int) -> None:
    sick = MockSettings(error_rate=1)
    async with mock_upstreams(a=sick, b=sick) as mocks:
        document = gateway_config(
            mocks,
            [route("r", "cost", [target("a", 1.0), target("b", 2.0)])],
            server={"max_attempts": max_attempts},
            breaker={"failure_threshold": 100},  # keep both targets admissible throughout
        )
        async with gateway(document) as gw:
            with pytest.raises(openai.InternalServerError) as caught:
                await gw.chat("r")
            error = caught.value
            assert error.status_code == 502
            assert isinstance(error.body, dict)
            tried = [attempt["provider"] for attempt in error.body["attempts"]]
            # Rounds over the candidates, cheapest first, never more than max_attempts.
            assert tried == (["a", "b"] * max_attempts)[:max_attempts]
            assert error.response.headers["x-edgeroute-attempts"] == str(max_attempts)
            upstream = await counts(mocks)
            assert upstream == {"a": tried.count("a"), "b": tried.count("b")}


@pytest.mark.parametrize(
    ("status", "error_type"),
    [(400, openai.BadRequestError), (422, openai.UnprocessableEntityError)],
)
async def test_client_errors_pass_through_without_failover(
    status: int, error_type: type[openai.APIStatusError]
) -> None:
    async with mock_upstreams(
        a=MockSettings(fault="status", status=status), b=MockSettings()
    ) as mocks:
        document = gateway_config(
            mocks,
            [route("r", "cost", [target("a", 1.0), target("b", 2.0)])],
            # A single counted failure would open the breaker: it must stay closed.
            breaker={"failure_threshold": 1, "open_timeout_s": 30},
        )
        async with gateway(document) as gw:
            for i in range(1, 4):
                with pytest.raises(error_type) as caught:
                    await gw.chat("r")
                error = caught.value
                assert error.status_code == status
                assert isinstance(error.body, dict)
                assert error.body["message"] == f"a: simulated upstream error (HTTP {status})"
                assert error.body["type"] == "invalid_request_error"
                assert error.response.headers["x-edgeroute-provider"] == "a"
                assert error.response.headers["x-edgeroute-attempts"] == "1"
                assert await counts(mocks) == {"a": i, "b": 0}
            await gw.settled("r")
            a = await gw.target("r", "a")
            assert a["breaker"] == "closed"
            assert a["consecutive_failures"] == 0
            assert a["window"]["failures"] == 0
            assert a["cooldown_remaining_ms"] == 0
            assert (await gw.explain("r"))["order"] == ["a", "b"]


async def test_retry_after_keeps_a_rate_limited_target_out_for_that_long() -> None:
    async with mock_upstreams(
        a=MockSettings(fault="rate_limit", fault_count=1, retry_after_s=0.8), b=MockSettings()
    ) as mocks:
        document = gateway_config(mocks, [route("r", "cost", [target("a", 1.0), target("b", 2.0)])])
        async with gateway(document) as gw:
            assert await gw.served_by("r") == ("b", "2")
            a = await gw.target("r", "a")
            assert 0 < a["cooldown_remaining_ms"] <= 800
            assert a["excluded_because"].startswith("rate-limited")
            assert a["breaker"] == "closed"
            assert not a["admissible"]
            # Kept out: the next requests go straight to b without touching a.
            for _ in range(3):
                assert await gw.served_by("r") == ("b", "1")
            assert await counts(mocks) == {"a": 1, "b": 4}

            async def cooled_down() -> bool:
                return int((await gw.target("r", "a"))["cooldown_remaining_ms"]) == 0

            await wait_until(cooled_down, 3.0)
            assert await gw.served_by("r") == ("a", "1")
            assert await counts(mocks) == {"a": 2, "b": 4}


async def test_every_target_rate_limited_is_429_with_the_shortest_retry_after() -> None:
    async with mock_upstreams(
        a=MockSettings(fault="rate_limit", retry_after_s=7),
        b=MockSettings(fault="rate_limit", retry_after_s=3),
    ) as mocks:
        document = gateway_config(mocks, [route("r", "cost", [target("a", 1.0), target("b", 2.0)])])
        async with gateway(document) as gw:
            with pytest.raises(openai.RateLimitError) as raised:
                await gw.client.chat.completions.create(model="r", messages=MESSAGES)
            assert raised.value.response.headers["Retry-After"] == "3"
            error = raised.value.body
            assert isinstance(error, dict) and error["code"] == "rate_limited"
            assert [a["provider"] for a in error["attempts"]] == ["a", "b"]
            # Rate limits are not breaker failures: both stay closed, both are cooling down.
            for name in ("a", "b"):
                state = await gw.target("r", name)
                assert state["breaker"] == "closed" and state["consecutive_failures"] == 0
                assert state["cooldown_remaining_ms"] > 0


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_upstream_auth_or_deployment_refusal_fails_over_and_counts(status: int) -> None:
    async with mock_upstreams(
        a=MockSettings(fault="status", status=status), b=MockSettings()
    ) as mocks:
        document = gateway_config(mocks, [route("r", "cost", [target("a", 1.0), target("b", 2.0)])])
        async with gateway(document) as gw:
            assert await gw.served_by("r") == ("b", "2")
            state = await gw.target("r", "a")
            assert state["consecutive_failures"] == 1  # our key or deployment is wrong: a failure


# ---- circuit breakers ----------------------------------------------------------------------


@pytest.mark.parametrize(("probes", "success_threshold"), [(1, 2), (2, 3)])
async def test_breaker_opens_then_recovers_through_half_open(
    state_section: dict[str, Any], probes: int, success_threshold: int
) -> None:
    async with mock_upstreams(a=MockSettings(error_rate=1), b=MockSettings()) as mocks:
        document = gateway_config(
            mocks,
            [route("r", "cost", [target("a", 1.0), target("b", 10.0)])],
            breaker={
                "failure_threshold": 3,
                "open_timeout_s": 0.5,
                "success_threshold": success_threshold,
                "half_open_max_probes": probes,
            },
            **state_section,
        )
        async with gateway(document) as gw:
            for failures in range(1, 4):
                assert await gw.served_by("r") == ("b", "2")
                a = await gw.target("r", "a")
                if failures < 3:
                    assert (a["breaker"], a["consecutive_failures"]) == ("closed", failures)
            a = await gw.target("r", "a")
            assert a["breaker"] == "open"
            assert a["excluded_because"].startswith("breaker open")
            assert not a["admissible"]
            # Open: not a single request reaches a.
            for _ in range(3):
                assert await gw.served_by("r") == ("b", "1")
            assert await counts(mocks) == {"a": 3, "b": 6}

            # a gets well (and slow, so probes overlap the burst below).
            await mocks["a"].configure(error_rate=0, latency_ms=400)

            async def half_open() -> bool:
                return await gw.breaker("r", "a") == "half_open"

            await wait_until(half_open, 3.0)
            assert await mocks["a"].requests() == 3  # explain polling sent nothing anywhere
            a = await gw.target("r", "a")
            assert (a["probes_in_use"], a["admissible"], a["rank"]) == (0, True, 1)

            results = await asyncio.gather(*(gw.chat("r") for _ in range(probes + 3)))
            providers = sorted(headers["x-edgeroute-provider"] for headers, _ in results)
            assert providers == ["a"] * probes + ["b"] * 3
            for headers, _ in results:
                if headers["x-edgeroute-provider"] == "a":
                    assert headers["x-edgeroute-reason"].startswith("half-open probe of a")
            assert await mocks["a"].requests() == 3 + probes
            await gw.settled("r")

            await mocks["a"].configure(latency_ms=0)
            successes = probes
            while successes < success_threshold:
                a = await gw.target("r", "a")
                assert (a["breaker"], a["half_open_successes"]) == ("half_open", successes)
                assert await gw.served_by("r") == ("a", "1")
                await gw.settled("r")
                successes += 1
            a = await gw.target("r", "a")
            assert a["breaker"] == "closed"
            assert (a["consecutive_failures"], a["half_open_successes"]) == (0, 0)
            assert await mocks["a"].requests() == 3 + success_threshold
            # Closed and cheapest again: a carries the traffic.
            for _ in range(3):
                headers, _ = await gw.chat("r")
                assert headers["x-edgeroute-provider"] == "a"
                assert headers["x-edgeroute-reason"].startswith("cost: a")
            assert await mocks["a"].requests() == 6 + success_threshold


async def test_failed_probe_reopens_with_a_doubled_timeout() -> None:
    async with mock_upstreams(a=MockSettings(error_rate=1), b=MockSettings()) as mocks:
        document = gateway_config(
            mocks,
            [route("r", "cost", [target("a", 1.0), target("b", 10.0)])],
            breaker={"failure_threshold": 1, "open_timeout_s": 0.3, "max_open_timeout_s": 10},
        )
        async with gateway(document) as gw:
            assert await gw.served_by("r") == ("b", "2")
            a = await gw.target("r", "a")
            assert (a["breaker"], a["open_timeout_ms"]) == ("open", 300)

            async def half_open() -> bool:
                return await gw.breaker("r", "a") == "half_open"

            await wait_until(half_open, 3.0)
            assert await gw.served_by("r") == ("b", "2")  # the probe failed, b answered
            a = await gw.target("r", "a")
            assert (a["breaker"], a["open_timeout_ms"]) == ("open", 600)
            assert 0 < a["open_remaining_ms"] <= 600
            assert await counts(mocks) == {"a": 2, "b": 2}


async def test_every_target_open_is_503_with_retry_after() -> None:
    sick = MockSettings(error_rate=1)
    async with mock_upstreams(a=sick, b=sick) as mocks:
        document = gateway_config(
            mocks,
            [route("r", "cost", [target("a", 1.0), target("b", 2.0)])],
            breaker={"failure_threshold": 1, "open_timeout_s": 5},
        )
        async with gateway(document) as gw:
            with pytest.raises(openai.InternalServerError) as first:
                await gw.chat("r")
            assert first.value.status_code == 502
            assert first.value.code == "all_providers_failed"
            explanation = await gw.explain("r")
            assert [t["breaker"] for t in explanation["targets"]] == ["open", "open"]
            assert explanation["order"] == []

            with pytest.raises(openai.InternalServerError) as caught:
                await gw.chat("r", request_id="no-way")
            error = caught.value
            assert error.status_code == 503
            assert error.code == "no_providers_available"
            assert isinstance(error.body, dict)
            assert error.body["type"] == "service_unavailable"
            retry_after = error.response.headers["Retry-After"]
            assert retry_after.isdigit()
            assert 1 <= int(retry_after) <= 5
            assert error.response.headers["x-request-id"] == "no-way"
            assert await counts(mocks) == {"a": 1, "b": 1}  # nobody was bothered


# ---- endpoints -----------------------------------------------------------------------------


async def test_models_lists_routes_and_unknown_model_is_404() -> None:
    async with mock_upstreams(a=MockSettings()) as mocks:
        document = gateway_config(
            mocks,
            [route("fast", "cost", [target("a")]), route("smart", "hybrid", [target("a")])],
        )
        async with gateway(document) as gw:
            models = await gw.client.models.list()
            assert [m.id for m in models.data] == ["fast", "smart"]
            assert all(m.owned_by == "edgeroute" for m in models.data)
            with pytest.raises(openai.NotFoundError) as caught:
                await gw.chat("gpt-nonexistent")
            assert caught.value.code == "model_not_found"
            assert "gpt-nonexistent" in caught.value.message
            status, body = await get_json(f"{gw.url}/v1/routes/gpt-nonexistent/explain")
            assert (status, body["error"]["code"]) == (404, "model_not_found")
            assert await mocks["a"].requests() == 0


async def test_admin_endpoints_are_disabled_without_an_admin_token() -> None:
    async with mock_upstreams(a=MockSettings()) as mocks:
        document = gateway_config(mocks, [route("r", "cost", [target("a")])])
        async with gateway(document) as gw:
            for method, path in (
                ("GET", "/admin/state"),
                ("POST", "/admin/routes/r/targets/a/reset"),
            ):
                for token in (None, ADMIN_TOKEN):
                    status, body = await gw.admin(method, path, token=token)
                    assert status == 404, (method, path, token)
                    assert body["error"]["code"] == "not_found"


async def test_admin_requires_the_token_and_reset_closes_an_open_breaker(
    state_section: dict[str, Any],
) -> None:
    async with mock_upstreams(a=MockSettings(error_rate=1), b=MockSettings()) as mocks:
        document = gateway_config(
            mocks,
            [route("r", "cost", [target("a", 1.0), target("b", 2.0)])],
            server={"admin_token": ADMIN_TOKEN},
            breaker={"failure_threshold": 1, "open_timeout_s": 30},
            **state_section,
        )
        reset_path = "/admin/routes/r/targets/a/reset"
        async with gateway(document) as gw:
            for method, path in (("GET", "/admin/state"), ("POST", reset_path)):
                for token in (None, "wrong-token"):
                    status, body = await gw.admin(method, path, token=token)
                    assert status == 401, (method, path, token)
                    assert body["error"]["code"] == "invalid_admin_token"

            assert await gw.served_by("r") == ("b", "2")
            status, state = await gw.admin("GET", "/admin/state")
            assert status == 200
            expected_backend = "redis" if state_section else "memory"
            assert state["state_backend"] == expected_backend
            targets = {t["target"]: t for t in state["routes"]["r"]["targets"]}
            assert targets["a"]["breaker"] == "open"
            await mocks["a"].configure(error_rate=0)
            assert await gw.served_by("r") == ("b", "1")  # still open: a is left alone
            assert await mocks["a"].requests() == 1

            # Rejected resets change nothing.
            for token in (None, "wrong-token"):
                assert (await gw.admin("POST", reset_path, token=token))[0] == 401
            assert await gw.breaker("r", "a") == "open"
            status, body = await gw.admin("POST", "/admin/routes/r/targets/nope/reset")
            assert (status, body["error"]["code"]) == (404, "target_not_found")
            status, body = await gw.admin("POST", "/admin/routes/nope/targets/a/reset")
            assert (status, body["error"]["code"]) == (404, "model_not_found")

            status, body = await gw.admin("POST", reset_path)
            assert (status, body) == (200, {"route": "r", "target": "a", "reset": True})
            a = await gw.target("r", "a")
            assert (a["breaker"], a["consecutive_failures"], a["admissible"]) == (
                "closed",
                0,
                True,
            )
            assert await gw.served_by("r") == ("a", "1")
            assert await counts(mocks) == {"a": 2, "b": 2}


async def test_explain_changes_no_state() -> None:
    async with mock_upstreams(
        a=MockSettings(), b=MockSettings(latency_ms=20), c=MockSettings()
    ) as mocks:
        document = gateway_config(
            mocks,
            [
                route("rr", "round_robin", [target("a"), target("b"), target("c")]),
                route("hy", "hybrid", [target("a", 1.0), target("b", 2.0), target("c", 3.0)]),
            ],
            server={"admin_token": ADMIN_TOKEN},
        )
        async with gateway(document) as gw:
            assert (await gw.served_by("rr"))[0] == "a"
            assert (await gw.served_by("rr"))[0] == "b"
            assert (await gw.served_by("hy"))[0] == "a"
            await gw.settled("rr")
            await gw.settled("hy")
            before = {name: await gw.explain(name) for name in ("rr", "hy")}
            before_counts = await counts(mocks)
            assert before["rr"]["rr_cursor"] == 3
            assert before["rr"]["order"] == ["c", "a", "b"]
            for _ in range(20):
                for name in ("rr", "hy"):
                    assert _without_age(await gw.explain(name)) == _without_age(before[name])
                status, _ = await gw.admin("GET", "/admin/state")
                assert status == 200
            assert await counts(mocks) == before_counts
            # The next requests go exactly where explain said, and the cursor moved once each.
            for name in ("rr", "hy"):
                headers, _ = await gw.chat(name)
                assert headers["x-edgeroute-provider"] == before[name]["order"][0]
                assert headers["x-edgeroute-reason"] == before[name]["reason"]
            assert (await gw.explain("rr"))["rr_cursor"] == 4


# ---- shared state: two gateways on one Redis -----------------------------------------------


async def test_two_gateways_on_one_redis_agree(redis_url: str) -> None:
    async with mock_upstreams(
        a=MockSettings(error_rate=1),
        b=MockSettings(),
        x=MockSettings(),
        y=MockSettings(),
        limited=MockSettings(fault="rate_limit", fault_count=1, retry_after_s=30),
    ) as mocks:
        document = gateway_config(
            mocks,
            [
                route("r", "cost", [target("a", 1.0), target("b", 2.0)]),
                route("rr", "round_robin", [target("x"), target("y"), target("b")]),
                route("rl", "cost", [target("limited", 1.0), target("b", 2.0)]),
            ],
            server={"admin_token": ADMIN_TOKEN},
            breaker={"failure_threshold": 2, "open_timeout_s": 30},
            state={"redis_url": redis_url, "key_prefix": unique_prefix(), "timeout_ms": 2000},
        )
        async with gateway(document) as one, gateway(document) as two:
            # Open a's breaker through gateway one ...
            for _ in range(2):
                assert await one.served_by("r") == ("b", "2")
            assert await mocks["a"].requests() == 2
            # ... and gateway two sees it open and keeps away from a.
            seen_by_two = await two.target("r", "a")
            assert seen_by_two["breaker"] == "open"
            assert seen_by_two["excluded_because"].startswith("breaker open")
            assert seen_by_two["generation"] == (await one.target("r", "a"))["generation"]
            for _ in range(3):
                assert await two.served_by("r") == ("b", "1")
            assert await mocks["a"].requests() == 2

            # A reset through two closes it for one as well.
            await mocks["a"].configure(error_rate=0)
            status, _ = await two.admin("POST", "/admin/routes/r/targets/a/reset")
            assert status == 200
            assert await one.breaker("r", "a") == "closed"
            assert await one.served_by("r") == ("a", "1")

            # One round-robin cursor for the fleet: alternating gateways still rotate evenly.
            gateways = [one, two]
            order = [(await gateways[i % 2].served_by("rr"))[0] for i in range(9)]
            assert order == ["x", "y", "b"] * 3
            assert (await one.explain("rr"))["rr_cursor"] == 10
            assert (await two.explain("rr"))["rr_cursor"] == 10

            # A Retry-After learnt by one keeps two away from that target too.
            assert await one.served_by("rl") == ("b", "2")
            limited = await two.target("rl", "limited")
            assert limited["excluded_because"].startswith("rate-limited")
            assert 25_000 < limited["cooldown_remaining_ms"] <= 30_000
            for _ in range(3):
                assert await two.served_by("rl") == ("b", "1")
            assert await mocks["limited"].requests() == 1


async def test_half_open_probes_are_limited_across_gateways(redis_url: str) -> None:
    async with mock_upstreams(a=MockSettings(error_rate=1), b=MockSettings()) as mocks:
        document = gateway_config(
            mocks,
            [route("r", "cost", [target("a", 1.0), target("b", 2.0)])],
            breaker={
                "failure_threshold": 1,
                "open_timeout_s": 0.4,
                "success_threshold": 1,
                "half_open_max_probes": 1,
            },
            state={"redis_url": redis_url, "key_prefix": unique_prefix(), "timeout_ms": 2000},
        )
        async with gateway(document) as one, gateway(document) as two:
            assert await one.served_by("r") == ("b", "2")
            assert await two.breaker("r", "a") == "open"
            await mocks["a"].configure(error_rate=0, latency_ms=400)

            async def half_open() -> bool:
                return await two.breaker("r", "a") == "half_open"

            await wait_until(half_open, 3.0)
            # Six concurrent requests through two gateways: one probe slot for the fleet.
            results = await asyncio.gather(*(gw.chat("r") for gw in [one, two] * 3))
            providers = sorted(headers["x-edgeroute-provider"] for headers, _ in results)
            assert providers == ["a"] + ["b"] * 5
            assert await counts(mocks) == {"a": 2, "b": 6}
            await one.settled("r")
            # success_threshold 1: the probe's success closed it, for both gateways.
            assert await one.breaker("r", "a") == "closed"
            assert await two.breaker("r", "a") == "closed"
            assert await two.served_by("r") == ("a", "1")
