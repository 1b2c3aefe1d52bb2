"""The request deadline around each attempt (failover.run), as asyncio.timeout kept it.

An attempt that outlives the request's deadline is cut and ends the request as a
non-retryable "timeout"; an attempt's own TimeoutError is an ordinary failure that fails
over; a client that goes away cancels the request (not a timeout) and the lease goes back;
and however the attempt ends, the request's task is left with no cancellation pending, so
it goes on awaiting normally.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from edgeroute import failover
from edgeroute.failover import Exhausted, FailoverPolicy, Failure, Served
from edgeroute.state.base import RouteSpec
from edgeroute.state.memory import MemoryState
from edgeroute.strategy import Candidate, RoutingStrategy
from edgeroute.types import Outcome, OutcomeKind, TargetSpec

ROUTE = RouteSpec(
    "chat",
    RoutingStrategy.round_robin(),
    (TargetSpec("a", "p", "model-a"), TargetSpec("b", "p", "model-b")),
)
# Long enough for any attempt that should finish; short enough that one that hangs is cut.
DEADLINE_S = 0.3
HANG_S = 30.0  # far past the deadline: only the deadline ends it


def classify(exc: BaseException) -> Failure:
    return Failure(OutcomeKind.FAILURE, type(exc).__name__)


class Engine:
    def __init__(self) -> None:
        self.state = MemoryState()
        self.recorded: list[Outcome] = []

    async def record(self, route: RouteSpec, outcome: Outcome) -> None:
        self.recorded.append(outcome)
        await self.state.record(route, outcome)

    async def run(self, attempt: Callable[[Candidate], Awaitable[str]]) -> Served[str]:
        return await failover.run(
            self.state,
            ROUTE,
            attempt,
            policy=FailoverPolicy(max_attempts=3, deadline_s=DEADLINE_S, backoff_base_s=0.0),
            classify=classify,
            record=self.record,
        )

    async def in_flight(self) -> list[int]:
        return [t.inflight for t in (await self.state.snapshot(ROUTE)).targets]


async def no_cancellation_pending() -> bool:
    task = asyncio.current_task()
    assert task is not None
    await asyncio.sleep(0)  # a pending cancellation would land here
    return task.cancelling() == 0


async def test_an_attempt_past_the_deadline_ends_the_request_as_a_timeout() -> None:
    engine = Engine()
    tried: list[str] = []

    async def attempt(candidate: Candidate) -> str:
        tried.append(candidate.target.id)
        await asyncio.sleep(HANG_S)
        return "late"

    with pytest.raises(Exhausted) as caught:
        await asyncio.wait_for(engine.run(attempt), HANG_S / 2)
    exhausted = caught.value
    assert exhausted.failure == Failure(OutcomeKind.FAILURE, "timeout", retryable=False)
    assert exhausted.cause is None  # the deadline's, not an exception of the attempt's
    assert [a.error for a in exhausted.attempts] == ["timeout"] and len(tried) == 1
    assert [o.kind for o in engine.recorded] == [OutcomeKind.FAILURE]
    assert await engine.in_flight() == [0, 0]
    assert await no_cancellation_pending()


async def test_an_attempts_own_timeout_is_a_failure_that_fails_over() -> None:
    engine = Engine()

    async def attempt(candidate: Candidate) -> str:
        if candidate.target.id == "a":
            raise TimeoutError("upstream timed out")  # e.g. the provider's own sock_read
        return "from b"

    served = await engine.run(attempt)
    assert served.result == "from b"
    assert [(a.target.id, a.error) for a in served.attempts] == [("a", "TimeoutError")]
    assert await no_cancellation_pending()


async def test_a_client_going_away_cancels_the_request_and_returns_the_lease() -> None:
    engine = Engine()
    started = asyncio.Event()

    async def attempt(candidate: Candidate) -> str:
        started.set()
        await asyncio.sleep(HANG_S)
        return "never"

    request = asyncio.create_task(engine.run(attempt))
    await started.wait()
    assert sum(await engine.in_flight()) == 1
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert [o.kind for o in engine.recorded] == [OutcomeKind.NEUTRAL]
    assert await engine.in_flight() == [0, 0]


async def test_an_attempt_that_answers_despite_the_deadline_is_served() -> None:
    """It swallowed the cancellation and answered anyway: served, as asyncio.timeout let it
    be, and the deadline's cancellation is withdrawn from the task."""
    engine = Engine()

    async def attempt(candidate: Candidate) -> str:
        try:
            await asyncio.sleep(HANG_S)
        except asyncio.CancelledError:
            return "answered anyway"
        return "never"

    served = await asyncio.wait_for(engine.run(attempt), HANG_S / 2)
    assert served.result == "answered anyway" and served.attempts == []
    assert await no_cancellation_pending()


async def test_an_attempt_that_turns_the_deadline_into_its_own_error_is_classified() -> None:
    """Cut by the deadline, the attempt raised an error of its own rather than the
    cancellation (as a client library may): that error is the failure, classified, and the
    request ends there (its deadline has passed)."""
    engine = Engine()

    async def attempt(candidate: Candidate) -> str:
        try:
            await asyncio.sleep(HANG_S)
        except asyncio.CancelledError:
            raise ConnectionResetError("cut") from None
        return "never"

    with pytest.raises(Exhausted) as caught:
        await asyncio.wait_for(engine.run(attempt), HANG_S / 2)
    assert caught.value.failure == Failure(OutcomeKind.FAILURE, "ConnectionResetError")
    assert isinstance(caught.value.cause, ConnectionResetError)
    assert len(caught.value.attempts) == 1
    assert await no_cancellation_pending()


async def test_a_client_leaving_as_the_deadline_passes_is_still_a_cancellation() -> None:
    """The deadline cut the attempt and the client cancelled too: the client's
    cancellation wins (it propagates), as asyncio.timeout decides it."""
    engine = Engine()
    request: asyncio.Task[Served[str]] | None = None

    async def attempt(candidate: Candidate) -> str:
        try:
            await asyncio.sleep(HANG_S)
        except asyncio.CancelledError:
            assert request is not None
            request.cancel()  # the client leaves while the deadline's cancellation lands
            raise
        return "never"

    request = asyncio.create_task(engine.run(attempt))
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(request, HANG_S / 2)
    assert [o.kind for o in engine.recorded] == [OutcomeKind.NEUTRAL]
