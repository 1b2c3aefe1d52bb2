"""The failover policy of one request, as tenacity pieces.

An attempt that fails in a way another target may not raises `Retry`; the proxy keeps
trying while the `AttemptBudget` lasts (upstream attempts and the request deadline), and
`RoundBackoff` waits only once a whole round of candidates has failed.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import tenacity

from edgeroute.providers import UpstreamRequest
from edgeroute.state.base import RouteSpec
from edgeroute.types import Outcome


class Retry(Exception):
    """An attempt failed in a way another target may not."""


class Exhausted(Exception):
    """No admissible target is left for this request."""

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s


@dataclass(slots=True)
class Attempt:
    """One failed upstream attempt, as the client's 502 lists it."""

    provider: str
    model: str
    error: str
    status: int | None = None
    retry_after_s: float = 0.0


@dataclass(slots=True)
class RequestContext:
    """Everything one client request carries from attempt to attempt."""

    route: RouteSpec
    request: UpstreamRequest
    started: float
    tried: list[str] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    pending: Outcome | None = None
    round_failed: bool = False
    rounds: int = 0
    upstream_s: float = 0.0


class RoundBackoff(tenacity.wait.wait_base):
    """No wait between candidates; jittered exponential backoff once a whole round failed."""

    def __init__(self, context: RequestContext) -> None:
        self._context = context
        self._jitter = tenacity.wait_random_exponential(multiplier=0.05, max=2.0)

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        if not self._context.round_failed:
            return 0.0
        self._context.round_failed = False
        self._context.rounds += 1
        # The backoff grows with rounds, not with attempts: jitter on a copy of the state.
        rounds = copy.copy(retry_state)
        rounds.attempt_number = self._context.rounds
        return float(self._jitter(rounds))


class AttemptBudget(tenacity.stop.stop_base):
    """Stop after `max_attempts` upstream attempts or the request deadline, whichever first.

    Counted from the request's own attempts: a decide that only starts a new round is not
    an attempt, and tenacity's own count would include it.
    """

    def __init__(self, context: RequestContext, max_attempts: int, deadline_s: float) -> None:
        self._context = context
        self._max_attempts = max_attempts
        self._deadline_s = deadline_s

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        context = self._context
        if len(context.attempts) >= self._max_attempts:
            return True
        return time.perf_counter() - context.started >= self._deadline_s
