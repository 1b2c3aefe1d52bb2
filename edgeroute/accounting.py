"""One accounting step for every way a request can end: metrics, access line, outcome.

The proxy calls exactly one of `rejected`, `unserved` or `served` per request, whatever
happened; the failover engine reports failed attempts and failovers here as it goes.
"""

from __future__ import annotations

import logging
import time

from edgeroute import tracing
from edgeroute.failover import Attempt, Cause, Failure
from edgeroute.metrics import Metrics
from edgeroute.providers.base import Usage
from edgeroute.recorder import Recorder
from edgeroute.responses import access_log, write_access_line
from edgeroute.state.base import RouteSpec
from edgeroute.strategy import RoutingDecision
from edgeroute.types import Admission, Outcome, OutcomeKind, TargetSpec


class Accounting:
    def __init__(self, metrics: Metrics, recorder: Recorder) -> None:
        self.metrics = metrics
        self.recorder = recorder

    # ---- the engine's observer -----------------------------------------------------------

    def decided(self, route: RouteSpec, decision: RoutingDecision, elapsed_s: float) -> None:
        """Decide latency is the state layer's metric; a moved session pin is counted here."""
        if decision.affinity == "moved":
            self.metrics.child(
                self.metrics.affinity_moves, route.name, decision.pin_moved_from
            ).inc()

    def attempt_failed(
        self, route: RouteSpec, target: TargetSpec, failure: Failure, elapsed_s: float
    ) -> None:
        metrics = self.metrics
        metrics.child(metrics.attempts, target.provider, target.model, failure.error).inc()
        metrics.child(metrics.upstream_duration, target.provider, target.model).observe(elapsed_s)

    def failover(self, route: RouteSpec, last: Attempt, to: TargetSpec) -> None:
        metrics = self.metrics
        metrics.child(metrics.failovers, route.name, last.provider, last.error).inc()

    def fallback(self, route: RouteSpec, to: RouteSpec, cause: Cause) -> None:
        self.metrics.child(self.metrics.fallbacks, route.name, to.name, cause).inc()

    async def record(self, route: RouteSpec, outcome: Outcome) -> None:
        """Outcomes go to state off the request path, batched by the recorder."""
        self.recorder.submit(route, outcome)

    # ---- how a request ended -------------------------------------------------------------

    def rejected(self, request_id: str, status: int, started: float, code: str) -> None:
        """Refused before routing (bad body, unknown model): no route label, ever."""
        self.unserved(request_id, None, status, started, code, error=code)

    def unserved(
        self,
        request_id: str,
        route: RouteSpec | None,
        status: int,
        started: float,
        outcome: str,
        *,
        attempts: list[Attempt] | None = None,
        upstream_s: float | None = None,
        error: str | None = None,
        requested: str | None = None,
    ) -> None:
        """Ended without a served answer: exhausted, passed-through client error, gone.
        `route` is where it ended; `requested`, the route the client named, if another."""
        total = time.perf_counter() - started
        last = attempts[-1] if attempts else None
        provider = last.provider if last else ""
        model = last.model if last else ""
        name = route.name if route is not None else ""
        metrics = self.metrics
        metrics.child(metrics.requests, name, provider, model, outcome).inc()
        if route is not None:
            metrics.child(metrics.request_duration, name).observe(total)
        if access_log.isEnabledFor(logging.INFO):
            write_access_line(
                request_id,
                name or None,
                status,
                total,
                attempts=len(attempts) if attempts else 0,
                provider=provider or None,
                model=model or None,
                upstream_s=upstream_s,
                error=error,
                trace_id=tracing.current_trace_id(),
                requested_route=requested if requested != name else None,
            )

    def served(
        self,
        request_id: str,
        route: RouteSpec,
        target: TargetSpec,
        admission: Admission,
        *,
        started: float,
        status: int,
        outcome: str,
        kind: OutcomeKind,
        latency_s: float,
        usage: Usage,
        attempts: int,
        upstream_s: float,
        ttft: float | None = None,
        error: str | None = None,
        limit_reset_s: float = 0.0,
        requested: str | None = None,
    ) -> None:
        """Reached a target: record the attempt's outcome, then the request's metrics.
        `route` is the route that served; `requested`, the route the client named.
        `limit_reset_s`: the provider's headers said its limit is spent for this long."""
        prompt, completion = usage.prompt_tokens, usage.completion_tokens
        sample_ms = latency_s * 1000
        if ttft is None and kind is OutcomeKind.SUCCESS and route.estimator.per_output_token:
            sample_ms /= max(1, completion)  # `latency: {per_output_token: true}`
        self.recorder.submit(
            route,
            Outcome.for_admission(
                admission,
                kind,
                sample_ms,
                input_tokens=prompt,
                output_tokens=completion,
                limit_reset_s=limit_reset_s,
            ),
        )
        bound = self.metrics.target(route.name, target.provider, target.model)
        if kind is OutcomeKind.SUCCESS:
            bound.attempt_ok(1)
            bound.upstream_duration(latency_s)
            if ttft is not None:
                bound.ttft(ttft)
            if prompt or completion:
                bound.prompt_tokens(prompt)
                bound.completion_tokens(completion)
                cost = (
                    prompt * target.input_cost_per_mtok + completion * target.output_cost_per_mtok
                )
                if cost:
                    bound.cost(cost / 1_000_000)
        elif kind is OutcomeKind.FAILURE and error is not None:
            metrics = self.metrics
            metrics.child(metrics.attempts, target.provider, target.model, error).inc()
        total = time.perf_counter() - started
        if outcome == "success":
            bound.success(1)
        else:
            metrics = self.metrics
            provider, model = target.provider, target.model
            metrics.child(metrics.requests, route.name, provider, model, outcome).inc()
        bound.request_duration(total)
        if ttft is None:
            self.metrics.observe_overhead(max(0.0, total - upstream_s))
        if access_log.isEnabledFor(logging.INFO):
            write_access_line(
                request_id,
                route.name,
                status,
                total,
                attempts=attempts,
                provider=target.provider,
                model=target.model,
                target=target.id,
                upstream_s=upstream_s,
                ttft=ttft,
                error=error,
                trace_id=tracing.current_trace_id(),
                requested_route=requested if requested != route.name else None,
            )
