"""State-side faults: Redis dies, freezes or comes back empty, and no client request fails.

Gateways (in-process, and as real `edgeroute serve` processes) run under concurrent client
load against healthy mock upstreams while the private Redis of each test is killed, frozen
(SIGSTOP) or restarted empty. What must hold:

- every client request succeeds, and none waits on a dead or frozen Redis for longer than
  the state timeout (per-request latency stays under upstream latency + timeout + slack);
- the replica says it routes on local state (`/readyz` body, `edgeroute_state_degraded`)
  and goes back to shared state by itself once Redis answers again (scripts reloaded);
- state lost with a restart is rebuilt from traffic (a failing target re-opens its breaker);
- outcome records are bounded in memory while the state cannot take them;
- leases and probe reservations taken in shared state are given back there even when the
  outcome arrives while Redis is away (and local ones stay local).
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from edgeroute import RoutingStrategy
from edgeroute.metrics import Metrics
from edgeroute.mock_provider import MockSettings
from edgeroute.recorder import Recorder
from edgeroute.server import PROXY
from edgeroute.state import RedisState
from edgeroute.state.base import RouteSpec, StateBackend
from edgeroute.state.fallback import FallbackState
from edgeroute.state.redis import route_keys
from edgeroute.types import BreakerParams, Outcome, OutcomeKind, TargetSpec
from tests.support.gateway import (
    GatewayProcess,
    Mock,
    gateway_config,
    get_json,
    mock_upstreams,
    running_gateway,
    wait_until,
)
from tests.support.redis_servers import RedisServer, free_port

UPSTREAM_MS = 20.0
STATE_TIMEOUT_MS = 50.0
# Generous: the machine is small and noisy. A request that really waited on a dead Redis
# (a TCP connect timeout, retries, a probe in the request path) takes seconds, not this.
SLACK_S = 0.75
MESSAGES = [{"role": "user", "content": "keep routing, whatever happens to redis"}]


def unique_prefix() -> str:
    return f"faults-{uuid.uuid4().hex[:10]}"


def latency_bound(slack_s: float = SLACK_S) -> float:
    return (UPSTREAM_MS + STATE_TIMEOUT_MS) / 1000.0 + slack_s


def state_section(
    url: str, *, timeout_ms: float = STATE_TIMEOUT_MS, **extra: Any
) -> dict[str, Any]:
    return {"redis_url": url, "key_prefix": unique_prefix(), "timeout_ms": timeout_ms, **extra}


def rr_route(name: str, *targets: str) -> dict[str, Any]:
    return {
        "model": name,
        "strategy": "round_robin",
        "targets": [{"provider": t, "model": f"{t}-model", "id": t} for t in targets],
    }


def cost_route(name: str, *targets: tuple[str, float]) -> dict[str, Any]:
    return {
        "model": name,
        "strategy": "cost",
        "targets": [
            {"provider": t, "model": f"{t}-model", "id": t, "input_cost_per_mtok": price}
            for t, price in targets
        ],
    }


# ---- client load -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    started: float  # time.monotonic() when the request was sent
    elapsed: float  # seconds until the whole response was read
    status: int  # 0: the request itself failed (connection error, client timeout)
    provider: str
    error: str


@dataclass
class Load:
    """Closed-loop client load: `workers` loops per gateway URL, each one request at a time."""

    urls: Sequence[str]
    model: str
    workers: int = 6
    max_requests: int = 20_000
    samples: list[Sample] = field(default_factory=list)

    def ok_since(self, since: float) -> int:
        return sum(1 for s in self.samples if s.started >= since and s.status == 200)

    async def wait_for(self, count: int, since: float, timeout: float = 20.0) -> None:  # noqa: ASYNC109
        await wait_until(lambda: self.ok_since(since) >= count, timeout, 0.01)

    def failures(self) -> list[Sample]:
        return [s for s in self.samples if s.status != 200]

    async def _worker(self, session: aiohttp.ClientSession, url: str, stop: asyncio.Event) -> None:
        body = {"model": self.model, "messages": MESSAGES}
        while not stop.is_set() and len(self.samples) < self.max_requests:
            started, clock = time.monotonic(), time.perf_counter()
            try:
                async with session.post(f"{url}/v1/chat/completions", json=body) as response:
                    text = await response.text()
                    provider = response.headers.get("x-edgeroute-provider", "")
                    status = response.status
                    error = "" if status == 200 else text[:300]
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, provider, error = 0, "", f"{type(exc).__name__}: {exc}"
            self.samples.append(
                Sample(started, time.perf_counter() - clock, status, provider, error)
            )

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Load]:
        stop = asyncio.Event()
        timeout = aiohttp.ClientTimeout(total=15)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            tasks = [
                asyncio.create_task(self._worker(session, url, stop))
                for url in self.urls
                for _ in range(self.workers)
            ]
            try:
                yield self
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)


def assert_all_succeeded(samples: Sequence[Sample]) -> None:
    failed = [s for s in samples if s.status != 200]
    assert not failed, f"{len(failed)} of {len(samples)} requests failed, e.g. {failed[:3]}"


def assert_latency_bounded(samples: Sequence[Sample], bound_s: float) -> None:
    slow = sorted((s for s in samples if s.elapsed > bound_s), key=lambda s: -s.elapsed)
    assert not slow, (
        f"{len(slow)} of {len(samples)} requests took longer than {bound_s:.3f}s, "
        f"slowest {[round(s.elapsed, 3) for s in slow[:5]]}"
    )


# ---- looking at a gateway --------------------------------------------------------------------


async def readyz(url: str) -> dict[str, Any]:
    status, body = await get_json(f"{url}/readyz")
    assert status == 200, body  # degraded is still ready: the replica keeps serving
    assert isinstance(body, dict)
    return body


async def shared_state(url: str) -> str:
    return str((await readyz(url))["shared_state"])


async def wait_shared_state(url: str, wanted: str, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Until `/readyz` and the `edgeroute_state_degraded` gauge agree on `wanted`."""
    gauge = 1.0 if wanted == "degraded" else 0.0

    async def agreed() -> bool:
        text = await metrics_text(url)
        return (
            await shared_state(url) == wanted
            and metric_value(text, "edgeroute_state_degraded") == gauge
        )

    await wait_until(agreed, timeout, 0.02)


async def wait_cursor_advance(url: str, route: str, by: int, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Until the (shared) round-robin cursor moved `by` steps: decisions go through Redis."""
    start = (await explain(url, route))["rr_cursor"]

    async def moved() -> bool:
        return bool(int((await explain(url, route))["rr_cursor"]) >= start + by)

    await wait_until(moved, timeout, 0.02)


async def metrics_text(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        assert response.status == 200
        return await response.text()


def metric_value(text: str, name: str, labels: str = "") -> float | None:
    pattern = "^" + re.escape(name) + (re.escape("{" + labels + "}") if labels else "") + r" (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else None


async def explain(url: str, route: str) -> dict[str, Any]:
    status, body = await get_json(f"{url}/v1/routes/{route}/explain")
    assert status == 200, body
    assert isinstance(body, dict)
    return body


async def target_state(url: str, route: str, target: str) -> dict[str, Any]:
    body = await explain(url, route)
    found: dict[str, Any] = next(t for t in body["targets"] if t["target"] == target)
    return found


async def chat(session: aiohttp.ClientSession, url: str, model: str) -> tuple[int, str, str]:
    body = {"model": model, "messages": MESSAGES}
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        await response.read()
        return (
            response.status,
            response.headers.get("x-edgeroute-provider", ""),
            response.headers.get("x-edgeroute-attempts", ""),
        )


def script_loads(client: redis.Redis) -> int:
    """SCRIPT calls so far (Redis 7 counts `script|load` apart, older ones `script`)."""
    stats = client.info("commandstats")
    return sum(
        int(stats.get(key, {}).get("calls", 0)) for key in ("cmdstat_script|load", "cmdstat_script")
    )


def keys_of(client: redis.Redis, prefix: str, route: str) -> list[str]:
    return [
        k.decode() if isinstance(k, bytes) else k for k in client.keys(f"{{{prefix}:{route}}}*")
    ]


async def mocks_total(mocks: dict[str, Mock]) -> int:
    return sum([await mock.requests() for mock in mocks.values()])


# ---- Redis killed during load ----------------------------------------------------------------


async def test_redis_killed_during_load_degrades_then_returns_without_failing_a_request(
    redis_server: RedisServer,
) -> None:
    client = redis.Redis.from_url(redis_server.url)
    async with mock_upstreams(
        a=MockSettings(latency_ms=UPSTREAM_MS), b=MockSettings(latency_ms=UPSTREAM_MS)
    ) as mocks:
        state = state_section(redis_server.url)
        prefix = state["key_prefix"]
        document = gateway_config(mocks, [rr_route("chat", "a", "b")], state=state)
        load = Load([], "chat")
        async with running_gateway(document) as (url, _app):
            load.urls = [url]
            async with load.running():
                warm = time.monotonic()
                await load.wait_for(20, warm)
                measured_from = time.monotonic()  # connections are open, scripts loaded
                assert await shared_state(url) == "live"
                text = await metrics_text(url)
                assert metric_value(text, "edgeroute_state_degraded") == 0
                assert metric_value(text, "edgeroute_records_dropped_total") == 0
                assert keys_of(client, prefix, "chat")  # routing really lives in Redis

                killed = time.monotonic()
                await asyncio.to_thread(redis_server.kill)
                await wait_shared_state(url, "degraded", 5.0)
                switched_after = time.monotonic() - killed
                body = await readyz(url)
                assert body["status"] == "ready"
                assert body["state_backend"] == "redis"
                assert body["state_error"]  # says why
                text = await metrics_text(url)
                errors = sum(
                    metric_value(text, "edgeroute_state_errors_total", f'op="{op}"') or 0
                    for op in ("decide", "record", "snapshot")
                )
                assert errors >= 1
                # Routing carries on locally for a while.
                await load.wait_for(60, killed)

                await asyncio.to_thread(redis_server.restart)  # same port, empty
                restarted = time.monotonic()
                await wait_shared_state(url, "live")
                back_after = time.monotonic() - restarted
                # Shared state resumed on the empty server: scripts loaded, keys rebuilt.
                await wait_cursor_advance(url, "chat", 20)
                assert keys_of(client, prefix, "chat")

                # Scripts vanish under a live gateway (SCRIPT FLUSH, a failover): NOSCRIPT is
                # answered by reloading them, and requests keep succeeding.
                loads_before = script_loads(client)
                client.script_flush()
                await load.wait_for(30, time.monotonic())
                await wait_shared_state(url, "live")
                await wait_cursor_advance(url, "chat", 20)
                assert script_loads(client) > loads_before  # loaded again, then used
                errorstats = client.info("errorstats")
                if errorstats:  # Redis >= 6.2 counts error replies: NOSCRIPT was seen
                    assert errorstats.get("errorstat_NOSCRIPT", {}).get("count", 0) >= 1
        # Every client request reached an upstream exactly once (no failover was needed).
        assert await mocks_total(mocks) == len(load.samples)

    assert_all_succeeded(load.samples)
    assert_latency_bounded([s for s in load.samples if s.started >= measured_from], latency_bound())
    during = [s for s in load.samples if killed <= s.started < restarted]
    assert len(during) >= 60
    assert {s.provider for s in during} == {"a", "b"}  # local round robin spreads too
    assert switched_after < 3.0
    assert back_after < 8.0  # probe backoff is capped (2 s)


@pytest.mark.slow
async def test_two_replica_processes_ride_out_a_redis_crash_and_share_state_again(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with mock_upstreams(
        a=MockSettings(latency_ms=UPSTREAM_MS),
        b=MockSettings(latency_ms=UPSTREAM_MS),
        sick=MockSettings(error_rate=1),
    ) as mocks:
        document = gateway_config(
            mocks,
            [rr_route("chat", "a", "b"), cost_route("guarded", ("sick", 1.0), ("b", 2.0))],
            state=state_section(redis_server.url),
            breaker={"failure_threshold": 2, "open_timeout_s": 60},
        )
        replicas = [GatewayProcess(document, tmp_path, port=free_port()) for _ in range(2)]
        try:
            await asyncio.gather(*(asyncio.to_thread(r.wait_ready) for r in replicas))
            urls = [r.url for r in replicas]
            load = Load(urls, "chat", workers=4)
            async with load.running():
                await load.wait_for(40, time.monotonic())
                measured_from = time.monotonic()
                for url in urls:
                    assert await shared_state(url) == "live"

                killed = time.monotonic()
                await asyncio.to_thread(redis_server.kill)
                for url in urls:
                    await wait_shared_state(url, "degraded", 5.0)
                await load.wait_for(60, killed)

                await asyncio.to_thread(redis_server.restart)
                for url in urls:
                    await wait_shared_state(url, "live")
                    await wait_cursor_advance(url, "chat", 10)
                await load.wait_for(40, time.monotonic())

            # Shared again: a breaker opened through one replica keeps the other one away.
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
                for _ in range(2):
                    assert await chat(session, urls[0], "guarded") == (200, "b", "2")
                first = await target_state(urls[0], "guarded", "sick")
                second = await target_state(urls[1], "guarded", "sick")
                assert first["breaker"] == second["breaker"] == "open"
                assert first["generation"] == second["generation"] == 1
                for _ in range(3):
                    assert await chat(session, urls[1], "guarded") == (200, "b", "1")
                assert await mocks["sick"].requests() == 2
                for url in urls:
                    assert await shared_state(url) == "live"
        finally:
            for replica in replicas:
                replica.kill()

    assert_all_succeeded(load.samples)
    assert_latency_bounded(
        [s for s in load.samples if s.started >= measured_from], latency_bound(1.0)
    )
    assert {s.provider for s in load.samples if s.started >= killed} == {"a", "b"}


# ---- Redis frozen --------------------------------------------------------------------------


async def test_frozen_redis_adds_at_most_the_state_timeout_and_nothing_stays_wedged(
    redis_server: RedisServer,
) -> None:
    async with mock_upstreams(
        a=MockSettings(latency_ms=UPSTREAM_MS), b=MockSettings(latency_ms=UPSTREAM_MS)
    ) as mocks:
        # Short leases: a decide that timed out on the frozen server still runs once it
        # thaws, and its lease (nobody will give it back) must expire by itself.
        state = state_section(redis_server.url, lease_ttl_s=2)
        document = gateway_config(mocks, [rr_route("chat", "a", "b")], state=state)
        load = Load([], "chat")
        async with running_gateway(document) as (url, app):
            load.urls = [url]
            async with load.running():
                await load.wait_for(20, time.monotonic())
                measured_from = time.monotonic()
                assert await shared_state(url) == "live"

                frozen = time.monotonic()
                await asyncio.to_thread(redis_server.pause)
                try:
                    await wait_shared_state(url, "degraded", 5.0)
                    assert "redis did not answer" in (await readyz(url))["state_error"]
                    await load.wait_for(60, frozen)
                finally:
                    await asyncio.to_thread(redis_server.resume)
                thawed = time.monotonic()
                await wait_shared_state(url, "live")
                # Nothing wedged: requests keep flowing through shared state.
                await wait_cursor_advance(url, "chat", 40)
                await load.wait_for(20, time.monotonic())

            async def settled() -> bool:
                targets = (await explain(url, "chat"))["targets"]
                return all(t["in_flight"] == 0 for t in targets)

            await wait_until(settled, 8.0, 0.1)
            proxy = app[PROXY]
            assert proxy.in_flight == 0
            await wait_until(lambda: proxy.accounting.recorder.pending == 0, 5.0)

    assert_all_succeeded(load.samples)
    assert_latency_bounded([s for s in load.samples if s.started >= measured_from], latency_bound())
    assert len([s for s in load.samples if frozen <= s.started < thawed]) >= 60


# ---- Redis restarted empty ---------------------------------------------------------------


async def test_restarted_empty_redis_rebuilds_breakers_and_windows_from_traffic(
    redis_server: RedisServer,
) -> None:
    async with mock_upstreams(
        sick=MockSettings(error_rate=1), b=MockSettings(latency_ms=UPSTREAM_MS)
    ) as mocks:
        open_s = 30.0
        document = gateway_config(
            mocks,
            [cost_route("r", ("sick", 1.0), ("b", 2.0))],
            # A roomy timeout: this test is about lost state, not about a slow Redis.
            state=state_section(redis_server.url, timeout_ms=1000),
            breaker={"failure_threshold": 3, "open_timeout_s": open_s},
        )
        async with (
            running_gateway(document) as (url, _app),
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session,
        ):
            for _ in range(3):
                assert await chat(session, url, "r") == (200, "b", "2")
            sick = await target_state(url, "r", "sick")
            assert (sick["breaker"], sick["generation"], sick["window"]["failures"]) == (
                "open",
                1,
                3,
            )
            assert await chat(session, url, "r") == (200, "b", "1")

            load = Load([url], "r", workers=4)
            async with load.running():
                await load.wait_for(10, time.monotonic())
                await asyncio.to_thread(redis_server.restart)  # the open breaker is gone
                restarted = time.monotonic()
                await wait_shared_state(url, "live")
                await load.wait_for(40, time.monotonic())
            assert_all_succeeded(load.samples)

            # The fresh server learnt sick's failures from traffic and opened it again: its
            # first opening (generation 1), after the restart.
            await wait_shared_state(url, "live")
            sick = await target_state(url, "r", "sick")
            assert sick["breaker"] == "open"
            assert sick["generation"] == 1
            since_restart_ms = (time.monotonic() - restarted) * 1000
            assert sick["open_remaining_ms"] >= open_s * 1000 - since_restart_ms - 50
            assert sick["window"]["failures"] >= 3
            assert sick["window"]["successes"] == 0
            good = await target_state(url, "r", "b")
            assert good["breaker"] == "closed" and good["window"]["failures"] == 0
            # Windows restarted with the server: b's only count traffic since then.
            assert 0 < good["window"]["successes"] < await mocks["b"].requests()
            assert (await explain(url, "r"))["order"] == ["b"]

            before = await mocks["sick"].requests()
            for _ in range(3):
                assert await chat(session, url, "r") == (200, "b", "1")
            assert await mocks["sick"].requests() == before


# ---- degraded mode at the state layer ------------------------------------------------------


async def test_admin_reset_is_fleet_wide_or_refused(redis_server: RedisServer) -> None:
    """While degraded a reset would reach one replica only: it says so (503), not 200."""
    async with mock_upstreams(a=MockSettings(), b=MockSettings()) as mocks:
        document = gateway_config(
            mocks,
            [rr_route("chat", "a", "b")],
            state=state_section(redis_server.url),
            server={"admin_token": "admin-s3cret"},
        )
        headers = {"Authorization": "Bearer admin-s3cret"}
        reset_path = "/admin/routes/chat/targets/a/reset"
        async with running_gateway(document) as (url, _app), aiohttp.ClientSession() as http:
            async with http.post(f"{url}{reset_path}", headers=headers) as response:
                assert response.status == 200
            await asyncio.to_thread(redis_server.kill)
            status, _, _ = await chat(http, url, "chat")  # notices: routes locally
            assert status == 200
            await wait_shared_state(url, "degraded", 5.0)
            async with http.post(f"{url}{reset_path}", headers=headers) as response:
                assert response.status == 503
                body = await response.json()
                assert body["error"]["code"] == "state_unavailable"
                assert "only this replica" in body["error"]["message"]
            await asyncio.to_thread(redis_server.restart)
            await wait_shared_state(url, "live", 10.0)
            async with http.post(f"{url}{reset_path}", headers=headers) as response:
                assert response.status == 200


def two_targets(**breaker: Any) -> RouteSpec:
    return RouteSpec(
        name="faults",
        strategy=RoutingStrategy.cost_based(),
        targets=(
            TargetSpec(id="t0", provider="p0", model="m0", price_per_mtok=1.0),
            TargetSpec(id="t1", provider="p1", model="m1", price_per_mtok=2.0),
        ),
        breaker=BreakerParams(**breaker),
    )


def fallback(url: str, changes: list[bool], *, timeout_ms: float = 100.0) -> FallbackState:
    primary = RedisState(url, key_prefix=unique_prefix(), timeout_ms=timeout_ms)
    return FallbackState(primary, probe_min_s=0.02, probe_max_s=0.2, on_change=changes.append)


async def inflight(state: StateBackend, route: RouteSpec) -> list[int]:
    return [t.inflight for t in (await state.snapshot(route)).targets]


async def test_unreachable_redis_at_start_routes_locally_until_it_appears() -> None:
    port = free_port()
    changes: list[bool] = []
    state = fallback(f"redis://127.0.0.1:{port}/0", changes, timeout_ms=50)
    route = two_targets()
    try:
        started = time.perf_counter()
        decision = await state.decide(route)  # no Redis at all: a local decision, at once
        assert time.perf_counter() - started < 1.0
        assert decision.admission is not None and decision.target_id == "t0"
        assert state.degraded and changes == [True]
        assert "redis did not answer" in state.last_error
        await state.record(route, Outcome.for_admission(decision.admission, OutcomeKind.SUCCESS))
        assert await inflight(state, route) == [0, 0]  # the local snapshot, lease given back

        server = await asyncio.to_thread(RedisServer, port=port)
        try:
            await wait_until(lambda: not state.degraded, 5.0)
            assert changes == [True, False]
            decision = await state.decide(route)
            assert decision.admission is not None
            assert await inflight(state.primary, route) == [1, 0]  # taken in Redis this time
        finally:
            await asyncio.to_thread(server.stop)
    finally:
        await state.close()


async def test_outcomes_go_back_to_the_state_that_admitted_them(redis_server: RedisServer) -> None:
    changes: list[bool] = []
    state = fallback(redis_server.url, changes)
    route = two_targets(failure_threshold=1, open_timeout_ms=200, half_open_max_probes=1)
    try:
        # t0 fails once and opens; once half-open, a probe reservation is handed out.
        first = await state.decide(route)
        assert first.admission is not None and first.target_id == "t0"
        await state.record(route, Outcome.for_admission(first.admission, OutcomeKind.FAILURE))
        await asyncio.sleep(0.3)
        probe = await state.decide(route)
        assert probe.admission is not None and probe.admission.probe
        plain = [await state.decide(route) for _ in range(3)]  # t1: t0's only probe is taken
        assert all(d.target_id == "t1" for d in plain)
        snap = await state.primary.snapshot(route)
        assert [t.inflight for t in snap.targets] == [1, 3]
        assert snap.targets[0].probes_in_use == 1

        redis_server.pause()
        try:
            # The first outcome times out on the frozen server (it runs once Redis thaws);
            # the next ones arrive while degraded and never reach Redis on their own.
            assert plain[0].admission is not None
            await state.record(
                route, Outcome.for_admission(plain[0].admission, OutcomeKind.SUCCESS, 5.0)
            )
            assert state.degraded
            for decision in (probe, *plain[1:]):
                assert decision.admission is not None
                await state.record(
                    route, Outcome.for_admission(decision.admission, OutcomeKind.SUCCESS, 5.0)
                )
            # Admitted locally while degraded; it finishes after Redis is back.
            local = await state.decide(route)
            assert local.admission is not None
            assert await inflight(state.local, route) == [1, 0]
        finally:
            redis_server.resume()
        await wait_until(lambda: not state.degraded, 5.0)

        await state.record(route, Outcome.for_admission(local.admission, OutcomeKind.SUCCESS))
        assert await inflight(state.local, route) == [0, 0]  # the local lease is returned
        # Every Redis lease and the probe reservation are back, although their outcomes
        # arrived while Redis was away.
        snap = await state.primary.snapshot(route)
        assert [t.inflight for t in snap.targets] == [0, 0]
        assert snap.targets[0].probes_in_use == 0
        assert changes == [True, False]
    finally:
        await state.close()


async def test_a_decide_that_timed_out_on_a_frozen_redis_leaves_no_lease(
    redis_server: RedisServer,
) -> None:
    state = RedisState(redis_server.url, key_prefix=unique_prefix(), timeout_ms=100)
    route = two_targets()
    try:
        assert await inflight(state, route) == [0, 0]
        redis_server.pause()
        try:
            with pytest.raises(Exception, match="redis did not answer"):
                await state.decide(route)
        finally:
            redis_server.resume()
        # The thawed server still runs the decide it held and takes a lease; the client
        # knows the token it sent and releases it by token once Redis answers again.
        for _ in range(150):
            if await inflight(state, route) == [0, 0]:
                break
            await asyncio.sleep(0.02)
        assert await inflight(state, route) == [0, 0]
        members = redis.Redis.from_url(redis_server.url).zrange(
            route_keys(state.key_prefix, route.name)[2], 0, -1
        )
        assert [m for m in members if b"|" in m] == []  # only the '#' placeholder is left
    finally:
        await state.close()


# ---- outcome records are bounded ---------------------------------------------------------


def outcome(n: int) -> Outcome:
    return Outcome(target_id=f"t{n}", kind=OutcomeKind.SUCCESS, latency_ms=float(n))


class StuckState:
    """A state whose record_many blocks until released (a Redis that takes forever)."""

    name = "stuck"

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls = 0
        self.written: list[str] = []

    async def record_many(self, items: Sequence[tuple[RouteSpec, Outcome]]) -> None:
        self.calls += 1
        await self.release.wait()
        self.written += [o.target_id for _, o in items]


class FailingState:
    """A state whose record_many fails `failures` times, then works."""

    name = "failing"

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.written: list[str] = []

    async def record_many(self, items: Sequence[tuple[RouteSpec, Outcome]]) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("state is away")
        self.written += [o.target_id for _, o in items]


async def test_records_queued_behind_a_stuck_state_are_bounded_dropping_the_oldest() -> None:
    metrics = Metrics()
    state = StuckState()
    recorder = Recorder(
        state,  # type: ignore[arg-type]
        max_pending=5,
        max_batch=2,
        on_drop=lambda n: metrics.records_dropped.inc(n),
    )
    route = two_targets()
    recorder.start()
    try:
        recorder.submit(route, outcome(0))
        await wait_until(lambda: state.calls == 1, 2.0)  # t0 is being written (stuck)
        for n in range(1, 21):
            recorder.submit(route, outcome(n))
            assert recorder.pending <= 5
        assert recorder.pending == 5
        assert recorder.dropped == 15
        text = metrics.exposition().decode()
        assert metric_value(text, "edgeroute_records_dropped_total") == 15
        state.release.set()
        await wait_until(lambda: recorder.pending == 0 and len(state.written) == 6, 2.0)
        # The oldest were dropped: what is written is the one in flight and the newest five.
        assert state.written == ["t0", "t16", "t17", "t18", "t19", "t20"]
    finally:
        await recorder.stop()


async def test_recorder_keeps_going_after_the_state_fails() -> None:
    errors: list[BaseException] = []
    state = FailingState(failures=2)
    recorder = Recorder(state, max_batch=1, on_error=errors.append)  # type: ignore[arg-type]
    route = two_targets()
    recorder.start()
    try:
        for n in range(4):
            recorder.submit(route, outcome(n))
        await wait_until(lambda: recorder.pending == 0 and len(state.written) == 2, 2.0)
        assert len(errors) == 2 and all(isinstance(e, ConnectionError) for e in errors)
        recorder.submit(route, outcome(9))  # the task survived the failures
        await wait_until(lambda: state.written[-1:] == ["t9"], 2.0)
    finally:
        await recorder.stop()


async def test_recorder_written_waits_for_what_was_submitted_before_it() -> None:
    state = StuckState()
    recorder = Recorder(state, max_batch=1)  # type: ignore[arg-type]
    route = two_targets()
    assert recorder.written().done()  # nothing submitted: nothing to wait for
    recorder.start()
    try:
        recorder.submit(route, outcome(0))
        recorder.submit(route, outcome(1))
        first_two = recorder.written()
        recorder.submit(route, outcome(2))
        all_three = recorder.written()
        await wait_until(lambda: state.calls == 1, 2.0)  # t0 is being written (stuck)
        assert not first_two.done()
        state.release.set()
        await asyncio.wait_for(first_two, 2.0)
        assert state.written[:2] == ["t0", "t1"]
        await asyncio.wait_for(all_three, 2.0)
        assert state.written == ["t0", "t1", "t2"]
    finally:
        await recorder.stop()


async def test_stopping_the_recorder_writes_the_batch_in_flight() -> None:
    state = StuckState()
    recorder = Recorder(state, max_batch=2)  # type: ignore[arg-type]
    route = two_targets()
    recorder.start()
    for n in range(3):
        recorder.submit(route, outcome(n))
    await wait_until(lambda: state.calls == 1, 2.0)  # t0 and t1 are on their way
    asyncio.get_running_loop().call_later(0.1, state.release.set)
    await asyncio.wait_for(recorder.stop(), 5.0)
    assert state.written == ["t0", "t1", "t2"]


async def test_stopping_the_recorder_never_hangs_on_a_stuck_state() -> None:
    dropped: list[int] = []
    state = StuckState()  # never released
    recorder = Recorder(
        state,  # type: ignore[arg-type]
        max_batch=1,
        on_drop=dropped.append,
        stop_timeout_s=0.2,
    )
    route = two_targets()
    recorder.start()
    for n in range(3):
        recorder.submit(route, outcome(n))
    await wait_until(lambda: state.calls == 1, 2.0)
    started = time.perf_counter()
    await asyncio.wait_for(recorder.stop(), 5.0)
    assert time.perf_counter() - started < 2.0
    assert recorder.pending == 0
    assert recorder.dropped == 2 and dropped == [2]  # t1, t2: still queued, counted


async def test_state_call_latency_is_measured_while_live(redis_server: RedisServer) -> None:
    """edgeroute_state_call_seconds shows Redis creeping toward the timeout before any
    replica degrades: every successful decide is timed, and record batches too."""
    async with mock_upstreams(a=MockSettings(), b=MockSettings()) as mocks:
        document = gateway_config(
            mocks, [rr_route("chat", "a", "b")], state=state_section(redis_server.url)
        )
        async with running_gateway(document) as (url, _app), aiohttp.ClientSession() as http:
            for _ in range(7):
                status, _, _ = await chat(http, url, "chat")
                assert status == 200

            async def recorded() -> bool:
                text = await metrics_text(url)
                value = metric_value(text, "edgeroute_state_call_seconds_count", 'op="record"')
                return bool(value)

            await wait_until(recorded, 5.0)
            text = await metrics_text(url)
            decides = metric_value(text, "edgeroute_state_call_seconds_count", 'op="decide"')
            assert decides == 7
            slow = metric_value(text, "edgeroute_state_call_seconds_bucket", 'le="0.1",op="decide"')
            assert slow == 7  # all well under the state timeout on a local Redis
