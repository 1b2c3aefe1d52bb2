"""Redis Cluster: every route's keys share one hash tag, so each call goes to one node.

The slot map is redis-py's (`NodesManager`: CLUSTER SLOTS from the seed nodes, then every
node found, `move_slot` on MOVED); each node gets its own coalescing pipeline. MOVED
updates the map (and refreshes it in the background), ASK retries once on the importing
node with ASKING, TRYAGAIN/CLUSTERDOWN and a lost node back off briefly and refresh; the
whole call stays within the state timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from redis.asyncio.cluster import ClusterNode, NodesManager
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    RedisError,
    ResponseError,
    TryAgainError,
)

from edgeroute.errors import StateUnavailable
from edgeroute.state.pipeline import ConnectionFactory, FixedAddress, Pipeline
from edgeroute.state.scripts import Script
from edgeroute.state.topology import Address, StateTarget

_MAX_REDIRECTS = 8
# CLUSTER SLOTS asked of one node must not wedge the (single-flight) refresh on a hung node.
_MAP_TIMEOUT_S = 1.0


class ClusterRouter:
    def __init__(
        self,
        target: StateTarget,
        factory: ConnectionFactory,
        timeout_s: float,
        scripts: dict[str, Script],
    ) -> None:
        self._factory = factory
        self._timeout = timeout_s
        self._scripts = scripts
        kwargs = {
            **target.connection_kwargs(),
            "socket_timeout": _MAP_TIMEOUT_S,
            "socket_connect_timeout": _MAP_TIMEOUT_S,
        }
        seeds = [ClusterNode(host, port, **kwargs) for host, port in target.nodes]
        self._map = NodesManager(seeds, require_full_coverage=False, connection_kwargs=kwargs)
        self._mapped = False
        self._pipelines: dict[Address, Pipeline] = {}
        self._refresh_task: asyncio.Task[None] | None = None

    @property
    def batches(self) -> int:
        return sum(pipeline.batches for pipeline in self._pipelines.values())

    def _pipeline(self, address: Address) -> Pipeline:
        pipeline = self._pipelines.get(address)
        if pipeline is None:
            pipeline = self._pipelines[address] = Pipeline(
                FixedAddress(address), self._factory, self._timeout, self._scripts
            )
        return pipeline

    def _refresh(self, failed: str | None = None) -> asyncio.Task[None]:
        """Single-flight: concurrent callers share one CLUSTER SLOTS round."""
        if self._refresh_task is None:
            self._refresh_task = asyncio.get_running_loop().create_task(self._load_map(failed))
            self._refresh_task.add_done_callback(self._refresh_done)
        return self._refresh_task

    async def _load_map(self, failed: str | None) -> None:
        await self._map.initialize(last_failed_node_name=failed)
        self._mapped = True

    def _refresh_done(self, task: asyncio.Task[None]) -> None:
        self._refresh_task = None
        if not task.cancelled():
            task.exception()  # retrieved: the awaiting callers saw it

    async def call(self, slot: int, cmd: bytes) -> Any:
        try:
            async with asyncio.timeout(self._timeout):
                return await self._call(slot, cmd)
        except (TimeoutError, OSError, RedisError) as exc:
            raise StateUnavailable(
                f"redis cluster did not answer: {type(exc).__name__}: {exc}".strip()
            ) from None

    async def _call(self, slot: int, cmd: bytes) -> Any:
        address: Address | None = None
        asking = False
        for _ in range(_MAX_REDIRECTS):
            if not self._mapped or slot not in self._map.slots_cache:
                await asyncio.shield(self._refresh())
            if address is None:
                owner = self._map.get_node_from_slot(slot)
                node = (owner.host, int(owner.port))
            else:
                node = address
            try:
                reply = await self._pipeline(node).submit(cmd, asking=asking)
            except StateUnavailable:
                # That node is gone or unreachable: the map is stale, ask the others.
                self._mapped = False
                await asyncio.sleep(0.005)
                self._refresh(failed=f"{node[0]}:{node[1]}")
                address, asking = None, False
                continue
            if not isinstance(reply, ResponseError):
                return reply
            if isinstance(reply, AskError) and not reply.host:
                # A node without an announced endpoint answers "MOVED 3999 :7001": same host.
                reply.host = node[0]
                reply.node_addr = (node[0], reply.port)
            if isinstance(reply, MovedError):
                await self._map.move_slot(reply)
                self._refresh()  # a reshard moves many slots: learn them all at once
                address, asking = reply.node_addr, False
                continue
            if isinstance(reply, AskError):
                address, asking = reply.node_addr, True
                continue
            if isinstance(reply, TryAgainError | ClusterDownError):
                address, asking = None, False
                await asyncio.sleep(0.01)
                continue
            raise StateUnavailable(f"redis refused the call: {_text(reply)}")
        raise StateUnavailable("redis cluster redirections did not settle")

    async def close(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refresh_task
        for pipeline in self._pipelines.values():
            await pipeline.close()
        with contextlib.suppress(Exception):
            await self._map.aclose()
        with contextlib.suppress(Exception):
            await self._map.aclose("startup_nodes")


def _text(error: ResponseError) -> str:
    """The reply as Redis wrote it: redis-py keeps the code (READONLY, ...) apart."""
    code = getattr(error, "status_code", None)
    return f"{code} {error}" if code else str(error)
