"""A circuit breaker usable on its own, in one process or shared by a whole fleet.

It is a one-target route on the same state contract the gateway uses, so its semantics
(and its Lua, when given a RedisState) are exactly the gateway's breakers'.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from edgeroute.errors import CircuitBreakerOpen
from edgeroute.state.base import RouteSpec, StateBackend
from edgeroute.state.memory import MemoryState
from edgeroute.strategy import RoutingStrategy
from edgeroute.types import Admission, BreakerParams, CircuitState, Outcome, OutcomeKind, TargetSpec

T = TypeVar("T")


class CircuitBreaker:
    """`threshold` consecutive failures open it; after `timeout` seconds it half-opens.

    In half-open it lets `half_open_max_probes` calls through (fleet-wide with a RedisState);
    `success_threshold` successes close it, a failure reopens it with a doubled timeout
    (capped at `max_timeout`).
    """

    def __init__(
        self,
        threshold: int = 3,
        timeout: float = 30.0,
        *,
        name: str = "default",
        success_threshold: int = 1,
        half_open_max_probes: int = 1,
        max_timeout: float | None = None,
        probe_ttl: float = 30.0,
        state: StateBackend | None = None,
    ) -> None:
        if threshold < 1 or success_threshold < 1 or half_open_max_probes < 1:
            raise ValueError("threshold, success_threshold and half_open_max_probes must be >= 1")
        if timeout <= 0:
            raise ValueError("timeout must be > 0 seconds")
        self.name = name
        self._state: StateBackend = state if state is not None else MemoryState()
        open_ms = round(timeout * 1000)
        self._route = RouteSpec(
            name=f"breaker:{name}",
            strategy=RoutingStrategy.cost_based(),
            targets=(TargetSpec(id=name, provider=name, model=name),),
            breaker=BreakerParams(
                failure_threshold=threshold,
                open_timeout_ms=open_ms,
                success_threshold=success_threshold,
                half_open_max_probes=half_open_max_probes,
                max_open_timeout_ms=max(open_ms, round((max_timeout or timeout * 10) * 1000)),
                probe_ttl_ms=round(probe_ttl * 1000),
            ),
        )

    async def state(self) -> CircuitState:
        snapshot = await self._state.snapshot(self._route)
        return snapshot.targets[0].state

    async def allow(self) -> Admission:
        """Admit one call or raise CircuitBreakerOpen; pass the admission to record_*."""
        decision = await self._state.decide(self._route)
        if decision.admission is None:
            raise CircuitBreakerOpen(self.name, decision.retry_after_s)
        return decision.admission

    async def record_success(self, admission: Admission | None = None) -> None:
        await self._record(OutcomeKind.SUCCESS, admission)

    async def record_failure(self, admission: Admission | None = None) -> None:
        await self._record(OutcomeKind.FAILURE, admission)

    async def _record(self, kind: OutcomeKind, admission: Admission | None) -> None:
        if admission is None:
            outcome = Outcome(target_id=self.name, kind=kind)
        else:
            outcome = Outcome.for_admission(admission, kind)
        await self._state.record(self._route, outcome)

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run `fn` through the breaker: any exception it raises counts as a failure."""
        admission = await self.allow()
        try:
            result = await fn()
        except Exception:
            await self.record_failure(admission)
            raise
        await self.record_success(admission)
        return result

    async def reset(self) -> None:
        await self._state.reset(self._route, self.name)
