"""The fleet view: every replica keeps a heartbeat in shared Redis; anyone can list them.

A heartbeat (replica id, version, config hash, start time, live/degraded) is a plain Redis
string with a TTL of three intervals, plus the replica's id in a set for discovery; all keys
share the `{prefix:#fleet}` hash tag, so Redis Cluster keeps them in one slot (`#` is not
allowed in route names: no route's keys can ever share it). They go through
a plain redis-py asyncio client, not the Lua state path: heartbeats are not routing state,
and a heartbeat never waits behind (or slows) a decide. The same read also counts the live
replicas that limits divide by while Redis is away (on_state_loss: local_share,
edgeroute/replicas.py): one writer, one key family, one TTL for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any
from urllib.parse import parse_qs

import msgspec
from aiohttp import web
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.sentinel import Sentinel

from edgeroute.metrics import OpsMetrics
from edgeroute.state.topology import parse_state_url

log = logging.getLogger("edgeroute.fleet")

INTERVAL_ENV = "EDGEROUTE_HEARTBEAT_S"
DEFAULT_INTERVAL_S = 5.0


class Heartbeat(msgspec.Struct, kw_only=True):
    replica: str
    version: str
    config_hash: str
    started_at: float
    shared_state: str
    seen_at: float = 0.0


_decode = msgspec.json.Decoder(Heartbeat).decode
_encode = msgspec.json.encode


def replica_id(env: Mapping[str, str]) -> str:
    """EDGEROUTE_REPLICA_ID (the chart sets the pod name), else host, pid and a random tag
    so that two gateways in one process or container never share an id."""
    given = env.get("EDGEROUTE_REPLICA_ID", "").strip()
    if given:
        return given
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


def heartbeat_interval(env: Mapping[str, str]) -> float:
    try:
        return max(0.05, float(env.get(INTERVAL_ENV, "") or DEFAULT_INTERVAL_S))
    except ValueError:
        return DEFAULT_INTERVAL_S


def redis_client(url: str, *, cluster: bool = False) -> Any:
    """A redis-py asyncio client for a state URL (standalone, cluster or sentinel)."""
    target = parse_state_url(url, cluster=cluster)
    query = {k: v[-1] for k, v in parse_qs(url.partition("?")[2]).items()}
    options: dict[str, Any] = {
        "username": target.username,
        "password": target.password,
        "socket_timeout": 2.0,
        "socket_connect_timeout": 2.0,
    }
    if target.ssl_context is not None:
        options["ssl"] = True
        options["ssl_ca_certs"] = query.get("ssl_ca_certs")
        options["ssl_certfile"] = query.get("ssl_certfile")
        options["ssl_keyfile"] = query.get("ssl_keyfile")
        options["ssl_cert_reqs"] = query.get("ssl_cert_reqs", "required")
    if target.kind == "cluster":
        host, port = target.nodes[0]
        return RedisCluster(host=host, port=port, **options)
    if target.kind == "sentinel":
        sentinel_options = (
            {"password": target.sentinel_password} if target.sentinel_password else {}
        )
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(target.nodes), sentinel_kwargs=sentinel_options, **options
        )
        return sentinel.master_for(target.master_name or "", db=target.db)
    host, port = target.nodes[0]
    return Redis(host=host, port=port, db=target.db, **options)


class Heartbeats:
    def __init__(self, client: Any, key_prefix: str, interval_s: float = DEFAULT_INTERVAL_S):
        self.client = client
        tag = f"{{{key_prefix}:#fleet}}"
        self.ids_key = f"{tag}:replicas"
        self.replica_key = f"{tag}:replica:"
        self.interval_s = interval_s
        self.ttl_ms = max(1, int(interval_s * 3 * 1000))

    async def beat(self, heartbeat: Heartbeat) -> None:
        heartbeat.seen_at = time.time()
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.set(self.replica_key + heartbeat.replica, _encode(heartbeat), px=self.ttl_ms)
            pipe.sadd(self.ids_key, heartbeat.replica)
            # The discovery set outlives every heartbeat a little; a gone fleet leaves nothing.
            pipe.pexpire(self.ids_key, self.ttl_ms * 20)
            await pipe.execute()

    async def leave(self, replica: str) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.delete(self.replica_key + replica)
            pipe.srem(self.ids_key, replica)
            await pipe.execute()

    async def read(self) -> list[Heartbeat]:
        ids = sorted(
            i.decode() if isinstance(i, bytes) else str(i)
            for i in await self.client.smembers(self.ids_key)
        )
        if not ids:
            return []
        values = await self.client.mget([self.replica_key + i for i in ids])
        live: list[Heartbeat] = []
        gone: list[str] = []
        for replica, value in zip(ids, values, strict=True):
            if value is None:
                gone.append(replica)  # its TTL ran out: the replica stopped beating
                continue
            try:
                live.append(_decode(value))
            except msgspec.DecodeError:
                gone.append(replica)
        if gone:
            await self.client.srem(self.ids_key, *gone)
        return live


def fleet_view(
    replicas: list[Heartbeat], *, me: str | None, expected: str | None = None
) -> dict[str, Any]:
    """Replicas and whether they agree. A replica is flagged when its config hash differs from
    `expected` (the CLI: the file given) or, without one, from the one hash most replicas
    run; with no single majority every replica is flagged."""
    counts = Counter(r.config_hash for r in replicas)
    reference = expected
    if reference is None and counts:
        top = max(counts.values())
        leaders = [h for h, n in counts.items() if n == top]
        reference = leaders[0] if len(leaders) == 1 else None
    listed = []
    for r in sorted(replicas, key=lambda r: r.replica):
        entry = msgspec.to_builtins(r)
        entry["config_mismatch"] = r.config_hash != reference
        if me is not None:
            entry["self"] = r.replica == me
        listed.append(entry)
    return {
        "replicas": listed,
        "config_hashes": dict(sorted(counts.items())),
        "reference_hash": reference,
        "consistent": not any(entry["config_mismatch"] for entry in listed),
    }


def heartbeat_context(
    heartbeats: Heartbeats,
    current: Callable[[], Heartbeat],
    metrics: OpsMetrics,
    wake: asyncio.Event,
    counted: Callable[[int], None],
) -> Callable[[web.Application], AsyncIterator[None]]:
    """One cleanup context: beat every interval (and at once when `wake` is set, e.g. after
    a reload), read the fleet for the gauges and `counted` (the live replica count limits
    share by: edgeroute/replicas.py), leave on shutdown. While Redis fails, nothing is
    counted: the last count stands."""

    # Shutdown sets this as well as cancelling: a Redis client that swallows the cancellation
    # inside a call (redis-py's asyncio connections have) must not keep the loop beating.
    stopping = False

    async def loop() -> None:
        failing = False
        while not stopping:
            try:
                await heartbeats.beat(current())
                replicas = await heartbeats.read()
                counted(len(replicas))
                metrics.fleet_replicas.set(len(replicas))
                metrics.fleet_config_hashes.set(len({r.config_hash for r in replicas}))
                if failing:
                    log.warning("fleet heartbeat written again")
                failing = False
            except Exception as exc:  # Redis trouble: routing has its own degraded mode
                if not failing:
                    log.warning("fleet heartbeat failed: %s", type(exc).__name__)
                failing = True
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), heartbeats.interval_s)

    async def context(app: web.Application) -> AsyncIterator[None]:
        nonlocal stopping
        task = asyncio.get_running_loop().create_task(loop())
        yield
        stopping = True
        wake.set()
        task.cancel()
        # asyncio.wait, not `await task`: a cancellation of this cleanup itself must not be
        # taken for the loop's own and swallowed.
        await asyncio.wait({task})
        with contextlib.suppress(Exception):
            await asyncio.wait_for(heartbeats.leave(current().replica), 1.0)
        with contextlib.suppress(Exception):
            await heartbeats.client.aclose()

    return context


__all__ = [
    "Heartbeat",
    "Heartbeats",
    "fleet_view",
    "heartbeat_context",
    "heartbeat_interval",
    "redis_client",
    "replica_id",
]
