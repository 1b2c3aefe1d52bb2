"""The router: compiles routes from config; the one door from callers to routing state."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from edgeroute import failover
from edgeroute.config import (
    Config,
    RouteConfig,
    WeightsConfig,
    effective_breaker,
    effective_latency,
)
from edgeroute.errors import AllProvidersFailed, NoProvidersAvailable, RoutingError
from edgeroute.failover import (
    Cause,
    Classify,
    Exhausted,
    FailoverPolicy,
    Failure,
    Fallbacks,
    Observer,
    Record,
    Served,
)
from edgeroute.state import StateBackend, StateHealth, build_state
from edgeroute.state.base import RouteSpec, session_hash
from edgeroute.strategy import Candidate, RoutingDecision, RoutingStrategy
from edgeroute.types import (
    Admission,
    AffinityParams,
    BreakerParams,
    EstimatorParams,
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
        fallback: Cause | None = None,
    ) -> None:
        self.kind = kind
        self.error_class = error_class
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        # "context_window" / "content_policy": leave the route for that cause's fallback
        # route (none configured: the request ends with this error).
        self.fallback = fallback
        super().__init__(error_class)


def compile_route(
    config: Config, route: RouteConfig, groups: Mapping[str, str] | None = None
) -> RouteSpec:
    """`groups`: breaker_groups(config), when compiling every route (computed once)."""
    weights = route.weights or WeightsConfig()
    mix = {"cost": weights.cost, "latency": weights.latency, "reliability": weights.reliability}
    strategy = (
        RoutingStrategy.priority(route.within or "round_robin", **mix)
        if route.strategy == "priority"
        else RoutingStrategy.named(route.strategy, **mix)
    )
    # Priority without any `priority:` set: configuration order, one target per group.
    explicit = any(t.priority is not None for t in route.targets)
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
                rpm=t.rpm or 0,
                tpm=t.tpm or 0,
                max_concurrency=t.max_concurrency or 0,
                on_state_loss=t.on_state_loss or config.state.on_state_loss,
                priority=(t.priority or 0) if explicit else j,
                weight=t.weight or 1,
            )
            for j, t in enumerate(route.targets)
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
        estimator=EstimatorParams(
            half_life_ms=_ms(latency.half_life_s),
            explore_after_ms=_ms(latency.explore_after_s),
            explore_max=latency.explore_max_in_flight,
            explore_every=max(1, math.ceil(1.0 / latency.explore_share - 1e-9)),
            explore_ttl_ms=_ms(latency.explore_ttl_s),
            load_penalty=latency.load_penalty,
            tolerance=latency.tolerance,
            per_output_token=latency.per_output_token,
        ),
        lease_ttl_ms=_ms(config.state.lease_ttl_s),
        idle_ttl_ms=_ms(config.state.idle_ttl_s),
        breaker_scope=breaker.scope,
        state_group=(breaker_groups(config) if groups is None else groups).get(route.model, ""),
        affinity=_affinity(route),
    )


def compile_fallbacks(route: RouteConfig) -> Fallbacks:
    return Fallbacks(
        exhausted=tuple(route.fallbacks),
        context_window=tuple(route.context_window_fallbacks),
        content_policy=tuple(route.content_policy_fallbacks),
    )


def _affinity(route: RouteConfig) -> AffinityParams | None:
    affinity = route.affinity
    if affinity is None:
        return None
    source, _, name = affinity.key.partition(":")
    return AffinityParams(
        source, name.lower() if source == "header" else name, _ms(affinity.ttl_s), affinity.max_pins
    )


def breaker_groups(config: Config) -> dict[str, str]:
    """Routes with breaker scope provider that share a provider, directly or through other
    routes (connected components of the route-provider graph), share one group: their
    keys carry one hash tag, so every script reaches the providers' shared breakers in the
    slot it already works in. The group is named after its first route in config order.
    The price: such routes are one cluster slot, not one each (spread is lost only among
    them); adding a route that joins two groups moves their state to a new tag once."""
    scoped = [r for r in config.routes if effective_breaker(config, r).scope == "provider"]
    parent = {r.model: r.model for r in scoped}

    def root(name: str) -> str:
        while parent[name] != name:
            name = parent[name]
        return name

    owner: dict[str, str] = {}
    for r in scoped:
        for t in r.targets:
            first = owner.setdefault(t.provider, r.model)
            a, b = root(first), root(r.model)
            if a != b:
                # The earlier route in config order names the group.
                order = [x.model for x in scoped]
                keep, drop = sorted((a, b), key=order.index)
                parent[drop] = keep
    return {name: root(name) for name in parent}


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


_EXCLUSION_TEXT = {
    "breaker_open": "breaker open for {ms} ms",
    "rate_limited": "rate-limited for {ms} ms",
    "probes_full": "half-open, every probe slot taken",
    "quota_concurrency": "at its max_concurrency",
    "quota_rpm": "at its rpm quota for {ms} ms",
    "quota_tpm": "at its tpm quota for {ms} ms",
    "learned_limit": "provider says its limit is spent for {ms} ms",
}


@dataclass(slots=True)
class TargetExplanation:
    """One target in an explain: its state, whether it is admissible, and its score.

    `rank` is 1 for the target the next request would get; None when it is excluded.
    """

    snapshot: TargetSnapshot
    spec: TargetSpec
    score: float | None
    rank: int | None
    held: bool = False
    # The next request re-measures this target through the exploration budget.
    explore: bool = False

    @property
    def admissible(self) -> bool:
        return self.snapshot.excluded is None

    @property
    def excluded_because(self) -> str | None:
        """The backend's reason code, in words (rendered here, never re-derived)."""
        code = self.snapshot.excluded
        if code is None:
            return None
        return _EXCLUSION_TEXT[code].format(ms=self.snapshot.excluded_ms)


@dataclass(slots=True)
class Explanation:
    route: str
    strategy: RoutingStrategy
    order: list[str]
    reason: str
    targets: list[TargetExplanation]
    snapshot: RouteSnapshot
    fallbacks: Fallbacks
    # The routes an exhausted request walks, in order, starting with this one.
    chain: list[str]
    spec: RouteSpec | None = None  # the compiled route: its policies (scope, affinity)


def _library_classify(exc: BaseException) -> Failure:
    if isinstance(exc, AttemptFailed):
        return Failure(
            exc.kind, exc.error_class, exc.retryable, exc.retry_after_s, fallback=exc.fallback
        )
    return Failure(OutcomeKind.FAILURE, type(exc).__name__)


class Router:
    """The one door to routing state: decide → attempt → failover → record, and explain,
    for the routes of one config. The gateway, the library API and the CLI all use it."""

    def __init__(self, config: Config, state: StateBackend | None = None) -> None:
        self.config = config
        self.state: StateBackend = (
            state if state is not None else build_state(config.state, degrade=False)
        )
        groups = breaker_groups(config)
        self.routes: dict[str, RouteSpec] = {
            r.model: compile_route(config, r, groups) for r in config.routes
        }
        self.fallbacks: dict[str, Fallbacks] = {
            r.model: compile_fallbacks(r) for r in config.routes
        }
        server = config.server
        self.policy = FailoverPolicy(
            max_attempts=server.max_attempts, deadline_s=server.request_timeout_s
        )

    def route(self, name: str) -> RouteSpec:
        spec = self.routes.get(name)
        if spec is None:
            raise UnknownRoute(name)
        return spec

    def fallback_routes(self, route: RouteSpec, cause: Cause) -> tuple[RouteSpec, ...]:
        """The routes `route` hands a request on to for `cause`, in order (the engine's
        lookup; config checks guarantee every name is a route)."""
        return tuple(self.routes[name] for name in self.fallbacks[route.name].of(cause))

    def chain(self, route: str) -> list[str]:
        """The routes a request on `route` walks while each one is exhausted: the route,
        then each fallback with its own chain (depth first), no route twice."""
        order: list[str] = []

        def walk(name: str) -> None:
            if name not in order:
                order.append(name)
                for fallback in self.fallbacks[name].exhausted:
                    walk(fallback)

        walk(route)
        return order

    def health(self) -> StateHealth:
        return self.state.health()

    async def decide(
        self,
        route: str,
        *,
        exclude: Collection[str] = (),
        outcome: Outcome | None = None,
        session: str = "",
    ) -> RoutingDecision:
        """Rank the route's targets and admit the first; raises NoProvidersAvailable.
        `session`: the request's session id, for a route with affinity (kept hashed)."""
        spec = self.route(route)
        decision = await self.state.decide(
            spec,
            exclude=exclude,
            outcome=outcome,
            advance=not exclude and outcome is None,
            session=session_hash(session) if spec.affinity is not None else "",
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

    def run(
        self,
        route: RouteSpec,
        attempt: Callable[[Candidate], Awaitable[T]],
        *,
        classify: Classify,
        record: Record,
        observer: Observer | None = None,
        started: float | None = None,
        tokens: int = 0,
        session: Callable[[RouteSpec], str] | None = None,
        gate: Awaitable[object] | None = None,
    ) -> Coroutine[Any, Any, Served[T]]:
        """The failover engine (see `edgeroute.failover`) on this router's state and policy.
        `tokens` is the request's estimated tokens (reserved against targets' tpm);
        `session` gives, for each route of the chain, the hash of its session key (affinity;
        request.session_key).

        The caller records the served attempt's outcome (the gateway does so once the
        response or stream has ended); every failed attempt is recorded here.

        The engine's own coroutine, to await: no coroutine of this method's around it, whose
        frame every resumption of the request would pass through.
        """
        return failover.run(
            self.state,
            route,
            attempt,
            policy=self.policy,
            classify=classify,
            record=record,
            observer=observer,
            started=started,
            tokens=tokens,
            session=session,
            gate=gate,
            fallbacks=self.fallback_routes,
        )

    async def call(
        self, route: str, attempt: Callable[[Candidate], Awaitable[T]], *, session: str = ""
    ) -> T:
        """Run `attempt` on the best target, failing over while failures are retryable.

        `attempt` raises AttemptFailed to classify a failure; any other exception counts as
        a retryable FAILURE. Same engine, budget, deadline and fallback chains as the
        gateway: `candidate.target` may belong to a fallback route. `session`: the caller's
        session id, for a route with affinity (kept hashed).
        """
        spec = self.route(route)
        pin = session_hash(session)

        async def record(spec: RouteSpec, outcome: Outcome) -> None:
            await self.state.record(spec, outcome)

        try:
            served = await self.run(
                spec,
                attempt,
                classify=_library_classify,
                record=record,
                session=lambda route: pin if route.affinity is not None else "",
            )
        except Exhausted as exhausted:
            if isinstance(exhausted.cause, AttemptFailed) and not exhausted.cause.retryable:
                raise exhausted.cause from None
            if not exhausted.attempts:
                raise NoProvidersAvailable(route, exhausted.retry_after_s) from None
            raise AllProvidersFailed(
                route, [(a.provider, a.model, a.error) for a in exhausted.attempts]
            ) from None
        latency_ms = (served.first_byte - served.attempt_started) * 1000
        outcome = Outcome.for_admission(served.admission, OutcomeKind.SUCCESS, latency_ms)
        await record(served.route, outcome)
        return served.result

    async def explain(self, route: str) -> Explanation:
        """A dry-run decision: every target's state and score, and why. Changes no state."""
        spec = self.route(route)
        view = await self.state.explain(spec)
        ranked = {c.target.id: (rank, c) for rank, c in enumerate(view.decision.candidates, 1)}
        targets = []
        for target, snap in zip(spec.targets, view.snapshot.targets, strict=True):
            place = ranked.get(target.id)
            targets.append(
                TargetExplanation(
                    snapshot=snap,
                    spec=target,
                    score=None if place is None else place[1].score,
                    rank=None if place is None else place[0],
                    held=place is not None and place[1].held,
                    explore=place is not None and place[1].explore,
                )
            )
        return Explanation(
            route=route,
            strategy=spec.strategy,
            order=[c.target.id for c in view.decision.candidates],
            reason=view.decision.reason,
            targets=targets,
            snapshot=view.snapshot,
            fallbacks=self.fallbacks[route],
            chain=self.chain(route),
            spec=spec,
        )

    async def snapshot(self, route: str) -> RouteSnapshot:
        return await self.state.snapshot(self.route(route))

    async def reset(self, route: str, target_id: str) -> None:
        spec = self.route(route)
        if target_id not in spec.positions:
            raise KeyError(target_id)
        await self.state.reset(spec, target_id)

    async def close(self) -> None:
        await self.state.close()
