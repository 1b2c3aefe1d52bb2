"""The state contract every backend honours, and the compiled route it works on."""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from edgeroute.strategy import RoutingDecision, RoutingStrategy
from edgeroute.types import (
    AffinityParams,
    BreakerParams,
    EstimatorParams,
    Outcome,
    RouteSnapshot,
    TargetSpec,
    WindowParams,
)


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """A route compiled for the state layer: everything a decide or a record needs to know."""

    name: str
    strategy: RoutingStrategy
    targets: tuple[TargetSpec, ...]
    breaker: BreakerParams = field(default_factory=BreakerParams)
    window: WindowParams = field(default_factory=WindowParams)
    estimator: EstimatorParams = field(default_factory=EstimatorParams)
    lease_ttl_ms: int = 900_000
    idle_ttl_ms: int = 3_600_000
    # "target": a breaker per target; "provider": one per provider, shared by every route
    # with this scope that sends to it. Such routes keep their keys under one shared tag
    # (`state_group`, see router.breaker_groups) so a script reaches them in one slot.
    breaker_scope: str = "target"
    state_group: str = ""
    affinity: AffinityParams | None = None
    positions: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.positions.update({target.id: i for i, target in enumerate(self.targets)})

    def breaker_provider(self, target_id: str) -> str:
        """Whose breaker a target's outcomes move: its provider's with scope provider,
        else "" (the target's own)."""
        if self.breaker_scope != "provider":
            return ""
        position = self.positions.get(target_id)
        return "" if position is None else self.targets[position].provider

    @property
    def key_ttl_ms(self) -> int:
        """How long a route's state outlives its last write: never shorter than anything it
        holds (an open breaker, the window, a lease, a probe reservation, a session pin). All
        keys of a route share it, so they exist together (see keep_together in lua/lib.lua)."""
        window = self.window
        return max(
            self.idle_ttl_ms,
            2 * self.breaker.max_open_timeout_ms,
            2 * window.bucket_ms * window.buckets,
            self.lease_ttl_ms + 60_000,
            2 * self.breaker.probe_ttl_ms,
            2 * self.estimator.explore_ttl_ms,
            self.affinity.ttl_ms + 60_000 if self.affinity is not None else 0,
        )

    @property
    def max_cooldown_ms(self) -> int:
        """A Retry-After is honoured up to half the key lifetime (30 min by default), so a
        cooldown never outlives the record that holds it."""
        return self.key_ttl_ms // 2


def session_hash(session_id: str) -> str:
    """What shared state keeps of a session id (affinity): a hash, never the id itself,
    which may be a secret or personal data. "" (no session) stays ""."""
    if not session_id:
        return ""
    return hashlib.blake2b(session_id.encode(), digest_size=16).hexdigest()


@dataclass(slots=True)
class StateView:
    """What explain shows: the decision the next request would get, changing nothing.

    `decision` ranks every admissible target (no admission); `snapshot` has every target in
    configuration order with the reason it is excluded, as the backend's own decide sees it.
    """

    decision: RoutingDecision
    snapshot: RouteSnapshot


@dataclass(frozen=True, slots=True)
class StateHealth:
    """How a replica's state is doing, as readiness, metrics and the CLI report it.

    backend: "memory" or "redis" (what the config asks for);
    shared_state: "local" (memory: nothing shared), "live" or "degraded" (routing on local
    state because Redis is unreachable); error: the last reason it degraded.
    """

    backend: str
    shared_state: str
    error: str | None = None


class StateBackend(Protocol):
    """Shared routing state. Each call is atomic; `decide` and `record` are one round trip.

    - `decide` ranks the route's admissible targets and admits the first: it takes an
      in-flight lease on it and, for a half-open breaker, one of its probe reservations.
      `exclude` leaves out targets this request already tried; `outcome`, if given, is
      recorded first in the same atomic step (failover: report the failure, pick again);
      `advance` moves the round-robin cursor (only a request's first decide does);
      `limit` > 0 returns only that many candidates (the gateway needs two: the choice
      and the runner-up its reason names), which saves Redis formatting the rest.
      `tokens` is the request's estimated tokens: an admitted target with a `tpm` quota
      reserves them (record replaces them with the real usage).
    - `explain` is a dry-run decide: the same admission rules and ranking, nothing changed.
    - `record` reports a finished attempt: releases the lease and probe, adds the sample to
      the rolling window, moves the breaker when the outcome's generation is current.
    """

    name: str

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
    ) -> RoutingDecision: ...

    async def record(self, route: RouteSpec, outcome: Outcome) -> None: ...

    async def record_many(self, items: Sequence[tuple[RouteSpec, Outcome]]) -> None: ...

    async def explain(self, route: RouteSpec) -> StateView: ...

    async def snapshot(self, route: RouteSpec) -> RouteSnapshot: ...

    def health(self) -> StateHealth: ...

    async def reset(self, route: RouteSpec, target_id: str) -> None: ...

    async def close(self) -> None: ...
