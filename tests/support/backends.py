"""The one table of state backends every state-level test runs over.

    memory     MemoryState (the reference model)
    fakeredis  RedisState on fakeredis over TCP (same Lua via lupa: fast, never instead of Redis)
    redis      RedisState on a real Redis
    cluster    RedisState on a real 3-primary Redis Cluster
    sentinel   RedisState through real Sentinels to a primary with a replica
    fallback   FallbackState (degraded-mode wrapper) over RedisState on a real Redis

Each row carries a pytest mark of its name (`-m "not cluster and not sentinel"` for a quick
loop). A `VirtualClock` given to `open_backend` drives MemoryState and, through the scripts'
`clock_ms` argument, every Redis-backed row: tests step time instead of sleeping.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from edgeroute.state import FallbackState, MemoryState, RedisState, StateBackend

SENTINEL_MASTER = "edgeroute-primary"
KINDS = ("memory", "fakeredis", "redis", "cluster", "sentinel", "fallback")
# The gateway-level tables: in-process state, and the same on a real Redis.
GATEWAY_KINDS = ("memory", "redis")


def table(kinds: tuple[str, ...] = KINDS) -> list[object]:
    return [pytest.param(kind, marks=getattr(pytest.mark, kind), id=kind) for kind in kinds]


def gateway_state(request: pytest.FixtureRequest, prefix: str) -> dict[str, object]:
    """The config sections a `table(GATEWAY_KINDS)` fixture param selects: none (in-process
    state), or a real Redis under a fresh key prefix with a roomy timeout (gateway tests are
    never about degraded mode)."""
    if request.param == "memory":
        return {}
    redis_url: str = request.getfixturevalue("redis_url")
    key_prefix = f"{prefix}-{uuid.uuid4().hex[:10]}"
    return {"state": {"redis_url": redis_url, "key_prefix": key_prefix, "timeout_ms": 2000}}


class VirtualClock:
    """Seconds; only the test moves it."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, ms: float) -> None:
        self.now += ms / 1000


@dataclass
class Backend:
    kind: str
    state: StateBackend
    url: str | None  # the Redis URL a plain client can use (None: memory)
    key_prefix: str


def redis_url_for(kind: str, request: pytest.FixtureRequest) -> str:
    """The state URL of a Redis-backed row (starting its servers through fixtures)."""
    if kind == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        return "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in cluster.startup_nodes)
    if kind == "sentinel":
        setup = request.getfixturevalue("redis_sentinel")
        sentinels = ",".join(f"{h}:{p}" for h, p in setup.sentinels)
        return f"redis+sentinel://{sentinels}/{SENTINEL_MASTER}/0"
    if kind == "fakeredis":
        return str(request.getfixturevalue("fakeredis_url"))
    return str(request.getfixturevalue("redis_url"))


def open_backend(
    kind: str,
    request: pytest.FixtureRequest,
    *,
    clock: Callable[[], float] | None = None,
    timeout_ms: float = 2000,
) -> Backend:
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    if kind == "memory":
        return Backend(kind, MemoryState(clock), None, prefix)
    url = redis_url_for(kind, request)
    redis = RedisState(url, key_prefix=prefix, timeout_ms=timeout_ms, clock=clock)
    if kind == "fallback":
        return Backend(kind, FallbackState(redis, local=MemoryState(clock)), url, prefix)
    return Backend(kind, redis, url, prefix)
