"""How many replicas share the limits, and what a limit does while Redis is away.

Every replica says it is alive in Redis (lua/heartbeat.lua) every few seconds and learns how
many are; the last count seen is kept while Redis is unreachable. A limit's `on_state_loss`
then says how the replica counts on its own:

- `local_share` (default): its share, the limit divided by the live replicas (at least 1),
  so the fleet as a whole stays near the limit without talking;
- `fail_open`: no limit while shared state is away (availability first);
- `fail_closed`: nothing admitted under that limit until shared state is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Literal

from edgeroute.errors import StateUnavailable
from edgeroute.state.redis import RedisState

log = logging.getLogger("edgeroute.replicas")

StateLossPolicy = Literal["fail_open", "fail_closed", "local_share"]
POLICIES: tuple[StateLossPolicy, ...] = ("fail_open", "fail_closed", "local_share")
HEARTBEAT_S = 5.0
# A replica unheard of for three beats no longer counts.
HEARTBEAT_TTL_MS = int(3 * HEARTBEAT_S * 1000)


class Replicas:
    """The live replica count, from heartbeats in Redis (1 without Redis)."""

    def __init__(self, redis: RedisState | None, *, interval_s: float = HEARTBEAT_S) -> None:
        self.redis = redis
        self.id = os.urandom(6).hex()
        self.live = 1
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def share(self, limit: int) -> int:
        """This replica's part of a fleet-wide `limit` (never 0: 0 means no limit)."""
        return max(1, limit // max(1, self.live))

    async def beat(self) -> None:
        if self.redis is None:
            return
        try:
            self.live = max(1, await self.redis.heartbeat(self.id, HEARTBEAT_TTL_MS))
        except StateUnavailable as exc:
            log.debug("heartbeat failed, keeping %d live replicas: %s", self.live, exc)

    async def _run(self) -> None:
        while True:
            await self.beat()
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        if self.redis is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
