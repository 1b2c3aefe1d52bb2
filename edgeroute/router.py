"""The router: compiles routes from config and turns state decisions into routing calls."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import TypeVar

from edgeroute.config import Config, RouteConfig, effective_breaker, effective_latency
from edgeroute.errors import AllProvidersFailed, NoProvidersAvailable, RoutingError
from edgeroute.state import StateBackend, state_from_config
from edgeroute.state.base import RouteSpec
from edgeroute.strategy import (
    Candidate,
    RoutingDecision,
    RoutingStrategy,
    explain_choice,
    is_held,
    rank,
)
from edgeroute.types import (
    Admission,
    BreakerParams,
    CircuitState,
    Outcome,
    OutcomeKind,
    RouteSnapshot,
    TargetSnapshot,
    TargetSpec,
    WindowParams,
)

T = TypeVar("T")


class UnknownRoute(RoutingError, KeyError):
    """The client asked for a model name that no route serves."""

    def __init__(self, route: str) -> None:
        self.route = route
        RoutingError.__init__(self, f"unknown route {route!r}")

    def __str__(self) -> str:
        return f"unknown route {self.route!r}"


class AttemptFailed(Exception):
    """Raised by an attempt function to say how the failure counts (see Router.call)."""

    def __init__(
        self,
        kind: OutcomeKind,
        error_class: str,
        *,
        retryable: bool = True,
        retry_after_s: float = 0.0,
    ) -> None:
        self.kind = kind
        self.error_class = error_class
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        super().__init__(error_class)


def compile_route(config: Config, route: RouteConfig) -> RouteSpec:
    weights = route.weights
    strategy = (
        RoutingStrategy.named(
            route.strategy,
            cost=weights.cost,
            latency=weights.latency,
            reliability=weights.reliability,
        )
        if weights is not None
        else RoutingStrategy.named(route.strategy)
    )
    breaker = effective_breaker(config, route)
    latency = effective_latency(config, route)
    return RouteSpec(
        name=route.model,
        strategy=strategy,
        targets=tuple(
            TargetSpec(
                id=t.target_id,
                provider=t.provider,
                model=t.model,
                price_per_mtok=t.price_per_mtok,
                input_cost_per_mtok=t.input_cost_per_mtok,
                output_cost_per_mtok=t.output_cost_per_mtok,
            )
            for t in route.targets
        ),
        breaker=BreakerParams(
            failure_threshold=breaker.failure_threshold,
            open_timeout_ms=_ms(breaker.open_timeout_s),
            success_threshold=breaker.success_threshold,
            half_open_max_probes=breaker.half_open_max_probes,
            max_open_timeout_ms=max(_ms(breaker.max_open_timeout_s), _ms(breaker.open_timeout_s)),
            probe_ttl_ms=_ms(breaker.probe_ttl_s),
        ),
        window=WindowParams.from_window(latency.window_s, latency.buckets),
        lease_ttl_ms=_ms(config.state.lease_ttl_s),
        idle_ttl_ms=_ms(config.state.idle_ttl_s),
    )


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


@dataclass(slots=True)
class TargetExplanation:
    """One target in an explain: its state, whether it is admissible, and its score."""

    snapshot: TargetSnapshot
    spec: TargetSpec
    admissible: bool
    excluded_because: str | None
    score: float | None
    rank: int | None


@dataclass(slots=True)
class Explanation:
    route: str
    strategy: RoutingStrategy
    order: list[str]
    reason: str
    targets: list[TargetExplanation]
    snapshot: RouteSnapshot


class Router:
    """Decide → attempt → failover → record for the routes of one config."""

    def __init__(self, config: Config, state: StateBackend | None = None) -> None:
        self.config = config
        self.state: StateBackend = state if state is not None else state_from_config(config.state)
        self.routes: dict[str, RouteSpec] = {
            r.model: compile_route(config, r) for r in config.routes
        }

    def route(self, name: str) -> RouteSpec:
        spec = self.routes.get(name)
        if spec is None:
            raise UnknownRoute(name)
        return spec

    async def decide(
        self, route: str, *, exclude: Collection[str] = (), outcome: Outcome | None = None
    ) -> RoutingDecision:
        """Rank the route's targets and admit the first; raises NoProvidersAvailable."""
        spec = self.route(route)
        decision = await self.state.decide(
            spec, exclude=exclude, outcome=outcome, advance=not exclude and outcome is None
        )
        if decision.admission is None:
            raise NoProvidersAvailable(route, decision.retry_after_s)
        return decision

    async def record(
        self,
        route: str,
        admission: Admission,
        kind: OutcomeKind,
        *,
        latency_ms: float = 0.0,
        retry_after_s: float = 0.0,
        input_tokens: int = 0,
        output_tokens: int = 0,
    ) -> None:
        """Report how an admitted attempt ended (releases its lease, moves its breaker)."""
        outcome = Outcome.for_admission(
            admission,
            kind,
            latency_ms,
            retry_after_s=retry_after_s,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
        )
        await self.state.record(self.route(route), outcome)

    async def call(
        self,
        route: str,
        attempt: Callable[[Candidate], Awaitable[T]],
        *,
        clock: Callable[[], float] | None = None,
    ) -> T:
        """Run `attempt` on the best target, failing over while failures are retryable.

        `attempt` raises AttemptFailed to classify a failure; any other exception counts as
        a retryable FAILURE. Each failover reports the failure and picks again in one step.
        """
        now = clock or time.perf_counter
        tried: list[str] = []
        attempts: list[tuple[str, str, str]] = []
        pending: Outcome | None = None
        for _ in range(self.config.server.max_attempts):
            try:
                decision = await self.decide(route, exclude=tried, outcome=pending)
            except NoProvidersAvailable:
                if attempts:
                    break
                raise
            admission = decision.admission
            assert admission is not None
            chosen = decision.chosen
            tried.append(chosen.target.id)
            started = now()
            try:
                result = await attempt(chosen)
            except AttemptFailed as failure:
                attempts.append((chosen.target.provider, chosen.target.model, failure.error_class))
                pending = Outcome.for_admission(
                    admission,
                    failure.kind,
                    (now() - started) * 1000,
                    retry_after_s=failure.retry_after_s,
                )
                if not failure.retryable:
                    await self.state.record(self.route(route), pending)
                    raise
                continue
            except Exception as exc:
                attempts.append((chosen.target.provider, chosen.target.model, type(exc).__name__))
                pending = Outcome.for_admission(
                    admission, OutcomeKind.FAILURE, (now() - started) * 1000
                )
                continue
            await self.state.record(
                self.route(route),
                Outcome.for_admission(admission, OutcomeKind.SUCCESS, (now() - started) * 1000),
            )
            return result
        if pending is not None:
            await self.state.record(self.route(route), pending)
        raise AllProvidersFailed(route, attempts)

    async def explain(self, route: str) -> Explanation:
        """A dry-run decision: every target's state and score, and why. Changes no state."""
        spec = self.route(route)
        snapshot = await self.state.snapshot(spec)
        candidates: list[Candidate] = []
        why: dict[str, str] = {}
        for index, (target, snap) in enumerate(zip(spec.targets, snapshot.targets, strict=True)):
            if snap.state is CircuitState.OPEN:
                why[target.id] = f"breaker open for {snap.open_remaining_ms} ms"
            elif snap.cooldown_remaining_ms > 0:
                why[target.id] = f"rate-limited for {snap.cooldown_remaining_ms} ms"
            elif (
                snap.state is CircuitState.HALF_OPEN
                and snap.probes_in_use >= spec.breaker.half_open_max_probes
            ):
                why[target.id] = "half-open, every probe slot taken"
            else:
                candidates.append(
                    Candidate(
                        target,
                        index,
                        snap.state,
                        snap.state is CircuitState.HALF_OPEN,
                        snap.successes,
                        snap.latency_sum_us,
                        snap.failures,
                        snap.inflight,
                        held=snap.state is CircuitState.CLOSED
                        and is_held(
                            snap.consecutive_failures,
                            snap.inflight,
                            spec.breaker.failure_threshold,
                        ),
                    )
                )
        # What the next request would see: the cursor it would advance to.
        cursor = snapshot.rr_cursor + 1
        ordered = rank(spec.strategy, candidates, cursor)
        positions = {c.target.id: i for i, c in enumerate(ordered)}
        scores = {c.target.id: c.score for c in ordered}
        return Explanation(
            route=route,
            strategy=spec.strategy,
            order=[c.target.id for c in ordered],
            reason=explain_choice(spec.strategy, ordered, cursor),
            targets=[
                TargetExplanation(
                    snapshot=snap,
                    spec=target,
                    admissible=target.id in positions,
                    excluded_because=why.get(target.id),
                    score=scores.get(target.id),
                    rank=positions.get(target.id),
                )
                for target, snap in zip(spec.targets, snapshot.targets, strict=True)
            ],
            snapshot=snapshot,
        )

    async def reset(self, route: str, target_id: str) -> None:
        spec = self.route(route)
        if target_id not in spec.positions:
            raise KeyError(target_id)
        await self.state.reset(spec, target_id)

    async def close(self) -> None:
        await self.state.close()
