"""A fleet decides like one process: several real `edgeroute serve` replicas on one Redis.

Every test here starts three (or more) gateway processes exactly as a user would
(`python -m edgeroute.cli serve`, see `GatewayProcess`) against a private real Redis (the
`redis_server` fixture), with mock upstreams running in this test process so the test can
steer them at runtime and count exactly what each one received. Traffic goes through the
official `openai` SDK (no client retries), spread over all replicas at once, and every claim
is proved with exact counts: what the upstream mocks received, what the clients got back
(`x-edgeroute-*` headers) and what each replica's `/v1/routes/{route}/explain` says.

The only clock that counts is Redis `TIME`, so the few explicit time bounds below (one
latency window, one open timeout, one lease TTL) are written as inequalities between
observations taken in a known order, never as "this took less than N ms".
"""

from __future__ import annotations

import asyncio
import email.utils
import glob
import itertools
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from edgeroute.mock_provider import MockSettings
from tests.support.ci import missing
from tests.support.gateway import (
    GatewayProcess,
    Mock,
    gateway_config,
    get_json,
    mock_upstreams,
    wait_until,
)
from tests.support.redis_servers import RedisServer, free_port

pytestmark = pytest.mark.slow

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "one fleet, please"}]
ADMIN_TOKEN = "fleet-admin-token"
REPLICAS = 3


# ---- configs -------------------------------------------------------------------------------


def target(provider: str, price: float = 0.0) -> dict[str, Any]:
    """A target whose id is its provider's name (so explain and admin URLs read naturally)."""
    return {
        "provider": provider,
        "model": f"{provider}-model",
        "id": provider,
        "input_cost_per_mtok": price,
    }


def route(name: str, strategy: str, targets: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": name, "strategy": strategy, "targets": targets, **extra}


class HasUrl(Protocol):
    @property
    def url(self) -> str: ...


@dataclass(frozen=True, slots=True)
class StateServer:
    url: str


@pytest.fixture(params=["standalone", "cluster"])
def fleet_redis(request: pytest.FixtureRequest) -> StateServer:
    """The same fleet scenarios on one Redis and on a 3-primary Redis Cluster."""
    if request.param == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        nodes = ",".join(f"{host}:{port}" for host, port in cluster.startup_nodes)
        return StateServer(f"redis+cluster://{nodes}")
    return StateServer(request.getfixturevalue("redis_server").url)


def fleet_config(
    mocks: Mapping[str, Mock],
    routes: list[dict[str, Any]],
    redis: HasUrl,
    *,
    state: Mapping[str, Any] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """One config document for every replica: same routes, same Redis, same key prefix."""
    return gateway_config(
        mocks,
        routes,
        server={"admin_token": ADMIN_TOKEN, "shutdown_timeout_s": 1},
        # A generous state timeout: these tests are about shared state, never degraded mode
        # (every replica checks on the way out that it never fell back to local state).
        state={
            "redis_url": redis.url,
            "key_prefix": f"fleet-{uuid.uuid4().hex[:10]}",
            "timeout_ms": 3000,
            **(state or {}),
        },
        **sections,
    )


# ---- the fleet -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Served:
    """One client request as the client saw it."""

    replica: int
    provider: str
    attempts: int
    reason: str
    started: float  # time.monotonic() just before the request was sent


@dataclass
class Replica:
    index: int
    process: GatewayProcess
    client: openai.AsyncOpenAI

    @property
    def url(self) -> str:
        return self.process.url

    async def chat(self, model: str) -> Served:
        started = time.monotonic()
        raw = await self.client.chat.completions.with_raw_response.create(
            model=model, messages=MESSAGES
        )
        completion = raw.parse()
        assert completion.choices[0].message.content
        headers = raw.headers
        return Served(
            self.index,
            headers["x-edgeroute-provider"],
            int(headers["x-edgeroute-attempts"]),
            headers["x-edgeroute-reason"],
            started,
        )

    async def explain(self, model: str) -> dict[str, Any]:
        status, body = await get_json(f"{self.url}/v1/routes/{model}/explain")
        assert status == 200, body
        assert isinstance(body, dict)
        return body

    async def target(self, model: str, target_id: str) -> dict[str, Any]:
        return by_target(await self.explain(model))[target_id]

    async def reset(self, model: str, target_id: str) -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{self.url}/admin/routes/{model}/targets/{target_id}/reset",
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            ) as response,
        ):
            assert response.status == 200, await response.text()


def by_target(explanation: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["target"]: t for t in explanation["targets"]}


@asynccontextmanager
async def fleet(
    document: dict[str, Any],
    workdir: Path,
    *,
    replicas: int = REPLICAS,
    envs: Mapping[int, Mapping[str, str]] | None = None,
) -> AsyncIterator[list[Replica]]:
    """`replicas` gateway processes on one config; every one is killed on the way out."""
    processes: list[GatewayProcess] = []
    async with AsyncExitStack() as stack:
        try:
            for index in range(replicas):
                env = {"EDGEROUTE_LOG_LEVEL": "WARNING", **((envs or {}).get(index) or {})}
                processes.append(GatewayProcess(document, workdir, port=free_port(), env=env))
            # Started together, waited for off the loop (the mocks live on this loop).
            await asyncio.gather(
                *(asyncio.to_thread(process.wait_ready, 60.0) for process in processes)
            )
            members = []
            for index, process in enumerate(processes):
                client = openai.AsyncOpenAI(
                    base_url=f"{process.url}/v1", api_key="sk-client", max_retries=0, timeout=60
                )
                await stack.enter_async_context(client)
                members.append(Replica(index, process, client))
            yield members
            for replica in members:
                if replica.process.process.poll() is not None:
                    continue  # killed on purpose by the test
                status, ready = await get_json(f"{replica.url}/readyz")
                assert status == 200, ready
                assert ready["shared_state"] == "live", (replica.index, ready)
                # Not even for a moment on local state, and no outcome was ever dropped.
                assert await shared_state_trouble(replica) == {}, replica.index
        finally:
            for process in processes:
                process.kill()


async def shared_state_trouble(replica: Replica) -> dict[str, float]:
    """Non-zero state error, degraded and dropped-record samples from a replica's /metrics."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{replica.url}/metrics") as response,
    ):
        text = await response.text()
    trouble = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if _TROUBLE.match(name) and float(value):
            trouble[name] = float(value)
    return trouble


_TROUBLE = re.compile(
    r"(edgeroute_state_errors_total|edgeroute_state_degraded|edgeroute_records_dropped_total)"
    r"(\{|$)"
)


async def settled(replica: Replica, *models: str, limit_s: float = 15.0) -> None:
    """Wait until every outcome has been recorded fleet-wide (no lease left in flight)."""

    async def idle() -> bool:
        for model in models:
            explanation = await replica.explain(model)
            if any(t["in_flight"] != 0 for t in explanation["targets"]):
                return False
        return True

    await wait_until(idle, limit_s, interval=0.05)


async def agreed(
    replicas: Sequence[Replica],
    model: str,
    *,
    normalize: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    tries: int = 5,
) -> dict[str, Any]:
    """Every replica's explain, read at the same time, is the same document; returns it.

    Explain reads shared state afresh on every call, so replicas can only differ when the
    state itself moved between the reads (a window bucket aging out): such reads are taken
    again, a lasting disagreement fails.
    """
    views: list[dict[str, Any]] = []
    for _ in range(tries):
        views = list(await asyncio.gather(*(r.explain(model) for r in replicas)))
        views = [without_estimate_ticks(view) for view in views]
        if normalize is not None:
            views = [normalize(view) for view in views]
        if all(view == views[0] for view in views[1:]):
            return views[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"replicas disagree on {model}: {views}")


async def gather_served(calls: Sequence[Awaitable[Served]]) -> list[Served]:
    return list(await asyncio.gather(*calls))


async def closed_loop(
    replicas: Sequence[Replica],
    model: str,
    *,
    clients_per_replica: int,
    requests_per_client: int | None = None,
    until: float | None = None,
) -> list[Served]:
    """Concurrent clients on every replica, each sending one request after another.

    Each client stops after `requests_per_client` requests or, with `until` (a
    time.monotonic() value), once that moment has passed.
    """
    served: list[Served] = []

    async def client(replica: Replica) -> None:
        sent = 0
        while True:
            if requests_per_client is not None and sent >= requests_per_client:
                return
            if until is not None and time.monotonic() >= until:
                return
            served.append(await replica.chat(model))
            sent += 1

    await asyncio.gather(
        *(client(replica) for replica in replicas for _ in range(clients_per_replica))
    )
    return served


def spread(served: Sequence[Served]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in served:
        counts[item.provider] = counts.get(item.provider, 0) + 1
    return counts


# ---- breakers: opened once for the fleet, probed once for the fleet -------------------------


async def test_a_failing_provider_gets_exactly_failure_threshold_requests_from_the_fleet(
    fleet_redis: StateServer, tmp_path: Path
) -> None:
    """`failure_threshold` failing requests in all, not per replica; then fleet-wide probes.

    Two routes, each with a provider that starts failing between traffic waves (nothing in
    flight to it) and a healthy fallback:

    - `lit`: failure_threshold 6 and 3 replicas x 2 clients, so never more than the threshold
      in flight: the sick provider gets exactly 6 requests. Per-replica breakers would
      let up to 18 through.
    - `hot`: failure_threshold 3 but 3 replicas x 4 clients. While a provider has no failure
      on record, nothing distinguishes it from a healthy one, so one request first makes the
      fleet learn of it (1 failure, nothing in flight); from then on the suspect rule
      (failures + in flight < threshold) admits exactly two more of the 12 concurrent ones.

    Then `hot` recovers: exactly `half_open_max_probes` probes reach it across the fleet,
    `success_threshold` successes close it, and every replica uses it again at once.
    """
    probes, success_threshold = 2, 3
    async with mock_upstreams(lit=MockSettings(), hot=MockSettings(), ok=MockSettings()) as mocks:
        document = fleet_config(
            mocks,
            [
                route(
                    "lit",
                    "cost",
                    [target("lit", 1.0), target("ok", 5.0)],
                    breaker={"failure_threshold": 6, "open_timeout_s": 120},
                ),
                route(
                    "hot",
                    "cost",
                    [target("hot", 1.0), target("ok", 5.0)],
                    breaker={
                        "failure_threshold": 3,
                        "open_timeout_s": 6,
                        "half_open_max_probes": probes,
                        "success_threshold": success_threshold,
                        "probe_ttl_s": 60,
                    },
                ),
            ],
            fleet_redis,
        )
        async with fleet(document, tmp_path) as replicas:
            # Wave 1, healthy: every replica sends its traffic to the cheap providers.
            for model in ("lit", "hot"):
                served = await closed_loop(
                    replicas, model, clients_per_replica=2, requests_per_client=2
                )
                assert spread(served) == {model: 12}
            await settled(replicas[0], "lit", "hot")
            before = {name: await mocks[name].requests() for name in ("lit", "hot")}
            assert before == {"lit": 12, "hot": 12}

            # `lit` starts failing with nothing in flight; wave 2 over the whole fleet.
            await mocks["lit"].configure(error_rate=1)
            served = await closed_loop(
                replicas, "lit", clients_per_replica=2, requests_per_client=5
            )
            assert len(served) == 30  # every client request succeeded: failover hid it
            assert {s.provider for s in served} == {"ok"}
            assert sorted(s.attempts for s in served) == [1] * 24 + [2] * 6
            assert await mocks["lit"].requests() - before["lit"] == 6

            # `hot` starts failing; the fleet learns of it from one request ...
            await mocks["hot"].configure(error_rate=1)
            first = await replicas[0].chat("hot")
            assert (first.provider, first.attempts) == ("ok", 2)
            hot = await replicas[1].target("hot", "hot")
            assert (hot["breaker"], hot["consecutive_failures"], hot["in_flight"]) == (
                "closed",
                1,
                0,
            )
            # ... and 12 concurrent requests through three replicas add exactly two more.
            served = await gather_served([r.chat("hot") for r in replicas for _ in range(4)])
            assert {s.provider for s in served} == {"ok"}
            assert sorted(s.attempts for s in served) == [1] * 10 + [2] * 2
            assert await mocks["hot"].requests() - before["hot"] == 3

            # Every replica has stopped choosing either of them.
            await settled(replicas[0], "lit", "hot")
            for model in ("lit", "hot"):
                explanation = await agreed(replicas, model, normalize=without_countdowns)
                sick = by_target(explanation)[model]
                assert sick["breaker"] == "open"
                assert not sick["admissible"]
                assert explanation["order"] == ["ok"]
                for replica in replicas:
                    again = await replica.chat(model)
                    assert (again.provider, again.attempts) == ("ok", 1)
            assert await mocks["lit"].requests() - before["lit"] == 6
            assert await mocks["hot"].requests() - before["hot"] == 3

            # `hot` gets well (slow, so the probes overlap the burst below) before its open
            # timeout ends; no request reaches it while the breaker is open.
            await mocks["hot"].configure(error_rate=0, latency_ms=3000)

            async def all_half_open() -> bool:
                states = [await r.target("hot", "hot") for r in replicas]
                return all(s["breaker"] == "half_open" for s in states)

            await wait_until(all_half_open, 15.0, interval=0.05)
            assert await mocks["hot"].requests() - before["hot"] == 3

            # Nine concurrent requests through three replicas: the fleet has two probe slots.
            burst = asyncio.gather(*(r.chat("hot") for r in replicas for _ in range(3)))

            async def probes_out() -> bool:
                return int((await replicas[2].target("hot", "hot"))["probes_in_use"]) == probes

            await wait_until(probes_out, 10.0)
            for replica in replicas:
                hot = await replica.target("hot", "hot")
                assert hot["excluded_because"] == "half-open, every probe slot taken"
            served = list(await burst)
            assert spread(served) == {"hot": probes, "ok": 9 - probes}
            for item in served:
                if item.provider == "hot":
                    assert item.reason.startswith("half-open probe of hot")
            assert await mocks["hot"].requests() - before["hot"] == 3 + probes
            await settled(replicas[0], "hot")

            # Two successes of three: still half-open; the third closes it, fleet-wide.
            await mocks["hot"].configure(latency_ms=0)
            hot = await replicas[0].target("hot", "hot")
            assert (hot["breaker"], hot["half_open_successes"]) == ("half_open", probes)
            for successes in range(probes, success_threshold):
                replica = replicas[successes % REPLICAS]
                probe = await replica.chat("hot")
                assert probe.provider == "hot"
                assert probe.reason.startswith("half-open probe of hot")
                await settled(replica, "hot")
            explanation = await agreed(replicas, "hot")
            hot = by_target(explanation)["hot"]
            assert (hot["breaker"], hot["consecutive_failures"]) == ("closed", 0)
            assert explanation["order"] == ["hot", "ok"]
            for replica in replicas:
                again = await replica.chat("hot")
                assert (again.provider, again.attempts) == ("hot", 1)
                assert again.reason.startswith("cost: hot")
            assert await mocks["hot"].requests() - before["hot"] == 3 + success_threshold + 3


async def test_what_was_admitted_before_the_first_failure_is_known_still_goes_through(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The limit of the suspect rule: it needs one failure on record to act on.

    With no failure recorded, a provider that has just started failing looks exactly like a
    healthy one, so every request admitted before the first failure comes back reaches it:
    the fleet sends it max(failure_threshold, admitted before the first failure), here the
    12 concurrent first requests (its failures take 1 s, so all 12 are admitted first).
    Never more, though: not one request after the failures are on record.
    """
    async with mock_upstreams(sick=MockSettings(), ok=MockSettings()) as mocks:
        document = fleet_config(
            mocks,
            [
                route(
                    "r",
                    "cost",
                    [target("sick", 1.0), target("ok", 5.0)],
                    breaker={"failure_threshold": 3, "open_timeout_s": 120},
                )
            ],
            redis_server,
        )
        async with fleet(document, tmp_path) as replicas:
            served = await closed_loop(replicas, "r", clients_per_replica=4, requests_per_client=1)
            assert spread(served) == {"sick": 12}
            await settled(replicas[0], "r")
            await mocks["sick"].configure(error_rate=1, latency_ms=1000)
            served = await closed_loop(replicas, "r", clients_per_replica=4, requests_per_client=3)
            assert spread(served) == {"ok": 36}
            assert sorted(s.attempts for s in served) == [1] * 24 + [2] * 12
            assert await mocks["sick"].requests() == 12 + 12
            await settled(replicas[0], "r")
            explanation = await agreed(replicas, "r", normalize=without_countdowns)
            assert by_target(explanation)["sick"]["breaker"] == "open"


def without_estimate_ticks(explanation: dict[str, Any]) -> dict[str, Any]:
    """Explain minus the estimate's age and waiting time (and the staleness that follows from
    the age): they tick by the millisecond, so two reads a moment apart differ."""
    ticking = ("age_ms", "stale", "waiting_ms")
    targets = [
        {**t, "estimate": {k: v for k, v in t["estimate"].items() if k not in ticking}}
        for t in explanation["targets"]
    ]
    return {**explanation, "targets": targets}


def without_countdowns(explanation: dict[str, Any]) -> dict[str, Any]:
    """Explain minus what ticks with the clock (remaining open/cooldown milliseconds)."""
    targets = []
    for item in explanation["targets"]:
        item = dict(item)
        item.pop("open_remaining_ms")
        item.pop("cooldown_remaining_ms")
        item.pop("excluded_for_ms")
        if item["excluded_because"] is not None:
            item["excluded_because"] = re.sub(r"\d+ ms", "N ms", item["excluded_because"])
        targets.append(item)
    return {**explanation, "targets": targets}


# ---- round robin -----------------------------------------------------------------------------


async def test_round_robin_is_one_cursor_for_the_whole_fleet(
    fleet_redis: StateServer, tmp_path: Path
) -> None:
    async with mock_upstreams(a=MockSettings(), b=MockSettings(), c=MockSettings()) as mocks:
        document = fleet_config(
            mocks,
            [route("rr", "round_robin", [target("a"), target("b"), target("c")])],
            fleet_redis,
        )
        async with fleet(document, tmp_path) as replicas:
            total, k = 100, 3
            remaining = iter(range(total))

            async def client(replica: Replica) -> list[Served]:
                mine = []
                for _ in remaining:  # one shared budget: exactly `total` requests in all
                    mine.append(await replica.chat("rr"))
                return mine

            per_client = await asyncio.gather(*(client(r) for r in replicas for _ in range(5)))
            served = [item for chunk in per_client for item in chunk]
            assert len(served) == total
            assert {s.replica for s in served} == {0, 1, 2}  # spread over every replica
            counts = spread(served)
            assert set(counts.values()) <= {total // k, -(-total // k)}
            # The cursor starts at a: 100 = 3 x 33 + 1, so a gets the extra one.
            assert counts == {"a": 34, "b": 33, "c": 33}
            assert {name: await mock.requests() for name, mock in mocks.items()} == counts
            await settled(replicas[0], "rr")
            explanation = await agreed(replicas, "rr")
            assert explanation["rr_cursor"] == total + 1  # the cursor the next request takes
            assert explanation["order"] == ["b", "c", "a"]  # the 101st goes to b


# ---- latency and hybrid: one window for the fleet ---------------------------------------------


async def test_latency_and_hybrid_move_the_whole_fleet_away_within_one_window(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A provider turns slow: every replica moves away at once and only explores it again.

    `y` is the fastest of three, then turns slow at t0. The shared, time-decayed estimate (and
    the time its requests have been out unanswered) moves every replica to a faster target
    within a second, so from t0 + window_s on a replica can only send `y` a request to
    re-measure it through the exploration budget. Each request's `x-edgeroute-reason` names
    what it was decided on, which proves that per request. All replicas' explain outputs
    agree (same order, same scores) before and after.
    """
    window_s, slow_ms = 2.0, 500.0
    async with mock_upstreams(
        x=MockSettings(latency_ms=20), y=MockSettings(), z=MockSettings(latency_ms=50)
    ) as mocks:
        targets = [target("x", 2.0), target("y", 0.5), target("z", 1.0)]
        document = fleet_config(
            mocks,
            [route("lat", "latency", targets), route("hyb", "hybrid", targets)],
            redis_server,
            # Every decide may explore: the test needs y re-measured on its first chance.
            latency={"window_s": window_s, "buckets": 4, "explore_share": 1.0},
        )
        models = ("lat", "hyb")
        async with fleet(document, tmp_path) as replicas:
            # Warm up: every target gets measured, then y is the fastest for every replica.
            for model in models:
                for i in range(6):
                    await replicas[i % REPLICAS].chat(model)
                    await settled(replicas[0], model)
            for model in models:
                explanation = await agreed(replicas, model)
                assert explanation["order"][0] == "y", explanation
                assert by_target(explanation)["y"]["estimate"]["latency_ms"] is not None

            await mocks["y"].configure(latency_ms=slow_ms)
            t0 = time.monotonic()
            until = t0 + window_s + 1.0
            drives = [
                closed_loop(replicas, model, clients_per_replica=2, until=until) for model in models
            ]
            served = dict(zip(models, await asyncio.gather(*drives), strict=True))
            for model in models:
                for item in served[model]:
                    if item.provider == "y" and item.started >= t0 + window_s:
                        assert "exploring y" in item.reason, (model, item)
                for replica in replicas:
                    # Every replica moved away from y (to a faster target).
                    assert any(
                        s.replica == replica.index and s.provider != "y" for s in served[model]
                    ), (model, replica.index)
            await settled(replicas[0], *models)

            await asyncio.sleep(3.2)  # explore_after_s: every estimate is stale now
            for model in models:
                for _ in range(3):  # the stalest first: y within three explorations
                    explored = await replicas[0].chat(model)
                    await settled(replicas[0], model)
                    if explored.provider == "y":
                        break
                assert explored.provider == "y" and "exploring y" in explored.reason, explored
                explanation = await agreed(replicas, model)
                y = by_target(explanation)["y"]
                # The re-measurement replaced y's estimate: it ranks last on every replica.
                assert y["estimate"]["latency_ms"] >= slow_ms
                assert explanation["order"][-1] == "y", explanation
                # Best first, but for a stale target the next request explores (z, unused).
                ranked = [
                    t
                    for t in explanation["order"]
                    if not by_target(explanation)[t]["estimate"]["explored_next"]
                ]
                scores = [by_target(explanation)[t]["score"] for t in ranked]
                assert scores == sorted(scores, reverse=True)
                for replica in replicas:
                    nxt = await replica.chat(model)
                    assert nxt.provider != "y" or "exploring y" in nxt.reason, nxt


# ---- admin -----------------------------------------------------------------------------------


async def test_a_breaker_reset_through_one_replica_holds_for_all(
    fleet_redis: StateServer, tmp_path: Path
) -> None:
    async with mock_upstreams(a=MockSettings(error_rate=1), b=MockSettings()) as mocks:
        document = fleet_config(
            mocks,
            [route("r", "cost", [target("a", 1.0), target("b", 2.0)])],
            fleet_redis,
            breaker={"failure_threshold": 1, "open_timeout_s": 300},
        )
        async with fleet(document, tmp_path) as replicas:
            first = await replicas[0].chat("r")
            assert (first.provider, first.attempts) == ("b", 2)
            await settled(replicas[0], "r")
            opened = await agreed(replicas, "r", normalize=without_countdowns)
            assert by_target(opened)["a"]["breaker"] == "open"
            await mocks["a"].configure(error_rate=0)
            for replica in replicas:
                assert (await replica.chat("r")).provider == "b"  # still open: a left alone
            assert await mocks["a"].requests() == 1

            await replicas[1].reset("r", "a")
            explanation = await agreed(replicas, "r")
            a = by_target(explanation)["a"]
            assert (a["breaker"], a["consecutive_failures"], a["admissible"]) == (
                "closed",
                0,
                True,
            )
            assert a["generation"] == by_target(opened)["a"]["generation"] + 1
            assert explanation["order"] == ["a", "b"]
            for replica in replicas:  # in effect on every replica's very next request
                served = await replica.chat("r")
                assert (served.provider, served.attempts) == ("a", 1)
            assert await mocks["a"].requests() == 4


# ---- skewed clocks -----------------------------------------------------------------------------


def libfaketime() -> str | None:
    patterns = [
        "/usr/lib/*/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
        "/usr/local/lib/faketime/libfaketime.so.1",
        "/usr/lib64/faketime/libfaketime.so.1",
    ]
    for pattern in patterns:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


async def date_skew_s(replica: Replica) -> float:
    """The replica's own wall clock (its `Date` header) minus ours, in seconds."""
    async with aiohttp.ClientSession() as session, session.get(f"{replica.url}/healthz") as resp:
        assert resp.status == 200
        theirs = email.utils.parsedate_to_datetime(resp.headers["Date"]).timestamp()
    return theirs - time.time()


@dataclass(frozen=True, slots=True)
class Seen:
    replica: int
    sent: float  # time.monotonic() before the request
    answered: float  # ... and after the answer
    target: dict[str, Any]


async def observe(replica: Replica, model: str, target_id: str) -> Seen:
    sent = time.monotonic()
    found = await replica.target(model, target_id)
    return Seen(replica.index, sent, time.monotonic(), found)


async def test_replicas_with_skewed_clocks_agree_because_only_redis_time_counts(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """One replica runs two hours ahead (libfaketime); breakers and windows still agree.

    Observations alternate between a normal and the skewed replica, so each one is taken
    after the one before: a breaker's phase (open, then half-open) must never go back along
    that sequence and its remaining open time must only shrink, by no more than the time
    between the two observations. A replica deciding on its own clock would see the breaker
    half-open at once (it believes the open timeout ended two hours ago).
    """
    library = libfaketime()
    if library is None:
        missing("libfaketime", install="Debian package faketime")
    skew_s = 2 * 3600.0
    open_timeout_s = 4.0
    skewed_env = {
        "LD_PRELOAD": library,
        "FAKETIME": "+2h",
        # The wall clock is what replicas could disagree on; monotonic clocks stay real.
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_NO_CACHE": "1",
    }
    async with mock_upstreams(sick=MockSettings(error_rate=1), ok=MockSettings()) as mocks:
        document = fleet_config(
            mocks,
            [
                route(
                    "brk",
                    "cost",
                    [target("sick", 1.0), target("ok", 2.0)],
                    breaker={
                        "failure_threshold": 1,
                        "open_timeout_s": open_timeout_s,
                        "success_threshold": 1,
                    },
                ),
                route("win", "latency", [target("ok")], latency={"window_s": 4, "buckets": 4}),
            ],
            redis_server,
        )
        async with fleet(document, tmp_path, envs={2: skewed_env}) as replicas:
            normal, skewed = replicas[:2], replicas[2]
            # The skew took effect inside that child, and only there.
            assert abs(await date_skew_s(normal[0]) - 0) < 60
            assert abs(await date_skew_s(skewed) - skew_s) < 60

            # Windows: samples recorded through any replica land in the same buckets.
            for replica in (skewed, normal[0], skewed, normal[1], skewed):
                assert (await replica.chat("win")).provider == "ok"
            await settled(replicas[0], "win")
            window = by_target(await agreed(replicas, "win"))["ok"]["window"]
            assert window["successes"] == 5
            # ... and leave them together (window 4 s): never back once gone.
            seen: list[Seen] = []
            for i in range(400):
                seen.append(await observe(replicas[i % REPLICAS], "win", "ok"))
                if all(s.target["window"]["successes"] == 0 for s in seen[-REPLICAS:]):
                    break
                await asyncio.sleep(0.02)
            counts = [s.target["window"]["successes"] for s in seen]
            assert counts[-1] == 0, counts
            assert counts == sorted(counts, reverse=True), counts  # only ever decreasing
            assert {s.replica for s in seen if s.target["window"]["successes"] == 5} == {
                0,
                1,
                2,
            }

            # Breakers: opened through a normal replica ...
            sent = time.monotonic()
            first = await normal[0].chat("brk")
            opened_by = time.monotonic()
            assert (first.provider, first.attempts) == ("ok", 2)
            await mocks["sick"].configure(error_rate=0)
            seen = []
            while True:
                # Alternate normal and skewed observers.
                observer = (normal[0], skewed, normal[1], skewed)[len(seen) % 4]
                seen.append(await observe(observer, "brk", "sick"))
                if (
                    seen[-1].target["breaker"] == "half_open"
                    and len({s.replica for s in seen if s.target["breaker"] == "half_open"})
                    == REPLICAS
                ):
                    break
                assert time.monotonic() < opened_by + open_timeout_s + 30, seen[-1]
                await asyncio.sleep(0.02)
            phases = [0 if s.target["breaker"] == "open" else 1 for s in seen]
            assert {s.target["breaker"] for s in seen} == {"open", "half_open"}
            assert phases == sorted(phases), [(s.replica, s.target["breaker"]) for s in seen]
            assert {s.replica for s in seen if s.target["breaker"] == "open"} == {0, 1, 2}
            for before, after in itertools.pairwise(seen):
                if after.target["breaker"] != "open":
                    break
                shrink = before.target["open_remaining_ms"] - after.target["open_remaining_ms"]
                elapsed_ms = (after.answered - before.sent) * 1000
                assert -2 <= shrink <= elapsed_ms + 2, (before, after)
            # It half-opened one open timeout after it opened, in real time, for everyone.
            last_open = max(s.sent for s in seen if s.target["breaker"] == "open")
            first_half_open = min(s.answered for s in seen if s.target["breaker"] == "half_open")
            # (10 ms for Redis TIME's millisecond floor.)
            assert last_open < opened_by + open_timeout_s + 0.01
            assert first_half_open >= sent + open_timeout_s - 0.01
            generation = {s.target["generation"] for s in seen if s.target["breaker"] != "open"}
            assert len(generation) == 1

            # The skewed replica sends the probe; its success closes the breaker for all.
            probe = await skewed.chat("brk")
            assert probe.provider == "sick"
            assert probe.reason.startswith("half-open probe of sick")
            await settled(skewed, "brk")
            explanation = await agreed(replicas, "brk")
            assert by_target(explanation)["sick"]["breaker"] == "closed"
            assert by_target(explanation)["sick"]["generation"] == generation.pop() + 1
            for replica in normal:
                assert (await replica.chat("brk")).provider == "sick"


# ---- least busy and leases -------------------------------------------------------------------


async def test_least_busy_counts_in_flight_fleet_wide_and_a_killed_replica_leaks_nothing(
    fleet_redis: StateServer, tmp_path: Path
) -> None:
    lease_ttl_s, upstream_s = 6.0, 3.0
    slow = MockSettings(latency_ms=upstream_s * 1000)
    async with mock_upstreams(a=slow, b=slow, c=slow) as mocks:
        document = fleet_config(
            mocks,
            [route("lb", "least_busy", [target("a"), target("b"), target("c")])],
            fleet_redis,
            state={"lease_ttl_s": lease_ttl_s},
        )
        async with fleet(document, tmp_path) as replicas:
            # Two slow requests through each replica at once.
            admitted = time.monotonic()
            burst = asyncio.gather(
                *(r.chat("lb") for r in replicas for _ in range(2)), return_exceptions=True
            )

            async def all_in_flight() -> bool:
                explanation = await replicas[0].explain("lb")
                return sum(int(t["in_flight"]) for t in explanation["targets"]) == 6

            await wait_until(all_in_flight, upstream_s)
            # Fleet-wide counts: 2 each (per-replica counts would have put 3 on a and b).
            explanation = await agreed(replicas, "lb")
            assert [t["in_flight"] for t in explanation["targets"]] == [2, 2, 2]
            assert [(await m.stats())["in_flight"] for m in mocks.values()] == [2, 2, 2]

            # A replica dies with its two requests in flight: their leases are left behind.
            replicas[0].process.kill()
            results = await burst
            failed = [r for r in results if isinstance(r, BaseException)]
            served = [r for r in results if isinstance(r, Served)]
            assert len(failed) == 2 and len(served) == 4, results
            assert all(isinstance(r, openai.APIConnectionError) for r in failed), failed
            assert all(s.replica != 0 for s in served)
            survivors = replicas[1:]

            def in_flight(explanation: Mapping[str, Any]) -> int:
                return sum(int(t["in_flight"]) for t in explanation["targets"])

            async def only_leaks_left() -> bool:
                return in_flight(await survivors[0].explain("lb")) <= 2

            await wait_until(only_leaks_left, 10.0)
            explanation = await agreed(survivors, "lb")
            if time.monotonic() < admitted + lease_ttl_s - 1.0:
                assert in_flight(explanation) == 2  # the dead replica's, until they expire

            async def nothing_in_flight() -> bool:
                return in_flight(await survivors[0].explain("lb")) == 0

            await wait_until(nothing_in_flight, lease_ttl_s + 10.0)
            # Nothing outlives the lease TTL (counted from before the leases were taken).
            assert time.monotonic() < admitted + lease_ttl_s + 10.0
            explanation = await agreed(survivors, "lb")
            assert [t["in_flight"] for t in explanation["targets"]] == [0, 0, 0]

            # The next decisions see an idle fleet again: three at once spread evenly ...
            await mocks["a"].configure(latency_ms=500)
            await mocks["b"].configure(latency_ms=500)
            await mocks["c"].configure(latency_ms=500)
            again = await gather_served([survivors[i % 2].chat("lb") for i in range(3)])
            assert spread(again) == {"a": 1, "b": 1, "c": 1}
            # ... and when they are done, nothing is in flight (no count went negative).
            await settled(survivors[0], "lb")
            explanation = await agreed(survivors, "lb")
            assert [t["in_flight"] for t in explanation["targets"]] == [0, 0, 0]
