"""Redis Cluster: every route's keys share one hash tag, so each call goes to one node.

A slot map from CLUSTER SLOTS picks the node; each node gets its own coalescing pipeline.
MOVED updates the map (and refreshes it in the background), ASK retries once on the
importing node with ASKING, TRYAGAIN/CLUSTERDOWN and a lost node back off briefly and
refresh; the whole call stays within the state timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import hiredis

from edgeroute.errors import StateUnavailable
from edgeroute.state.pipeline import Pipeline
from edgeroute.state.resp import Endpoint, RespConnection, command, encode_args
from edgeroute.state.scripts import Script
from edgeroute.state.topology import StateTarget

SLOTS = 16384
_CLUSTER_SLOTS = command(2, encode_args(["CLUSTER", "SLOTS"]))
_MAX_REDIRECTS = 8

Address = tuple[str, int]


class ClusterRouter:
    def __init__(self, target: StateTarget, timeout_s: float, scripts: dict[str, Script]) -> None:
        self._target = target
        self._timeout = timeout_s
        self._scripts = scripts
        self._slots: list[Address] | None = None
        self._known: list[Address] = list(target.nodes)
        self._pipelines: dict[Address, Pipeline] = {}
        self._refresh_task: asyncio.Task[None] | None = None

    @property
    def batches(self) -> int:
        return sum(pipeline.batches for pipeline in self._pipelines.values())

    def _pipeline(self, address: Address) -> Pipeline:
        pipeline = self._pipelines.get(address)
        if pipeline is None:
            endpoint = self._target.endpoint(*address)

            async def resolve() -> Endpoint:
                return endpoint

            pipeline = self._pipelines[address] = Pipeline(resolve, self._timeout, self._scripts)
        return pipeline

    async def _load_slots(self) -> None:
        errors = []
        for address in list(dict.fromkeys(self._known)):
            try:
                connection = await RespConnection.open(self._target.endpoint(*address))
            except OSError as exc:
                errors.append(f"{address[0]}:{address[1]}: {exc}")
                continue
            try:
                (reply,) = await connection.execute([_CLUSTER_SLOTS])
            except (OSError, ConnectionError) as exc:
                errors.append(f"{address[0]}:{address[1]}: {exc}")
                continue
            finally:
                connection.close()
            if isinstance(reply, hiredis.ReplyError) or not reply:
                errors.append(f"{address[0]}:{address[1]}: {reply!r}")
                continue
            slots: list[Address] = [address] * SLOTS
            for start, end, primary, *_replicas in reply:
                owner = (primary[0].decode() or address[0], int(primary[1]))
                slots[start : end + 1] = [owner] * (end - start + 1)
                if owner not in self._known:
                    self._known.append(owner)
            self._slots = slots
            return
        raise ConnectionError("no cluster node answered CLUSTER SLOTS: " + "; ".join(errors))

    async def _refresh(self) -> None:
        """Single-flight: concurrent callers share one CLUSTER SLOTS round."""
        if self._refresh_task is None:
            self._refresh_task = asyncio.get_running_loop().create_task(self._load_slots())
            self._refresh_task.add_done_callback(self._refresh_done)
        await asyncio.shield(self._refresh_task)

    def _refresh_done(self, task: asyncio.Task[None]) -> None:
        self._refresh_task = None
        if not task.cancelled():
            task.exception()  # retrieved: the awaiting callers saw it

    async def call(self, slot: int, cmd: bytes) -> Any:
        try:
            async with asyncio.timeout(self._timeout):
                return await self._call(slot, cmd)
        except (TimeoutError, OSError, ConnectionError) as exc:
            raise StateUnavailable(
                f"redis cluster did not answer: {type(exc).__name__}: {exc}".strip()
            ) from None

    async def _call(self, slot: int, cmd: bytes) -> Any:
        address: Address | None = None
        asking = False
        for _ in range(_MAX_REDIRECTS):
            if self._slots is None:
                await self._refresh()
            assert self._slots is not None
            node = address or self._slots[slot]
            try:
                reply = await self._pipeline(node).submit(cmd, asking=asking)
            except StateUnavailable:
                # That node is gone or unreachable: the map is stale, ask the others.
                self._slots = None
                self._known = [known for known in self._known if known != node] + [node]
                address, asking = None, False
                await asyncio.sleep(0.005)
                continue
            if not isinstance(reply, hiredis.ReplyError):
                return reply
            message = str(reply)
            kind = message.split(" ", 1)[0]
            if kind in ("MOVED", "ASK"):
                _, _, where = message.split(" ")
                host, _, port = where.rpartition(":")
                address = (host or node[0], int(port))
                asking = kind == "ASK"
                if kind == "MOVED":
                    self._slots[slot] = address
                    self._background_refresh()
                continue
            if kind in ("TRYAGAIN", "CLUSTERDOWN"):
                address, asking = None, False
                await asyncio.sleep(0.01)
                continue
            raise StateUnavailable(f"redis refused the call: {message}")
        raise StateUnavailable("redis cluster redirections did not settle")

    def _background_refresh(self) -> None:
        if self._refresh_task is None:
            self._refresh_task = asyncio.get_running_loop().create_task(self._load_slots())
            self._refresh_task.add_done_callback(self._refresh_done)

    async def close(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refresh_task
        for pipeline in self._pipelines.values():
            await pipeline.close()
