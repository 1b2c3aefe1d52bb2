"""Upstream faults under concurrent, mixed traffic: predictable end states, no failed requests.

Single faults and their failover are covered in test_gateway_routing.py; here several sick
upstreams (a closed port, resets mid-response, hangs past the provider timeout, 5xx, 429 with
Retry-After, slow first tokens, streams cut after some chunks) take concurrent traffic next to
one healthy target, and every scenario predicts where the shared state ends up:

- every non-streaming client request succeeds;
- each breaker ends in the state the semantics predict (open exactly once, recovered through
  half-open, or untouched by rate limits), with the window holding exactly one sample per
  upstream attempt (the sum of the clients' `x-edgeroute-attempts`);
- in-flight counts and probe reservations return to zero once the traffic is over.

Everything runs on in-memory state and on a real Redis.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

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

MESSAGES = [{"role": "user", "content": "survive the sick upstreams"}]
ADMIN_TOKEN = "upstream-faults-admin"
OPEN_FOR_TEST_S = 60.0  # longer than any test: an open breaker stays open


@pytest.fixture(params=table(GATEWAY_KINDS))
def state_section(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "memory":
        return {}
    redis_url: str = request.getfixturevalue("redis_url")
    # Roomy timeout: these tests are about upstream faults, never about degraded mode.
    prefix = f"upfaults-{uuid.uuid4().hex[:10]}"
    return {"state": {"redis_url": redis_url, "key_prefix": prefix, "timeout_ms": 2000}}


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def cost_route(name: str, targets: Sequence[str]) -> dict[str, Any]:
    """Targets in price order: the first is the cheapest."""
    return {
        "model": name,
        "strategy": "cost",
        "targets": [
            {"provider": t, "model": f"{t}-model", "id": t, "input_cost_per_mtok": float(i + 1)}
            for i, t in enumerate(targets)
        ],
    }


def set_provider(document: dict[str, Any], name: str, /, **fields: Any) -> None:
    for provider in document["providers"]:
        if provider["name"] == name:
            provider.update(fields)
            return
    raise KeyError(name)


# ---- client side ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    provider: str
    attempts: int
    stream: bool
    complete: bool  # a full JSON answer, or a stream that ended with [DONE]
    stream_error: str | None  # the `code` of an SSE error event ending a broken stream


async def send(
    session: aiohttp.ClientSession, url: str, model: str, *, stream: bool = False
) -> Reply:
    body: dict[str, Any] = {"model": model, "messages": MESSAGES}
    if stream:
        body["stream"] = True
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        text = await response.text()
        provider = response.headers.get("x-edgeroute-provider", "")
        attempts = int(response.headers.get("x-edgeroute-attempts", "0"))
        status = response.status
    error = None
    if stream:
        complete = text.rstrip().endswith("data: [DONE]")
        if '"type":"upstream_error"' in text:
            error = text.split('"code":"', 1)[1].split('"', 1)[0]
    else:
        complete = status == 200 and '"choices"' in text
    return Reply(status, provider, attempts, stream, complete, error)


async def burst(
    session: aiohttp.ClientSession,
    urls: Sequence[str],
    model: str,
    count: int,
    *,
    concurrency: int,
    stream: Callable[[int], bool] = lambda i: False,
) -> list[Reply]:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Reply:
        async with gate:
            return await send(session, urls[i % len(urls)], model, stream=stream(i))

    return list(await asyncio.gather(*(one(i) for i in range(count))))


@asynccontextmanager
async def client_session() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s:
        yield s


def assert_all_succeeded(replies: Sequence[Reply]) -> None:
    bad = [r for r in replies if not (r.status == 200 and r.complete)]
    assert not bad, f"{len(bad)} of {len(replies)} requests failed: {bad[:3]}"


# ---- gateway side --------------------------------------------------------------------------


async def explain(url: str, route: str) -> dict[str, Any]:
    status, body = await get_json(f"{url}/v1/routes/{route}/explain")
    assert status == 200, body
    assert isinstance(body, dict)
    return body


async def targets(url: str, route: str) -> dict[str, dict[str, Any]]:
    return {t["target"]: t for t in (await explain(url, route))["targets"]}


async def settle(url: str, route: str, mocks: Mapping[str, Mock]) -> None:
    """Traffic is over: every lease and probe given back, every upstream handler finished."""

    async def idle() -> bool:
        found = (await targets(url, route)).values()
        return all(t["in_flight"] == 0 and t["probes_in_use"] == 0 for t in found)

    await wait_until(idle, 10.0, 0.05)
    for mock in mocks.values():
        await wait_until(mock_idle(mock), 10.0, 0.05)
    status, text = await get_text(f"{url}/metrics")
    assert status == 200
    assert "edgeroute_in_flight_requests 0.0" in text


def mock_idle(mock: Mock) -> Callable[[], Any]:
    async def idle() -> bool:
        return int((await mock.stats())["in_flight"]) == 0

    return idle


async def get_text(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


async def assert_shared_state_stayed_live(url: str, document: dict[str, Any]) -> None:
    status, ready = await get_json(f"{url}/readyz")
    assert status == 200, ready
    expected = "live" if document.get("state", {}).get("redis_url") else "local"
    assert ready["shared_state"] == expected, ready


def window_total(target: Mapping[str, Any]) -> int:
    return int(target["window"]["successes"]) + int(target["window"]["failures"])


# ---- mixed faults, concurrent traffic --------------------------------------------------------

SICK = ("refused", "reset", "hang", "five", "slowtok")


async def test_mixed_faults_under_concurrency_every_request_succeeds_and_breakers_end_predicted(
    state_section: dict[str, Any],
) -> None:
    async with mock_upstreams(
        reset=MockSettings(fault="reset"),
        hang=MockSettings(fault="hang"),
        five=MockSettings(fault="status", status=503),
        slowtok=MockSettings(fault="slow_first_token", first_token_delay_ms=1000),
        limited=MockSettings(fault="rate_limit", retry_after_s=30),
        good=MockSettings(latency_ms=5),
    ) as mocks:
        order = ["refused", *SICK[1:], "limited", "good"]
        document = gateway_config(
            mocks,
            [cost_route("r", order)],
            server={"max_attempts": len(order), "admin_token": ADMIN_TOKEN},
            breaker={"failure_threshold": 2, "open_timeout_s": OPEN_FOR_TEST_S},
            **state_section,
        )
        document["providers"].append(
            {
                "name": "refused",
                "base_url": f"http://127.0.0.1:{closed_port()}/v1",
                "connect_timeout_s": 1.0,
            }
        )
        for name in ("hang", "slowtok"):
            set_provider(document, name, timeout_s=0.3)
        async with running_gateway(document) as (url, _app), client_session() as session:
            replies = await burst(session, [url], "r", 40, concurrency=8)
            # Two quiet requests: any sick target still closed after the burst has a failure
            # on record and nothing in flight, so each of them fails it once more.
            replies += [await send(session, url, "r") for _ in range(2)]
            await settle(url, "r", mocks)

            assert_all_succeeded(replies)
            assert {r.provider for r in replies} == {"good"}
            assert all(1 <= r.attempts <= len(order) for r in replies)
            assert replies[-1].attempts == 1  # by now only good is left

            found = await targets(url, "r")
            counts = {name: await mock.requests() for name, mock in mocks.items()}
            for name in SICK:
                sick = found[name]
                assert (sick["breaker"], sick["generation"]) == ("open", 1), sick
                assert sick["excluded_because"].startswith("breaker open"), sick
                assert sick["window"]["successes"] == 0
                assert sick["window"]["failures"] >= 2
                if name in counts:  # nothing listens on refused's port to count
                    assert sick["window"]["failures"] == counts[name], name
            limited = found["limited"]
            # 429s cool the target down without touching its breaker.
            assert (limited["breaker"], limited["generation"]) == ("closed", 0)
            assert limited["consecutive_failures"] == 0
            assert 25_000 < limited["cooldown_remaining_ms"] <= 30_000
            assert limited["excluded_because"].startswith("rate-limited")
            assert limited["window"]["failures"] == counts["limited"] >= 1
            good = found["good"]
            assert (good["breaker"], good["generation"], good["consecutive_failures"]) == (
                "closed",
                0,
                0,
            )
            assert (good["window"]["successes"], good["window"]["failures"]) == (len(replies), 0)
            assert good["window"]["success_rate"] == 1.0
            assert counts["good"] == len(replies)
            # One window sample per upstream attempt, however the attempts interleaved.
            assert sum(window_total(t) for t in found.values()) == sum(r.attempts for r in replies)
            assert (await explain(url, "r"))["order"] == ["good"]

            # The admin view tells the same story.
            async with session.get(
                f"{url}/admin/state", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
            ) as response:
                assert response.status == 200
                admin = await response.json()
            admin_targets = {t["target"]: t for t in admin["routes"]["r"]["targets"]}
            for name, target in found.items():
                for key in ("breaker", "generation", "in_flight", "probes_in_use", "window"):
                    assert admin_targets[name][key] == target[key], (name, key)
            await assert_shared_state_stayed_live(url, document)


async def test_a_5xx_burst_opens_the_breaker_and_probes_close_it_again(
    state_section: dict[str, Any],
) -> None:
    burst_size = 6
    async with mock_upstreams(
        five=MockSettings(fault="status", status=502, fault_count=burst_size),
        good=MockSettings(latency_ms=5),
    ) as mocks:
        document = gateway_config(
            mocks,
            [cost_route("r", ["five", "good"])],
            breaker={
                "failure_threshold": 3,
                "open_timeout_s": 0.3,
                "max_open_timeout_s": 1.0,
                "success_threshold": 2,
                "half_open_max_probes": 1,
            },
            **state_section,
        )
        async with running_gateway(document) as (url, _app), client_session() as session:
            replies: list[Reply] = []
            for _ in range(150):  # bounded: ~4 s of traffic is plenty
                replies += await burst(session, [url], "r", 4, concurrency=4)
                five = (await targets(url, "r"))["five"]
                served = (await mocks["five"].stats())["faults_served"]
                if served == burst_size and five["breaker"] == "closed" and five["generation"]:
                    break
                await asyncio.sleep(0.02)
            await settle(url, "r", mocks)

            assert_all_succeeded(replies)
            found = await targets(url, "r")
            five = found["five"]
            stats = await mocks["five"].stats()
            assert stats["faults_served"] == burst_size
            # Opened at least once, recovered through half-open: closed on an odd generation
            # (closed 0 → open 1 → half-open 2 → closed 3, each failed probe adds two).
            assert five["breaker"] == "closed"
            assert five["generation"] >= 3 and five["generation"] % 2 == 1, five
            assert (five["consecutive_failures"], five["half_open_successes"]) == (0, 0)
            assert five["window"]["failures"] == burst_size
            assert five["window"]["successes"] == stats["requests"] - burst_size >= 2
            assert found["good"]["window"]["failures"] == 0
            assert found["good"]["window"]["successes"] == await mocks["good"].requests()
            assert sum(window_total(t) for t in found.values()) == sum(r.attempts for r in replies)
            served_by = {r.provider for r in replies}
            assert served_by == {"five", "good"}
            # Closed and cheapest again: five carries the traffic.
            assert (await explain(url, "r"))["order"] == ["five", "good"]
            assert (await send(session, url, "r")).provider == "five"
            await assert_shared_state_stayed_live(url, document)


async def test_a_target_turning_sick_mid_traffic_gets_exactly_threshold_requests(
    state_section: dict[str, Any],
) -> None:
    """The fleet's concurrency (3) is within the failure threshold (3), so the first failure
    makes the target suspect and what is admitted after it is held back: exactly
    `failure_threshold` requests reach it between turning sick and its breaker opening."""
    threshold = 3
    async with mock_upstreams(five=MockSettings(), good=MockSettings()) as mocks:
        document = gateway_config(
            mocks,
            [cost_route("r", ["five", "good"])],
            breaker={"failure_threshold": threshold, "open_timeout_s": OPEN_FOR_TEST_S},
            **state_section,
        )
        shared = bool(state_section)
        async with (
            running_gateway(document) as (one, _),
            running_gateway(document) as (two, _),
            client_session() as session,
        ):
            # Two replicas on one Redis share the budget; on memory state, one gateway.
            urls = [one, one, two] if shared else [one, one, one]
            stop = asyncio.Event()
            replies: list[Reply] = []

            async def worker(url: str) -> None:
                for _ in range(400):  # bounded
                    if stop.is_set():
                        return
                    replies.append(await send(session, url, "r"))

            workers = [asyncio.create_task(worker(u)) for u in urls]
            try:
                await wait_until(lambda: len(replies) >= 30, 10.0)
                # Sick from now on, and slow to say so: every success served before the
                # switch is recorded long before the first failure comes back.
                await mocks["five"].configure(error_rate=1, latency_ms=100)
                switched_at = len(replies)
                await wait_until(lambda: len(replies) >= switched_at + 30, 15.0)
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*workers), 30)
            for url in dict.fromkeys(urls):
                await settle(url, "r", mocks)

            assert_all_succeeded(replies)
            stats = await mocks["five"].stats()
            assert stats["faults_served"] == threshold
            five = (await targets(two if shared else one, "r"))["five"]
            assert (five["breaker"], five["generation"]) == ("open", 1), five
            assert five["window"]["failures"] == threshold
            assert five["window"]["successes"] == stats["requests"] - threshold
            assert sum(r.attempts == 2 for r in replies) == threshold  # each failed over once
            for url in dict.fromkeys(urls):
                await assert_shared_state_stayed_live(url, document)


async def test_streams_and_plain_requests_through_slow_and_cut_upstreams(
    state_section: dict[str, Any],
) -> None:
    chunks_before_cut = 2
    async with mock_upstreams(
        slowtok=MockSettings(fault="slow_first_token", first_token_delay_ms=1000),
        cutter=MockSettings(fault="cut_stream", cut_after_chunks=chunks_before_cut),
        good=MockSettings(latency_ms=5),
    ) as mocks:
        document = gateway_config(
            mocks,
            [cost_route("r", ["slowtok", "cutter", "good"])],
            breaker={"failure_threshold": 2, "open_timeout_s": OPEN_FOR_TEST_S},
            **state_section,
        )
        set_provider(document, "slowtok", timeout_s=0.3)
        async with running_gateway(document) as (url, _app), client_session() as session:
            # Plain requests: slowtok times out before its first byte (failover), cut_stream
            # does not touch them, so cutter serves every one.
            plain = await burst(session, [url], "r", 16, concurrency=6)
            assert_all_succeeded(plain)
            assert {r.provider for r in plain} == {"cutter"}
            found = await targets(url, "r")
            assert (found["slowtok"]["breaker"], found["slowtok"]["generation"]) == ("open", 1)
            cutter_window = found["cutter"]["window"]
            assert (cutter_window["successes"], cutter_window["failures"]) == (len(plain), 0)

            # Streams, mixed with plain requests: cutter's streams break after their first
            # bytes (no failover then: an SSE error event, blamed on cutter) until two failures
            # in a row open its breaker; after that good serves everything.
            mixed = await burst(session, [url], "r", 24, concurrency=6, stream=lambda i: i % 3 > 0)
            mixed += [await send(session, url, "r", stream=True) for _ in range(2)]
            await settle(url, "r", mocks)

            assert_all_succeeded([r for r in mixed if not r.stream])
            streams = [r for r in mixed if r.stream]
            cut = [r for r in streams if not r.complete]
            assert all(r.status == 200 for r in mixed)
            assert all(r.provider == "cutter" and r.stream_error == "stream_error" for r in cut)
            assert all(
                r.provider == "good" and r.stream_error is None for r in streams if r.complete
            )
            assert len(cut) >= 2
            assert mixed[-1].complete and mixed[-1].provider == "good"  # cutter is out

            found = await targets(url, "r")
            stats = {name: await mock.stats() for name, mock in mocks.items()}
            cutter = found["cutter"]
            assert (cutter["breaker"], cutter["generation"]) == ("open", 1), cutter
            assert cutter["window"]["failures"] == len(cut) == stats["cutter"]["faults_served"]
            assert cutter["window"]["successes"] == stats["cutter"]["requests"] - len(cut)
            slowtok = found["slowtok"]
            assert (slowtok["breaker"], slowtok["generation"]) == ("open", 1)
            assert slowtok["window"]["successes"] == 0
            assert slowtok["window"]["failures"] == stats["slowtok"]["requests"]
            assert found["good"]["window"]["failures"] == 0
            everything = plain + mixed
            assert sum(window_total(t) for t in found.values()) == sum(
                r.attempts for r in everything
            )
            assert (await explain(url, "r"))["order"] == ["good"]
            await assert_shared_state_stayed_live(url, document)
