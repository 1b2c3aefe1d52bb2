"""The failover engine: decide → attempt → fail over → record, for one request.

One loop serves the gateway and the library's `Router.call`, written plainly:
- each decide reports the previous attempt's failure in the same state call (one round trip);
- a request makes at most `max_attempts` upstream attempts and never outlives its deadline;
- once every admissible target has failed this round, the next round starts after a jittered
  exponential backoff (full jitter, capped), so a fleet does not retry in lockstep;
- a failure that another target may not fix (a client error) stops at once;
- whatever an attempt raises is an attempt failure, classified by the caller's `classify`,
  and every admission's lease goes back to the state on every path, cancellation included;
- a route that cannot serve the request hands it on to a fallback route (see `Fallbacks`):
  the same loop goes on there with that route's own strategy and state, under the one
  deadline; each route of the chain gets `max_attempts` attempts of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar

from edgeroute.errors import StateUnavailable
from edgeroute.state.base import RouteSpec, StateBackend
from edgeroute.strategy import Candidate, RoutingDecision
from edgeroute.types import Admission, Outcome, OutcomeKind, TargetSpec

T = TypeVar("T")

# Why a request leaves a route for a fallback route: every target is excluded or has failed
# ("exhausted"), or a target said the prompt is too long or its content filter refused it.
Cause = Literal["exhausted", "context_window", "content_policy"]


@dataclass(frozen=True, slots=True)
class Fallbacks:
    """A route's fallback routes by cause (`routes[].fallbacks`, `context_window_fallbacks`,
    `content_policy_fallbacks`), as route names in the order they are tried."""

    exhausted: tuple[str, ...] = ()
    context_window: tuple[str, ...] = ()
    content_policy: tuple[str, ...] = ()

    def of(self, cause: Cause) -> tuple[str, ...]:
        if cause == "context_window":
            return self.context_window
        if cause == "content_policy":
            return self.content_policy
        return self.exhausted

    def __bool__(self) -> bool:
        return bool(self.exhausted or self.context_window or self.content_policy)


# The fallback routes of `route` for `cause`, compiled (the router's lookup).
FallbackRoutes = Callable[["RouteSpec", Cause], Sequence["RouteSpec"]]


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
    # A failure that a fallback route of this cause may fix (context window, content policy).
    fallback: Cause | None = None


@dataclass(slots=True)
class Attempt:
    """One failed upstream attempt, as the client's 502 lists it."""

    route: str
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
    """The attempt that answered: its route (a fallback's, when the chain moved on), decision,
    admission, result and timings; `attempts` are the failed ones across the chain."""

    route: RouteSpec
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
    failure no other target can fix (`cause`, e.g. the client's own 400). `route` is the
    route it ended on (the last of its fallback chain)."""

    def __init__(
        self,
        route: RouteSpec,
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
        self.route = route
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

    def failover(self, route: RouteSpec, last: Attempt, to: TargetSpec) -> None: ...

    def fallback(self, route: RouteSpec, to: RouteSpec, cause: Cause) -> None: ...


Classify = Callable[[BaseException], Failure]
Record = Callable[[RouteSpec, Outcome], Awaitable[None]]


@dataclass(slots=True)
class _Request:
    route: RouteSpec  # the route the request is on now
    started: float
    tried: list[str] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)  # across the whole chain
    route_attempts: int = 0  # on `route`: each route of a chain has its own budget
    pending: Outcome | None = None
    rounds: int = 0
    upstream_s: float = 0.0
    # Fallback routes still to try, next first, each with the cause whose list named it; and
    # every route the request has been on (a chain never visits a route twice).
    plan: list[tuple[RouteSpec, Cause]] = field(default_factory=list)
    visited: set[str] = field(default_factory=set)


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
    session: Callable[[RouteSpec], str] | None = None,
    gate: Awaitable[object] | None = None,
    fallbacks: FallbackRoutes | None = None,
) -> Served[T]:
    """Serve one request on `route` (or down its fallback chain); see the module comment.

    `session` gives the request's session key (hashed) for a route with affinity, each
    route of a chain by its own `affinity.key`. `gate` (the client's limits) is awaited
    right after the first decide; its caller has queued its state call already, so both go
    in one pipelined round trip (no tasks). If it raises, the decide's admission is given back
    (a NEUTRAL outcome: the target's quota counts keep it, which errs on the safe side)
    and its exception ends the request."""
    now = time.perf_counter
    request = _Request(route, now() if started is None else started, visited={route.name})
    first = True  # the request's first decide on this route: it moves the route's cursor
    while True:
        route = request.route
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
                session=session(route) if session is not None else "",
            )
            if gate is None:
                decision = await deciding
            else:
                decision = await _gated(state, route, deciding, gate, record)
                gate = None
        except StateUnavailable:  # a plain RedisState, no degraded mode: nothing to route on
            raise Exhausted(
                route, request.attempts, 1.0, upstream_s=request.upstream_s, state_unavailable=True
            ) from None
        first = False
        if observer is not None:
            observer.decided(route, decision, now() - decide_started)
        admission = decision.admission
        if admission is None:
            # A fallback route beats another round on targets that just failed.
            if _fall_back(request, "exhausted", fallbacks, policy, observer):
                first = True
                continue
            if request.route_attempts and request.tried and await _next_round(request, policy):
                continue
            raise Exhausted(
                route,
                request.attempts,
                decision.retry_after_s,
                upstream_s=request.upstream_s,
                quota_limited=decision.quota_limited,
            )
        chosen = decision.chosen
        if request.route_attempts and observer is not None:
            observer.failover(route, request.attempts[-1], chosen.target)  # it really moves on
        attempt_started = now()
        remaining = policy.deadline_s - (attempt_started - request.started)
        deadline = _Deadline(max(0.001, remaining))
        failed: Exception | None = None
        try:
            result = await attempt(chosen)
        except asyncio.CancelledError:
            if not deadline.timed_out():
                # The client went away: the attempt counts for nothing, the lease goes back.
                await record(route, Outcome.for_admission(admission, OutcomeKind.NEUTRAL))
                raise
            failed = TimeoutError()  # the request's own deadline, as asyncio.timeout says it
        except BaseException as exc:
            deadline.close()
            if not isinstance(exc, Exception):
                raise
            failed = exc
        else:
            deadline.close()
        if failed is not None:
            # A TimeoutError with the deadline expired is the request's own deadline; any
            # other exception (an attempt's own timeout included) is classified.
            deadline_hit = isinstance(failed, TimeoutError) and deadline.expired
            failure = (
                Failure(OutcomeKind.FAILURE, "timeout", retryable=False)
                if deadline_hit
                else classify(failed)
            )
            if await _handle_failure(
                request, chosen, admission, failure, attempt_started, policy, record, observer
            ):
                continue
            leave = _leaving_because(failure, deadline_hit)
            if leave is not None and _fall_back(request, leave, fallbacks, policy, observer):
                first = True
                continue
            raise Exhausted(
                route,
                request.attempts,
                0.0,
                cause=None if deadline_hit else failed,
                failure=failure,
                upstream_s=request.upstream_s,
            ) from None
        first_byte = now()
        request.upstream_s += first_byte - attempt_started
        return Served(
            route,
            decision,
            admission,
            result,
            attempt_started,
            first_byte,
            request.attempts,
            request.upstream_s,
        )


class _Deadline:
    """The request's deadline around one attempt, as `asyncio.timeout` keeps it, without
    its two coroutines (`async with`) and state machine: one timer that cancels the
    request's task, and on the way out the same bookkeeping (the timer stopped; the
    cancellation withdrawn if it fired, and turned into a timeout only when nothing else
    cancelled the task meanwhile)."""

    __slots__ = ("_cancelling", "_handle", "_task", "expired")

    def __init__(self, delay: float) -> None:
        # The loop first, then the task by it: current_task() alone would look the loop up
        # again, and each lookup makes a getpid system call (Python 3.11's check for a fork).
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("a request runs in a task")
        self._task = task
        self._cancelling = task.cancelling()
        self.expired = False
        self._handle = loop.call_at(loop.time() + delay, self._expire)

    def _expire(self) -> None:
        self.expired = True
        self._task.cancel()

    def close(self) -> None:
        """The attempt ended otherwise than cancelled: stop the timer, and withdraw the
        cancellation it may have sent (the attempt answered or raised despite it)."""
        self._handle.cancel()
        if self.expired:
            self._task.uncancel()

    def timed_out(self) -> bool:
        """The attempt ended cancelled: True when the deadline did it alone (a timeout),
        False when the cancellation is someone else's (it must propagate)."""
        self._handle.cancel()
        return self.expired and self._task.uncancel() <= self._cancelling


async def _gated(
    state: StateBackend,
    route: RouteSpec,
    deciding: Awaitable[RoutingDecision],
    gate: Awaitable[object],
    record: Record,
) -> RoutingDecision:
    # No tasks, no gather: the caller queued the gate's call before this decide's, so both
    # are in the same pipelined write and awaiting one after the other costs no round trip.
    try:
        decided = await deciding
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await gate  # seen through: a lease it took is kept for settling
        raise
    except BaseException:
        await gate  # a refusal of the client answers first; else the decide's error
        raise
    try:
        await gate
    except BaseException:
        if decided.admission is not None:
            await record(route, Outcome.for_admission(decided.admission, OutcomeKind.NEUTRAL))
        raise
    return decided


def _leaving_because(failure: Failure, deadline_hit: bool) -> Cause | None:
    """Why a failure that ends the request on its route may move it to a fallback route:
    its own cause, or the route's budget spent; never the deadline or a plain client error."""
    if deadline_hit:
        return None
    if failure.fallback is not None:
        return failure.fallback
    return "exhausted" if failure.retryable else None


def _fall_back(
    request: _Request,
    cause: Cause,
    fallbacks: FallbackRoutes | None,
    policy: FailoverPolicy,
    observer: Observer | None,
) -> bool:
    """Move the request on to the next route of its chain; False when there is none.

    The route's own list for `cause` goes in front of what is left of the chain (depth
    first), routes already visited left out. An exhausted route goes on to whatever comes
    next; a context-window or content-policy failure only to a route listed for that cause.
    """
    if fallbacks is None or time.perf_counter() - request.started >= policy.deadline_s:
        return False
    listed = [(spec, cause) for spec in fallbacks(request.route, cause)]
    chain = [(spec, why) for spec, why in listed + request.plan if spec.name not in request.visited]
    i = next((i for i, (_, why) in enumerate(chain) if cause in ("exhausted", why)), None)
    if i is None:
        return False
    spec = chain[i][0]
    if observer is not None:
        observer.fallback(request.route, spec, cause)
    request.plan = chain[:i] + chain[i + 1 :]
    request.visited.add(spec.name)
    request.route = spec
    request.tried.clear()
    request.route_attempts = 0
    request.rounds = 0
    return True


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
    """Account for a failed attempt; True when the request may try again on this route."""
    outcome = _failed(request, chosen, admission, failure, attempt_started, observer)
    budget_left = (
        failure.retryable
        and failure.fallback is None
        and request.route_attempts < policy.max_attempts
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
    request.route_attempts += 1
    target = chosen.target
    request.attempts.append(
        Attempt(request.route.name, target, failure.error, failure.status, failure.retry_after_s)
    )
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
    if request.route_attempts >= policy.max_attempts or remaining <= 0:
        return False
    request.rounds += 1
    request.tried.clear()
    await asyncio.sleep(min(policy.backoff(request.rounds), remaining))
    return True
