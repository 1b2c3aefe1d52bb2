"""Degraded mode: route on local state while shared state is unreachable, then come back.

A replica that cannot reach Redis within its timeout keeps serving on a local MemoryState,
says so (`degraded`), and probes Redis in the background with capped exponential backoff.
While degraded no request waits on Redis at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Collection, Sequence

from edgeroute.errors import StateUnavailable
from edgeroute.state.base import RouteSpec
from edgeroute.state.memory import MemoryState
from edgeroute.state.redis import RedisState
from edgeroute.strategy import RoutingDecision
from edgeroute.types import Outcome, RouteSnapshot

log = logging.getLogger("edgeroute.state")


class FallbackState:
    name = "redis"

    def __init__(
        self,
        primary: RedisState,
        *,
        local: MemoryState | None = None,
        probe_min_s: float = 0.05,
        probe_max_s: float = 2.0,
        on_change: Callable[[bool], None] | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.primary = primary
        self.local = local or MemoryState()
        self.degraded = False
        self._probe_min = probe_min_s
        self._probe_max = probe_max_s
        self._on_change = on_change
        self._on_error = on_error
        self._probe: asyncio.Task[None] | None = None
        self.last_error = ""

    def _degrade(self, op: str, exc: StateUnavailable) -> None:
        self.last_error = str(exc)
        if self._on_error is not None:
            self._on_error(op)
        if self.degraded:
            return
        log.warning("shared state unavailable (%s); routing on local state", exc)
        self.degraded = True
        if self._on_change is not None:
            self._on_change(True)
        self._probe = asyncio.get_running_loop().create_task(self._probe_until_back())

    async def _probe_until_back(self) -> None:
        delay = self._probe_min
        while True:
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            try:
                await self.primary.ping()
            except StateUnavailable:
                delay = min(delay * 2, self._probe_max)
                continue
            log.warning("shared state is back; leaving degraded mode")
            self.degraded = False
            self._probe = None
            if self._on_change is not None:
                self._on_change(False)
            return

    async def decide(
        self,
        route: RouteSpec,
        *,
        exclude: Collection[str] = (),
        outcome: Outcome | None = None,
        advance: bool = True,
    ) -> RoutingDecision:
        if not self.degraded:
            try:
                return await self.primary.decide(
                    route, exclude=exclude, outcome=outcome, advance=advance
                )
            except StateUnavailable as exc:
                self._degrade("decide", exc)
        return self.local.decide_now(route, exclude=exclude, outcome=outcome, advance=advance)

    async def record(self, route: RouteSpec, outcome: Outcome) -> None:
        await self.record_many([(route, outcome)])

    async def record_many(self, items: Sequence[tuple[RouteSpec, Outcome]]) -> None:
        if not self.degraded:
            try:
                await self.primary.record_many(items)
                return
            except StateUnavailable as exc:
                self._degrade("record", exc)
        await self.local.record_many(items)

    async def snapshot(self, route: RouteSpec) -> RouteSnapshot:
        if not self.degraded:
            try:
                return await self.primary.snapshot(route)
            except StateUnavailable as exc:
                self._degrade("snapshot", exc)
        return await self.local.snapshot(route)

    async def reset(self, route: RouteSpec, target_id: str) -> None:
        await self.local.reset(route, target_id)
        if not self.degraded:
            await self.primary.reset(route, target_id)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self.primary.close()
