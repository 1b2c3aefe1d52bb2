"""Redis Cluster: every route's keys share one hash tag, so each call goes to one node.

The slot map comes from CLUSTER SLOTS, asked through a redis-py connection (the seed nodes,
then every node found, a node that just failed last); each node gets its own coalescing
pipeline. MOVED updates the map (and refreshes it in the background), ASK retries once on
the importing node with ASKING, TRYAGAIN/CLUSTERDOWN and a lost node back off briefly and
refresh; the whole call stays within the state timeout.

The map itself is edgeroute's: one list of 16,384 owners filled range by range. redis-py's
`NodesManager` builds its map slot by slot into dicts and checks coverage slot by slot —
10 to 25 ms of event-loop time per refresh on the 2-core bench machine, during which no route
is served — where this takes well under a millisecond (bench/decide.py, Transport rows).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

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

SLOTS = 16384
_MAX_REDIRECTS = 8
# CLUSTER SLOTS asked of one node must not wedge the (single-flight) refresh on a hung node.
_MAP_TIMEOUT_S = 1.0
# The least time between two map refreshes that a failing node or a MOVED asks for.
_REFRESH_INTERVAL_S = 0.25

SlotMap = list[Address | None]


def slot_map(reply: Sequence[Any], asked: Address) -> SlotMap:
    """Each slot's primary from a CLUSTER SLOTS reply (None: unserved). A node that does not
    know its own address answers an empty host: the host we asked."""
    slots: SlotMap = [None] * SLOTS
    for start, end, primary, *_replicas in reply:
        host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
        owner = (host or asked[0], int(primary[1]))
        slots[start : end + 1] = [owner] * (end - start + 1)
    return slots


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
        self._known: list[Address] = list(target.nodes)
        self._slots: SlotMap | None = None
        self._pipelines: dict[Address, Pipeline] = {}
        self._refresh_task: asyncio.Task[None] | None = None
        self._last_refresh: asyncio.Task[None] | None = None
        self._refreshed_at = float("-inf")

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

    def _refresh(
        self, failed: str | None = None, *, force: bool = False
    ) -> asyncio.Task[None] | None:
        """Single-flight: concurrent callers share one CLUSTER SLOTS round. Without `force`,
        at most one round per _REFRESH_INTERVAL_S: a node that stays down fails calls many
        times a second."""
        task = self._refresh_task
        if task is None:
            loop = asyncio.get_running_loop()
            if force or loop.time() - self._refreshed_at >= _REFRESH_INTERVAL_S:
                task = self._refresh_task = loop.create_task(self._load_map(failed))
                task.add_done_callback(self._refresh_done)
            else:
                task = self._last_refresh
        return task

    async def _load_map(self, failed: str | None) -> None:
        known = [a for a in dict.fromkeys(self._known) if f"{a[0]}:{a[1]}" != failed]
        known += [a for a in self._known if f"{a[0]}:{a[1]}" == failed][:1]
        errors = []
        for address in known:
            connection = self._factory(address)
            try:
                async with asyncio.timeout(_MAP_TIMEOUT_S):
                    await connection.connect()  # type: ignore[no-untyped-call]
                    await connection.send_command("CLUSTER", "SLOTS", check_health=False)
                    reply = await connection.read_response()
            except (TimeoutError, RedisError, OSError) as exc:
                errors.append(f"{address[0]}:{address[1]}: {type(exc).__name__}: {exc}")
                continue
            finally:
                with contextlib.suppress(Exception):
                    await connection.disconnect(nowait=True)
            if not reply:
                errors.append(f"{address[0]}:{address[1]}: no slots")
                continue
            slots = slot_map(reply, address)
            self._slots = slots
            self._known = known + [a for a in dict.fromkeys(slots) if a and a not in known]
            return
        raise ConnectionError("no cluster node answered CLUSTER SLOTS: " + "; ".join(errors))

    def _refresh_done(self, task: asyncio.Task[None]) -> None:
        self._refresh_task = None
        self._last_refresh = task
        self._refreshed_at = asyncio.get_running_loop().time()
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
            if self._slots is None or self._slots[slot] is None:
                refresh = self._refresh(force=self._slots is None)
                if refresh is not None and not refresh.done():
                    await asyncio.shield(refresh)  # its error is this call's error
            owner = self._slots[slot] if self._slots is not None else None
            if owner is None:
                raise StateUnavailable(f"redis cluster: no node serves slot {slot}")
            node = address or owner
            try:
                reply = await self._pipeline(node).submit(cmd, asking=asking)
            except StateUnavailable:
                # That node is gone or unreachable: learn the map again, asking it last. Only
                # this call waits; routes on the other nodes keep using the map they have.
                refresh = self._refresh(failed=f"{node[0]}:{node[1]}")
                if refresh is not None and not refresh.done():
                    await asyncio.shield(refresh)
                await asyncio.sleep(0.005)
                address, asking = None, False
                continue
            if not isinstance(reply, ResponseError):
                return reply
            if isinstance(reply, AskError) and not reply.host:
                # A node without an announced endpoint answers "MOVED 3999 :7001": same host.
                reply.host = node[0]
                reply.node_addr = (node[0], reply.port)
            if isinstance(reply, MovedError):
                assert self._slots is not None
                self._slots[slot] = reply.node_addr
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


def _text(error: ResponseError) -> str:
    """The reply as Redis wrote it: redis-py keeps the code (READONLY, ...) apart."""
    code = getattr(error, "status_code", None)
    return f"{code} {error}" if code else str(error)
