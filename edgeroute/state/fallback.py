"""Degraded mode: route on local state while shared state is unreachable, then come back.

A replica that cannot reach Redis within its timeout keeps serving on a local MemoryState,
says so (`degraded`), and probes Redis in the background with capped exponential backoff.
While degraded no request waits on Redis at all.

Health is kept per shard (a Redis Cluster slot; everything is one shard on a single server
or a Sentinel-managed primary): while one slot is unserved only the routes in it go local.
A shard comes back only after real script calls that write succeed on the node serving it
(`recover_after` in a row; PING proves nothing to a server out of memory), and a shard that
flaps stays degraded longer each time, so one event is one degraded spell, logged once.

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


@dataclasses.dataclass(slots=True)
class _Spell:
    """One shard's time on local state."""

    route: str  # the route whose call found the shard unreachable (for the log line)
    since: float
    min_dwell_s: float
    task: asyncio.Task[None] | None = None


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
        recover_after: int = 2,
        flap_window_s: float = 30.0,
        flap_dwell_s: float = 0.5,
        max_dwell_s: float = 30.0,
        max_releases: int = 10_000,
        on_change: Callable[[bool], None] | None = None,
        on_error: Callable[[str], None] | None = None,
        on_latency: Callable[[str, float], None] | None = None,
    ) -> None:
        self.primary = primary
        self.local = local or MemoryState()
        self._probe_min = probe_min_s
        self._probe_max = probe_max_s
        self._recover_after = recover_after
        self._flap_window = flap_window_s
        self._flap_dwell = flap_dwell_s
        self._max_dwell = max_dwell_s
        self._on_change = on_change
        self._on_error = on_error
        # Successful shared-state calls, timed: Redis creeping toward the timeout shows
        # here before replicas start to degrade.
        self._on_latency = on_latency
        self._spells: dict[int, _Spell] = {}
        # When each shard last came back, and how often it fell again soon after.
        self._recovered_at: dict[int, float] = {}
        self._flaps: dict[int, int] = {}
        # Admissions granted by the local state (insertion-ordered, bounded).
        self._local_tokens: dict[str, None] = {}
        # Lease releases owed to Redis for outcomes that arrived while it was away.
        self._releases: deque[tuple[int, RouteSpec, Outcome]] = deque(maxlen=max_releases)
        self.last_error = ""
        # How many replicas share a quota (edgeroute/replicas.py): set by the gateway.
        self.live_replicas: Callable[[], int] = lambda: 1
        self._degraded_routes: dict[str, tuple[RouteSpec, int, RouteSpec, tuple[str, ...]]] = {}

    def _local_decide(
        self,
        route: RouteSpec,
        *,
        exclude: Collection[str] = (),
        outcome: Outcome | None = None,
        advance: bool = True,
        limit: int = 0,
        tokens: int = 0,
        session: str = "",
    ) -> RoutingDecision:
        """Decide on local state with each target's quotas as its on_state_loss says:
        local_share divides them by the live replicas, fail_open drops them, fail_closed
        keeps the target out until shared state is back."""
        local, closed = self._degraded(route)
        if closed:
            exclude = (*exclude, *closed)
        return self.local.decide_now(
            local,
            exclude=exclude,
            outcome=outcome,
            advance=advance,
            limit=limit,
            tokens=tokens,
            session=session,
        )

    def _degraded(self, route: RouteSpec) -> tuple[RouteSpec, tuple[str, ...]]:
        if not any(t.has_quota for t in route.targets):
            return route, ()
        live = max(1, self.live_replicas())
        cached = self._degraded_routes.get(route.name)
        if cached is not None and cached[0] is route and cached[1] == live:
            return cached[2], cached[3]

        def part(limit: int, policy: str) -> int:
            if not limit or policy == "fail_open":
                return 0
            return max(1, limit // live)

        targets = tuple(
            dataclasses.replace(
                t,
                rpm=part(t.rpm, t.on_state_loss),
                tpm=part(t.tpm, t.on_state_loss),
                max_concurrency=part(t.max_concurrency, t.on_state_loss),
            )
            for t in route.targets
        )
        closed = tuple(
            t.id for t in route.targets if t.has_quota and t.on_state_loss == "fail_closed"
        )
        local = dataclasses.replace(route, targets=targets, positions={})
        self._degraded_routes[route.name] = (route, live, local, closed)
        return local, closed

    @property
    def degraded(self) -> bool:
        """True while any shard is on local state."""
        return bool(self._spells)

    @property
    def degraded_shards(self) -> list[int]:
        return sorted(self._spells)

    @property
    def pending_releases(self) -> int:
        return len(self._releases)

    def _shard(self, route: RouteSpec) -> int:
        return self.primary.shard_of(route)

    def _degrade(self, shard: int, route: RouteSpec, op: str, exc: StateUnavailable) -> None:
        self.last_error = str(exc)
        if self._on_error is not None:
            self._on_error(op)
        if shard in self._spells:
            return
        now = time.monotonic()
        recovered = self._recovered_at.get(shard)
        flaps = (
            self._flaps.get(shard, 0) + 1
            if recovered and now - recovered < self._flap_window
            else 0
        )
        self._flaps[shard] = flaps
        dwell = 0.0 if flaps == 0 else min(self._max_dwell, self._flap_dwell * 2 ** (flaps - 1))
        if shard == 0 and self.primary.target.kind != "cluster":
            log.warning("shared state unavailable (%s); routing on local state", exc)
        else:
            log.warning(
                "shared state unavailable for slot %d (route %r: %s); routing its routes on "
                "local state",
                shard,
                route.name,
                exc,
            )
        first = not self._spells
        spell = self._spells[shard] = _Spell(route.name, now, dwell)
        spell.task = asyncio.get_running_loop().create_task(self._probe_until_back(shard, spell))
        if first and self._on_change is not None:
            self._on_change(True)

    async def _probe_until_back(self, shard: int, spell: _Spell) -> None:
        delay = self._probe_min
        successes = 0
        while True:
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            try:
                await self.primary.probe(shard)
                await self._replay_releases(shard)
            except Exception as exc:  # StateUnavailable, or anything odd: never stop probing
                if not isinstance(exc, StateUnavailable):
                    log.warning("probing shared state failed unexpectedly: %r", exc)
                successes = 0
                delay = min(delay * 2, self._probe_max)
                continue
            successes += 1
            if (
                successes < self._recover_after
                or time.monotonic() - spell.since < spell.min_dwell_s
            ):
                delay = self._probe_min
                continue
            # No await since the last release went out: nothing new can be owed to Redis.
            if shard == 0 and self.primary.target.kind != "cluster":
                log.warning("shared state is back; leaving degraded mode")
            else:
                log.warning("shared state is back for slot %d; leaving degraded mode", shard)
            del self._spells[shard]
            self._recovered_at[shard] = time.monotonic()
            if not self._spells and self._on_change is not None:
                self._on_change(False)
            return

    async def _replay_releases(self, shard: int) -> None:
        """Send Redis the releases owed on `shard`, in bounded batches."""
        owed = [item for item in self._releases if item[0] == shard]
        if not owed:
            return
        kept = [item for item in self._releases if item[0] != shard]
        self._releases.clear()
        self._releases.extend(kept)
        for start in range(0, len(owed), _RELEASE_BATCH):
            batch = owed[start : start + _RELEASE_BATCH]
            try:
                await self.primary.record_many([(route, outcome) for _, route, outcome in batch])
            except BaseException:
                self._releases.extendleft(reversed(owed[start:]))
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

    def _foreign(self, shard: int, route: RouteSpec, outcome: Outcome) -> Outcome:
        """A Redis admission's outcome while its shard is away: owe Redis the release of its
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
            self._releases.append((shard, route, release))
        return dataclasses.replace(outcome, generation=-1, token=None, probe=False)

    async def decide(
        self,
        route: RouteSpec,
        *,
        exclude: Collection[str] = (),
        outcome: Outcome | None = None,
        advance: bool = True,
        limit: int = 0,
        tokens: int = 0,
        session: str = "",
    ) -> RoutingDecision:
        shard = self._shard(route)
        if outcome is not None and self._take_local(outcome):
            if shard in self._spells:
                return self._remember(
                    self._local_decide(
                        route,
                        exclude=exclude,
                        outcome=outcome,
                        advance=advance,
                        limit=limit,
                        tokens=tokens,
                        session=session,
                    )
                )
            await self.local.record_many([(route, outcome)])
            outcome = None
        if shard not in self._spells:
            started = time.perf_counter()
            try:
                decision = await self.primary.decide(
                    route,
                    exclude=exclude,
                    outcome=outcome,
                    advance=advance,
                    limit=limit,
                    tokens=tokens,
                    session=session,
                )
            except StateUnavailable as exc:
                self._degrade(shard, route, "decide", exc)
            else:
                if self._on_latency is not None:
                    self._on_latency("decide", time.perf_counter() - started)
                return decision
        if outcome is not None:
            outcome = self._foreign(shard, route, outcome)
        return self._remember(
            self._local_decide(
                route,
                exclude=exclude,
                outcome=outcome,
                advance=advance,
                limit=limit,
                tokens=tokens,
                session=session,
            )
        )

    async def record(self, route: RouteSpec, outcome: Outcome) -> None:
        await self.record_many([(route, outcome)])

    async def record_many(self, items: Sequence[tuple[RouteSpec, Outcome]]) -> None:
        local: list[tuple[RouteSpec, Outcome]] = []
        shared: dict[int, list[tuple[RouteSpec, Outcome]]] = {}
        for route, outcome in items:
            if self._take_local(outcome):
                local.append((route, outcome))
            else:
                shared.setdefault(self._shard(route), []).append((route, outcome))
        groups = list(shared.items())
        if len(groups) == 1:
            unsent = [await self._record_shared(*groups[0])]
        else:
            unsent = await asyncio.gather(*(self._record_shared(s, g) for s, g in groups))
        for shard, group in unsent:
            local += [(route, self._foreign(shard, route, outcome)) for route, outcome in group]
        if local:
            await self.local.record_many(local)

    async def _record_shared(
        self, shard: int, group: list[tuple[RouteSpec, Outcome]]
    ) -> tuple[int, list[tuple[RouteSpec, Outcome]]]:
        """Record on Redis; returns what could not be sent (its shard is away)."""
        if shard in self._spells:
            return shard, group
        started = time.perf_counter()
        try:
            await self.primary.record_many(group)
        except StateUnavailable as exc:
            self._degrade(shard, group[0][0], "record", exc)
            return shard, group
        if self._on_latency is not None:
            self._on_latency("record", time.perf_counter() - started)
        return shard, []

    async def explain(self, route: RouteSpec) -> StateView:
        shard = self._shard(route)
        if shard not in self._spells:
            try:
                return await self.primary.explain(route)
            except StateUnavailable as exc:
                self._degrade(shard, route, "explain", exc)
        return self.local.explain_now(route)

    async def snapshot(self, route: RouteSpec) -> RouteSnapshot:
        return (await self.explain(route)).snapshot

    def health(self) -> StateHealth:
        if self.degraded:
            return StateHealth("redis", "degraded", self.last_error)
        return StateHealth("redis", "live")

    async def reset(self, route: RouteSpec, target_id: str) -> None:
        """Fleet-wide or not at all: a reset that only this replica saw would be a lie."""
        shard = self._shard(route)
        if shard in self._spells:
            raise StateUnavailable(
                f"shared state is unreachable ({self.last_error}); the reset would reach "
                "only this replica"
            )
        try:
            await self.primary.reset(route, target_id)
        except StateUnavailable as exc:
            self._degrade(shard, route, "reset", exc)
            raise
        await self.local.reset(route, target_id)

    async def close(self) -> None:
        tasks = [spell.task for spell in self._spells.values() if spell.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.primary.close()
