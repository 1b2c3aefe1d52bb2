"""The failover engine: decide → attempt → fail over → record, for one request.

One loop serves the gateway and the library's `Router.call`, written plainly:
- each decide reports the previous attempt's failure in the same state call (one round trip);
- a request makes at most `max_attempts` upstream attempts and never outlives its deadline;
- once every admissible target has failed this round, the next round starts after a jittered
  exponential backoff (full jitter, capped), so a fleet does not retry in lockstep;
- a failure that another target may not fix (a client error) stops at once;
- whatever an attempt raises is an attempt failure, classified by the caller's `classify`,
  and every admission's lease goes back to the state on every path, cancellation included.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from edgeroute.errors import StateUnavailable
from edgeroute.state.base import RouteSpec, StateBackend
from edgeroute.strategy import Candidate, RoutingDecision
from edgeroute.types import Admission, Outcome, OutcomeKind, TargetSpec

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class FailoverPolicy:
    max_attempts: int = 3
    deadline_s: float = 60.0
    backoff_base_s: float = 0.05
    backoff_max_s: float = 2.0

    def backoff(self, rounds: int) -> float:
        """Full jitter: uniform in [0, min(max, base·2^rounds)]."""
        return random.uniform(0.0, min(self.backoff_max_s, self.backoff_base_s * 2**rounds))


@dataclass(frozen=True, slots=True)
class Failure:
    """How a failed attempt counts: for the breaker (`kind`), for the client (`error`)."""

    kind: OutcomeKind
    error: str
    retryable: bool = True
    retry_after_s: float = 0.0
    status: int | None = None
    limit_reset_s: float = 0.0  # a learned provider limit: out fleet-wide for this long


@dataclass(slots=True)
class Attempt:
    """One failed upstream attempt, as the client's 502 lists it."""

    target: TargetSpec
    error: str
    status: int | None = None
    retry_after_s: float = 0.0

    @property
    def provider(self) -> str:
        return self.target.provider

    @property
    def model(self) -> str:
        return self.target.model


@dataclass(slots=True)
class Served(Generic[T]):
    """The attempt that answered: its decision, admission, result and timings."""

    decision: RoutingDecision
    admission: Admission
    result: T
    attempt_started: float
    first_byte: float
    attempts: list[Attempt]
    upstream_s: float

    @property
    def target(self) -> TargetSpec:
        return self.decision.chosen.target


class Exhausted(Exception):
    """The request ends without an answer: nothing admissible, the budget spent, or a
    failure no other target can fix (`cause`, e.g. the client's own 400)."""

    def __init__(
        self,
        attempts: list[Attempt],
        retry_after_s: float = 0.0,
        *,
        cause: BaseException | None = None,
        failure: Failure | None = None,
        upstream_s: float = 0.0,
        state_unavailable: bool = False,
        quota_limited: bool = False,
    ) -> None:
        super().__init__(f"exhausted after {len(attempts)} attempts")
        self.attempts = attempts
        self.retry_after_s = retry_after_s
        self.cause = cause
        self.failure = failure
        self.upstream_s = upstream_s
        self.state_unavailable = state_unavailable
        # Nothing was admitted because quotas (or learned provider limits) are spent.
        self.quota_limited = quota_limited


class Observer(Protocol):
    """What the engine tells its caller as it goes (the gateway: metrics and spans)."""

    def decided(self, route: RouteSpec, decision: RoutingDecision, elapsed_s: float) -> None: ...

    def attempt_failed(
        self, route: RouteSpec, target: TargetSpec, failure: Failure, elapsed_s: float
    ) -> None: ...

    def failover(self, route: RouteSpec, last: Attempt) -> None: ...


Classify = Callable[[BaseException], Failure]
Record = Callable[[RouteSpec, Outcome], Awaitable[None]]


@dataclass(slots=True)
class _Request:
    route: RouteSpec
    started: float
    tried: list[str] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    pending: Outcome | None = None
    rounds: int = 0
    upstream_s: float = 0.0


async def run(
    state: StateBackend,
    route: RouteSpec,
    attempt: Callable[[Candidate], Awaitable[T]],
    *,
    policy: FailoverPolicy,
    classify: Classify,
    record: Record,
    observer: Observer | None = None,
    started: float | None = None,
    tokens: int = 0,
    gate: Awaitable[object] | None = None,
) -> Served[T]:
    """Serve one request on `route`; see the module comment for the rules.

    `gate` (the client's limits) runs alongside the first decide, so both go to shared
    state in one pipelined round trip; if it raises, the decide's admission is given back
    (a NEUTRAL outcome: the target's quota counts keep it, which errs on the safe side)
    and its exception ends the request."""
    now = time.perf_counter
    request = _Request(route, now() if started is None else started)
    first = True
    while True:
        pending, request.pending = request.pending, None
        decide_started = now()
        try:
            deciding = state.decide(
                route,
                exclude=request.tried,
                outcome=pending,
                advance=first,
                limit=2,
                tokens=tokens,
            )
            if gate is None:
                decision = await deciding
            else:
                decision = await _gated(state, route, deciding, gate, record)
                gate = None
        except StateUnavailable:  # a plain RedisState, no degraded mode: nothing to route on
            raise Exhausted(
                request.attempts, 1.0, upstream_s=request.upstream_s, state_unavailable=True
            ) from None
        first = False
        if observer is not None:
            observer.decided(route, decision, now() - decide_started)
        admission = decision.admission
        if admission is None:
            if request.attempts and request.tried and await _next_round(request, policy):
                continue
            raise Exhausted(
                request.attempts,
                decision.retry_after_s,
                upstream_s=request.upstream_s,
                quota_limited=decision.quota_limited,
            )
        chosen = decision.chosen
        if request.attempts and observer is not None:
            observer.failover(route, request.attempts[-1])  # this request really moves on
        attempt_started = now()
        remaining = policy.deadline_s - (attempt_started - request.started)
        try:
            async with asyncio.timeout(max(0.001, remaining)) as deadline:
                result = await attempt(chosen)
        except asyncio.CancelledError:
            # The client went away: the attempt counts for nothing, the lease goes back.
            await record(route, Outcome.for_admission(admission, OutcomeKind.NEUTRAL))
            raise
        except Exception as exc:
            # A TimeoutError with the deadline expired is the request's own deadline; any
            # other exception (an attempt's own timeout included) is classified.
            deadline_hit = isinstance(exc, TimeoutError) and deadline.expired()
            failure = (
                Failure(OutcomeKind.FAILURE, "timeout", retryable=False)
                if deadline_hit
                else classify(exc)
            )
            if await _handle_failure(
                request, chosen, admission, failure, attempt_started, policy, record, observer
            ):
                continue
            raise Exhausted(
                request.attempts,
                0.0,
                cause=None if deadline_hit else exc,
                failure=failure,
                upstream_s=request.upstream_s,
            ) from None
        first_byte = now()
        request.upstream_s += first_byte - attempt_started
        return Served(
            decision,
            admission,
            result,
            attempt_started,
            first_byte,
            request.attempts,
            request.upstream_s,
        )


async def _gated(
    state: StateBackend,
    route: RouteSpec,
    deciding: Awaitable[RoutingDecision],
    gate: Awaitable[object],
    record: Record,
) -> RoutingDecision:
    decided, gated = await asyncio.gather(deciding, gate, return_exceptions=True)
    if isinstance(gated, BaseException):
        if isinstance(decided, RoutingDecision) and decided.admission is not None:
            await record(route, Outcome.for_admission(decided.admission, OutcomeKind.NEUTRAL))
        raise gated
    if isinstance(decided, BaseException):
        raise decided
    return decided


async def _handle_failure(
    request: _Request,
    chosen: Candidate,
    admission: Admission,
    failure: Failure,
    attempt_started: float,
    policy: FailoverPolicy,
    record: Record,
    observer: Observer | None,
) -> bool:
    """Account for a failed attempt; True when the request may try again."""
    outcome = _failed(request, chosen, admission, failure, attempt_started, observer)
    budget_left = (
        failure.retryable
        and len(request.attempts) < policy.max_attempts
        and time.perf_counter() - request.started < policy.deadline_s
    )
    if budget_left:
        request.tried.append(chosen.target.id)
        request.pending = outcome  # reported by the next decide, in the same round trip
        return True
    await record(request.route, outcome)
    return False


def _failed(
    request: _Request,
    chosen: Candidate,
    admission: Admission,
    failure: Failure,
    attempt_started: float,
    observer: Observer | None,
) -> Outcome:
    """Count a failed attempt on the request and tell the observer; the outcome to record."""
    elapsed = time.perf_counter() - attempt_started
    request.upstream_s += elapsed
    target = chosen.target
    request.attempts.append(Attempt(target, failure.error, failure.status, failure.retry_after_s))
    if observer is not None:
        observer.attempt_failed(request.route, target, failure, elapsed)
    return Outcome.for_admission(
        admission,
        failure.kind,
        elapsed * 1000,
        retry_after_s=failure.retry_after_s,
        limit_reset_s=failure.limit_reset_s,
    )


async def _next_round(request: _Request, policy: FailoverPolicy) -> bool:
    """Every admissible target failed this round: back off, then try them all again."""
    remaining = policy.deadline_s - (time.perf_counter() - request.started)
    if len(request.attempts) >= policy.max_attempts or remaining <= 0:
        return False
    request.rounds += 1
    request.tried.clear()
    await asyncio.sleep(min(policy.backoff(request.rounds), remaining))
    return True
