"""Degraded mode: route on local state while shared state is unreachable, then come back.

A replica that cannot reach Redis within its timeout keeps serving on a local MemoryState,
says so (`degraded`), and probes Redis in the background with capped exponential backoff.
While degraded no request waits on Redis at all.

Every outcome goes back to the state that admitted it: its lease (and probe reservation)
lives there. An outcome of a Redis admission that arrives while Redis is away teaches the
local state instead, and a release of its lease is kept (bounded) and replayed to Redis
before shared state is used again, so a blip does not leave leases and probe slots taken
in Redis until they expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence

from edgeroute.errors import StateUnavailable
from edgeroute.state.base import RouteSpec, StateHealth, StateView
from edgeroute.state.memory import MemoryState
from edgeroute.state.redis import RedisState
from edgeroute.strategy import RoutingDecision
from edgeroute.types import Outcome, OutcomeKind, RouteSnapshot

log = logging.getLogger("edgeroute.state")

# Tokens of local admissions not reported yet; only a runaway would ever reach this.
_MAX_LOCAL_TOKENS = 100_000
_RELEASE_BATCH = 512


class FallbackState:
    """Redis state that degrades to local state; see the module comment."""

    name = "redis+local"

    def __init__(
        self,
        primary: RedisState,
        *,
        local: MemoryState | None = None,
        probe_min_s: float = 0.05,
        probe_max_s: float = 2.0,
        max_releases: int = 10_000,
        on_change: Callable[[bool], None] | None = None,
        on_error: Callable[[str], None] | None = None,
        on_latency: Callable[[str, float], None] | None = None,
    ) -> None:
        self.primary = primary
        self.local = local or MemoryState()
        self.degraded = False
        self._probe_min = probe_min_s
        self._probe_max = probe_max_s
        self._on_change = on_change
        self._on_error = on_error
        # Successful shared-state calls, timed: Redis creeping toward the timeout shows
        # here before replicas start to degrade.
        self._on_latency = on_latency
        self._probe: asyncio.Task[None] | None = None
        # Admissions granted by the local state (insertion-ordered, bounded).
        self._local_tokens: dict[str, None] = {}
        # Lease releases owed to Redis for outcomes that arrived while it was away.
        self._releases: deque[tuple[RouteSpec, Outcome]] = deque(maxlen=max_releases)
        self.last_error = ""

    @property
    def pending_releases(self) -> int:
        return len(self._releases)

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
                await self._replay_releases()
            except Exception as exc:  # StateUnavailable, or anything odd: never stop probing
                if not isinstance(exc, StateUnavailable):
                    log.warning("probing shared state failed unexpectedly: %r", exc)
                delay = min(delay * 2, self._probe_max)
                continue
            # No await since the last release went out: nothing new can be owed to Redis.
            log.warning("shared state is back; leaving degraded mode")
            self.degraded = False
            self._probe = None
            if self._on_change is not None:
                self._on_change(False)
            return

    async def _replay_releases(self) -> None:
        while self._releases:
            count = min(len(self._releases), _RELEASE_BATCH)
            batch = [self._releases.popleft() for _ in range(count)]
            try:
                await self.primary.record_many(batch)
            except BaseException:
                self._releases.extendleft(reversed(batch))
                raise

    def _remember(self, decision: RoutingDecision) -> RoutingDecision:
        if decision.admission is not None:
            self._local_tokens[decision.admission.token] = None
            if len(self._local_tokens) > _MAX_LOCAL_TOKENS:
                del self._local_tokens[next(iter(self._local_tokens))]
        return decision

    def _take_local(self, outcome: Outcome) -> bool:
        """True (and forgotten) when the local state admitted this outcome's attempt."""
        token = outcome.token
        if token is None or token not in self._local_tokens:
            return False
        del self._local_tokens[token]
        return True

    def _foreign(self, route: RouteSpec, outcome: Outcome) -> Outcome:
        """A Redis admission's outcome while Redis is away: owe Redis the release of its
        lease (idempotent: a late copy of the outcome may still land there), and let the
        local state learn from it on its own current breaker generation."""
        if outcome.token is not None:
            release = Outcome(
                target_id=outcome.target_id,
                kind=OutcomeKind.NEUTRAL,
                generation=outcome.generation,
                token=outcome.token,
                probe=outcome.probe,
            )
            self._releases.append((route, release))
        return dataclasses.replace(outcome, generation=-1, token=None, probe=False)

    async def decide(
        self,
        route: RouteSpec,
        *,
        exclude: Collection[str] = (),
        outcome: Outcome | None = None,
        advance: bool = True,
        limit: int = 0,
    ) -> RoutingDecision:
        if outcome is not None and self._take_local(outcome):
            if self.degraded:
                return self._remember(
                    self.local.decide_now(
                        route, exclude=exclude, outcome=outcome, advance=advance, limit=limit
                    )
                )
            await self.local.record_many([(route, outcome)])
            outcome = None
        if not self.degraded:
            started = time.perf_counter()
            try:
                decision = await self.primary.decide(
                    route, exclude=exclude, outcome=outcome, advance=advance, limit=limit
                )
            except StateUnavailable as exc:
                self._degrade("decide", exc)
            else:
                if self._on_latency is not None:
                    self._on_latency("decide", time.perf_counter() - started)
                return decision
        if outcome is not None:
            outcome = self._foreign(route, outcome)
        return self._remember(
            self.local.decide_now(
                route, exclude=exclude, outcome=outcome, advance=advance, limit=limit
            )
        )

    async def record(self, route: RouteSpec, outcome: Outcome) -> None:
        await self.record_many([(route, outcome)])

    async def record_many(self, items: Sequence[tuple[RouteSpec, Outcome]]) -> None:
        local: list[tuple[RouteSpec, Outcome]] = []
        shared: list[tuple[RouteSpec, Outcome]] = []
        for route, outcome in items:
            (local if self._take_local(outcome) else shared).append((route, outcome))
        if shared and not self.degraded:
            started = time.perf_counter()
            try:
                await self.primary.record_many(shared)
                shared = []
            except StateUnavailable as exc:
                self._degrade("record", exc)
            else:
                if self._on_latency is not None:
                    self._on_latency("record", time.perf_counter() - started)
        local += [(route, self._foreign(route, outcome)) for route, outcome in shared]
        if local:
            await self.local.record_many(local)

    async def explain(self, route: RouteSpec) -> StateView:
        if not self.degraded:
            try:
                return await self.primary.explain(route)
            except StateUnavailable as exc:
                self._degrade("explain", exc)
        return self.local.explain_now(route)

    async def snapshot(self, route: RouteSpec) -> RouteSnapshot:
        return (await self.explain(route)).snapshot

    def health(self) -> StateHealth:
        if self.degraded:
            return StateHealth("redis", "degraded", self.last_error)
        return StateHealth("redis", "live")

    async def reset(self, route: RouteSpec, target_id: str) -> None:
        """Fleet-wide or not at all: a reset that only this replica saw would be a lie."""
        if self.degraded:
            raise StateUnavailable(
                f"shared state is unreachable ({self.last_error}); the reset would reach "
                "only this replica"
            )
        try:
            await self.primary.reset(route, target_id)
        except StateUnavailable as exc:
            self._degrade("reset", exc)
            raise
        await self.local.reset(route, target_id)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self.primary.close()
