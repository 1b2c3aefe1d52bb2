"""What only the Redis backend has to prove: one command per call, keys, TTLs, NOSCRIPT,
bounded waits on a dead or frozen server, and scripts that ship inside the wheel."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

import pytest
import redis

from edgeroute import RoutingStrategy, StateUnavailable
from edgeroute.state import RedisState
from edgeroute.state.base import RouteSpec
from edgeroute.state.redis import route_keys
from edgeroute.state.scripts import SCRIPT_NAMES, STANDALONE_NAMES, load_scripts
from edgeroute.state.topology import parse_state_url
from edgeroute.types import BreakerParams, Outcome, OutcomeKind, WindowParams
from tests.support.redis_servers import RedisServer, free_port
from tests.test_state_conformance import make_route


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def evalsha_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_one_evalsha_per_route_batch_and_per_record(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    state = RedisState(redis_server.url, key_prefix="one", timeout_ms=5000)
    route = make_route(RoutingStrategy.default_hybrid())
    other = make_route(RoutingStrategy.round_robin())
    warmup = await state.decide(route)  # loads the script (NOSCRIPT on a fresh server)
    assert warmup.admission is not None
    await state.record(route, Outcome.for_admission(warmup.admission, OutcomeKind.NEUTRAL))
    client.config_resetstat()
    for _ in range(3):  # one after the other: a call each
        decision = await state.decide(other)
        assert decision.admission is not None
        await state.record(other, Outcome.for_admission(decision.admission, OutcomeKind.NEUTRAL))
    assert evalsha_calls(client) == 6
    client.config_resetstat()
    # Concurrent decides of one event-loop iteration: one script call per route.
    decisions, rest = await asyncio.gather(
        asyncio.gather(*(state.decide(route) for _ in range(200))),
        asyncio.gather(*(state.decide(other) for _ in range(9))),
    )
    assert evalsha_calls(client) == 2
    tokens = {d.admission.token for d in [*decisions, *rest] if d.admission is not None}
    assert len(tokens) == 209  # every request admitted, each with its own lease
    counts = {t.target_id: t.inflight for t in (await state.snapshot(other)).targets}
    assert counts == {"t0": 3, "t1": 3, "t2": 3}  # the cursor moved once per request
    for d in rest:
        assert d.admission is not None
        await state.record(other, Outcome.for_admission(d.admission, OutcomeKind.NEUTRAL))
    client.config_resetstat()
    outcomes = [
        (route, Outcome.for_admission(d.admission, OutcomeKind.SUCCESS, 5.0))
        for d in decisions
        if d.admission is not None
    ]
    await state.record_many(outcomes)
    assert evalsha_calls(client) == 1  # a batch of records of one route: one script call
    assert sum(t.inflight for t in (await state.snapshot(route)).targets) == 0
    await state.close()


async def test_keys_share_one_hash_tag_and_all_expire(redis_url: str) -> None:
    prefix = f"keys-{uuid.uuid4().hex[:8]}"
    state = RedisState(redis_url, key_prefix=prefix, timeout_ms=5000)
    route = make_route(RoutingStrategy.round_robin())
    decision = await state.decide(route)
    assert decision.admission is not None
    await state.record(route, Outcome.for_admission(decision.admission, OutcomeKind.SUCCESS, 1.0))
    await state.decide(route)
    client = redis.Redis.from_url(redis_url)
    keys = sorted(_text(k) for k in client.keys(f"{{{prefix}:{route.name}}}*"))
    assert keys == sorted(route_keys(prefix, route.name))
    for key in keys:
        assert client.pttl(key) > 0, f"{key} has no TTL"
    assert len({key.split("}")[0] for key in keys}) == 1
    await state.close()


async def test_routes_spread_over_cluster_slots(redis_url: str) -> None:
    from redis.crc import key_slot

    slots = {key_slot(route_keys("edgeroute", f"route-{i}")[0].encode()) for i in range(20)}
    assert len(slots) > 15  # different routes, different slots
    for i in range(20):
        assert len({key_slot(k.encode()) for k in route_keys("edgeroute", f"route-{i}")}) == 1


async def test_noscript_after_script_flush_is_recovered(redis_url: str) -> None:
    state = RedisState(redis_url, key_prefix=f"ns-{uuid.uuid4().hex[:8]}", timeout_ms=5000)
    route = make_route()
    assert (await state.decide(route)).admission is not None
    redis.Redis.from_url(redis_url).script_flush()
    decision = await state.decide(route)
    assert decision.admission is not None and decision.admission.target_id == "t0"
    await state.close()


async def test_restarted_empty_redis_keeps_routing(redis_server: RedisServer) -> None:
    state = RedisState(redis_server.url, key_prefix="restart", timeout_ms=500)
    route = make_route(breaker=BreakerParams(failure_threshold=1, open_timeout_ms=60_000))
    await state.record(route, Outcome(target_id="t0", kind=OutcomeKind.FAILURE))
    assert (await state.decide(route)).target_id == "t1"
    redis_server.restart()
    with pytest.raises(StateUnavailable):
        await state.decide(route)  # the old connection died with the server
    decision = await state.decide(route)  # reconnects, reloads scripts, state rebuilt empty
    assert decision.target_id == "t0"
    await state.close()


async def test_unreachable_redis_fails_fast_with_a_typed_error() -> None:
    state = RedisState(f"redis://127.0.0.1:{free_port()}/0", timeout_ms=50)
    started = time.perf_counter()
    with pytest.raises(StateUnavailable, match="redis did not answer"):
        await state.decide(make_route())
    assert time.perf_counter() - started < 1.0
    await state.close()


async def test_frozen_redis_costs_at_most_the_timeout(redis_server: RedisServer) -> None:
    state = RedisState(redis_server.url, key_prefix="frozen", timeout_ms=100)
    route = make_route()
    await state.decide(route)
    redis_server.pause()
    try:
        started = time.perf_counter()
        results = await asyncio.gather(
            *(state.decide(route) for _ in range(20)), return_exceptions=True
        )
        waited = time.perf_counter() - started
        assert all(isinstance(r, StateUnavailable) for r in results)
        assert waited < 1.0  # each call bounded by its own timeout (stacked: 20 x 0.1 s)
    finally:
        redis_server.resume()
    assert (await state.decide(route)).admission is not None  # nothing wedged afterwards
    await state.close()


async def test_password_protected_redis(tmp_path: Path) -> None:
    with RedisServer(extra_args=["--requirepass", "s3cret"]) as server:
        url = f"redis://:s3cret@127.0.0.1:{server.port}/2"
        state = RedisState(url, key_prefix="auth", timeout_ms=5000)
        assert (await state.decide(make_route())).admission is not None
        await state.close()
        bad = RedisState(f"redis://:wrong@127.0.0.1:{server.port}/0", timeout_ms=500)
        with pytest.raises((StateUnavailable, ConnectionError)) as raised:
            await bad.decide(make_route())
        assert "wrong" not in str(raised.value)
        await bad.close()


def test_state_urls() -> None:
    target = parse_state_url("redis://user:p%40ss@redis.example:6380/3")
    assert (target.kind, target.nodes, target.db) == ("standalone", (("redis.example", 6380),), 3)
    assert (target.username, target.password, target.ssl_context) == ("user", "p@ss", None)
    tls = parse_state_url("rediss://redis.example?ssl_cert_reqs=none")
    assert tls.ssl_context is not None and tls.nodes == (("redis.example", 6379),)
    cluster = parse_state_url("redis+cluster://:pw@a:7000,b:7001,[::1]:7002")
    assert cluster.kind == "cluster" and cluster.password == "pw"
    assert cluster.nodes == (("a", 7000), ("b", 7001), ("::1", 7002))
    assert parse_state_url("redis://a:7000", cluster=True).kind == "cluster"
    sentinel = parse_state_url("redis+sentinel://s1,s2:26380/mymaster/2?sentinel_password=x")
    assert (sentinel.kind, sentinel.master_name, sentinel.db) == ("sentinel", "mymaster", 2)
    assert sentinel.nodes == (("s1", 26379), ("s2", 26380))
    assert sentinel.sentinel_password == "x"
    for bad in ("http://redis.example", "redis+sentinel://s1:26379", "redis://"):
        with pytest.raises(ValueError):
            parse_state_url(bad)


def test_lua_scripts_ship_inside_the_wheel(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(Path(__file__).resolve().parents[1]),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("edgeroute-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for script in ("lib", *SCRIPT_NAMES, *STANDALONE_NAMES):
        assert f"edgeroute/lua/{script}.lua" in names
    assert set(load_scripts()) == {*SCRIPT_NAMES, *STANDALONE_NAMES}


async def test_window_values_stay_bounded_by_the_bucket_count(redis_url: str) -> None:
    """Many samples in few buckets must not grow a window field: one slot per bucket."""
    prefix = f"win-{uuid.uuid4().hex[:8]}"
    state = RedisState(redis_url, key_prefix=prefix, timeout_ms=5000)
    route = make_route(
        RoutingStrategy.latency_based(), window=WindowParams(bucket_ms=50, buckets=4)
    )
    for _ in range(8):  # 8 x ~60 ms: every bucket sees samples, older ones age out
        outcomes = [
            (route, Outcome(target_id="t0", kind=OutcomeKind.SUCCESS, latency_ms=1.0))
            for _ in range(100)
        ]
        await state.record_many(outcomes)
        await state.decide(route)
        await asyncio.sleep(0.06)
    await state.record(route, Outcome(target_id="t0", kind=OutcomeKind.FAILURE))
    client = redis.Redis.from_url(redis_url)
    value = client.hget(route_keys(prefix, route.name)[1], "t0")
    assert value is not None
    header, older, newest = _text(value).split("|")
    first, last, successes, _, failures, _, _ = (int(x) for x in header.split(":"))
    older_buckets = [int(slot.split(":")[0]) for slot in older.split(";") if slot]
    assert len(older_buckets) + 1 <= 4, value  # at most `buckets` buckets, each once
    assert older_buckets == sorted(set(older_buckets)) and all(b < last for b in older_buckets)
    assert first == (older_buckets[0] if older_buckets else last)
    assert int(newest.split(":")[2]) == 1  # the failure landed in the newest bucket
    assert failures == 1 and 0 < successes <= 800
    # The snapshot counts the buckets live at its own moment (Redis TIME, in now_ms).
    snapshot = await state.snapshot(route)
    slots = [tuple(int(x) for x in slot.split(":")) for slot in older.split(";") if slot]
    slots.append((last, *(int(x) for x in newest.split(":"))))
    oldest_live = snapshot.now_ms // 50 - 4
    live = [slot for slot in slots if slot[0] > oldest_live]
    t0 = snapshot.targets[0]
    assert t0.successes == sum(slot[1] for slot in live)
    assert t0.failures == sum(slot[3] for slot in live)
    await state.close()


def test_keys_outlive_every_lease_probe_and_open_breaker_they_hold() -> None:
    short_idle = make_route(lease_ttl_ms=600_000)
    short_idle = RouteSpec(
        name=short_idle.name,
        strategy=short_idle.strategy,
        targets=short_idle.targets,
        breaker=BreakerParams(max_open_timeout_ms=200, probe_ttl_ms=90_000),
        window=WindowParams(bucket_ms=50, buckets=4),
        lease_ttl_ms=2_000,
        idle_ttl_ms=300,
    )
    assert short_idle.key_ttl_ms >= 2_000 + 60_000  # a lease expires before its record
    assert short_idle.key_ttl_ms >= 2 * 90_000  # and so does a probe reservation
