"""Plain data shared by the strategy, state and router layers (no behaviour, no I/O)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class OutcomeKind(enum.IntEnum):
    """How a finished attempt counts. The integer values are part of the Lua protocol."""

    SUCCESS = 0
    FAILURE = 1  # connect error, timeout, 5xx, broken stream: counts against the breaker
    RATE_LIMITED = 2  # 429: a cooldown and a window error, but not a breaker failure
    NEUTRAL = 3  # client error or client gone: releases the lease, counts for nothing


@dataclass(frozen=True, slots=True)
class TargetSpec:
    """One deployment a route can send to, as the state layer needs it."""

    id: str
    provider: str
    model: str
    price_per_mtok: float = 0.0
    input_cost_per_mtok: float = 0.0
    output_cost_per_mtok: float = 0.0
    # Provider quotas, enforced fleet-wide by decide (0: none): requests and tokens per
    # minute, requests in flight.
    rpm: int = 0
    tpm: int = 0
    max_concurrency: int = 0
    # What the quotas do while shared state is away: local_share, fail_open, fail_closed.
    on_state_loss: str = "local_share"
    # strategy priority: the target's group (lower first); strategy weighted: its share.
    priority: int = 0
    weight: int = 1

    @property
    def has_quota(self) -> bool:
        return self.rpm > 0 or self.tpm > 0 or self.max_concurrency > 0


@dataclass(frozen=True, slots=True)
class BreakerParams:
    failure_threshold: int = 3
    open_timeout_ms: int = 30_000
    success_threshold: int = 3
    half_open_max_probes: int = 1
    max_open_timeout_ms: int = 300_000
    probe_ttl_ms: int = 30_000


@dataclass(frozen=True, slots=True)
class AffinityParams:
    """Sticky sessions: where the session id comes from (`source` "header" or "body", and
    the header or top-level field `name`), how long an unused pin lives, how many a route
    keeps (past that the least recently used goes)."""

    source: str
    name: str
    ttl_ms: int = 600_000
    max_pins: int = 100_000


@dataclass(frozen=True, slots=True)
class WindowParams:
    bucket_ms: int = 5_000
    buckets: int = 12

    @classmethod
    def from_window(cls, window_s: float, buckets: int) -> WindowParams:
        return cls(bucket_ms=max(1, round(window_s * 1000 / buckets)), buckets=buckets)


@dataclass(frozen=True, slots=True)
class EstimatorParams:
    """The time-decayed estimate, exploration budget and load/tolerance of latency and hybrid.

    Latency and error rate are exponentially time-weighted means (half-life `half_life_ms`,
    decayed by the state's own clock). A target whose latency estimate is older than
    `explore_after_ms` (or that has none) is re-measured through exploration reservations:
    at most `explore_max` in flight per target, at most one exploration per `explore_every`
    advancing decides of the route, each reservation expiring after `explore_ttl_ms`.
    The latency term is estimate x (1 + load_penalty x in-flight); targets within
    `tolerance` (relative) of the best share traffic through the route's cursor.
    """

    half_life_ms: int = 500
    explore_after_ms: int = 3_000
    explore_max: int = 1
    explore_every: int = 20
    explore_ttl_ms: int = 30_000
    load_penalty: float = 0.1
    tolerance: float = 0.1
    # The gateway's sample for a non-streamed success is upstream time / output tokens (at
    # least 1). Applied where outcomes are made (edgeroute.accounting), never by the state.
    per_output_token: bool = False


@dataclass(frozen=True, slots=True)
class Admission:
    """What a decide granted: the target, the breaker generation, and the lease to give back."""

    target_id: str
    generation: int
    token: str
    probe: bool
    # Tokens reserved against the target's tpm, and when (the state's clock, ms): the
    # outcome carries both back so record can replace the estimate with the real usage.
    reserved_tokens: int = 0
    reserved_at_ms: int = 0


@dataclass(slots=True)
class Outcome:
    """One finished attempt, reported to the state with `record`."""

    target_id: str
    kind: OutcomeKind
    latency_ms: float = 0.0
    # -1 applies the outcome to whatever generation is current (the standalone breaker API).
    generation: int = -1
    token: str | None = None
    probe: bool = False
    retry_after_s: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    reserved_tokens: int = 0
    reserved_at_ms: int = 0
    # A learned provider limit (rate-limit headers said 0 remaining): out until this long.
    limit_reset_s: float = 0.0

    @classmethod
    def for_admission(
        cls,
        admission: Admission,
        kind: OutcomeKind,
        latency_ms: float = 0.0,
        *,
        retry_after_s: float = 0.0,
        input_tokens: int = 0,
        output_tokens: int = 0,
        limit_reset_s: float = 0.0,
    ) -> Outcome:
        """The outcome of an admitted attempt: carries its generation, lease and probe."""
        return cls(
            admission.target_id,
            kind,
            latency_ms,
            admission.generation,
            admission.token,
            admission.probe,
            retry_after_s,
            input_tokens,
            output_tokens,
            admission.reserved_tokens,
            admission.reserved_at_ms,
            limit_reset_s,
        )


@dataclass(slots=True)
class TargetSnapshot:
    """Everything shared state knows about one target right now (admin, explain, tests)."""

    target_id: str
    state: CircuitState
    generation: int
    consecutive_failures: int
    half_open_successes: int
    open_remaining_ms: int
    open_timeout_ms: int
    cooldown_remaining_ms: int
    inflight: int
    probes_in_use: int
    successes: int
    failures: int
    latency_sum_us: int
    input_tokens: int
    output_tokens: int
    # Why the target is not admissible right now (wire.EXCLUSION_REASONS), and for how long;
    # None when it is admissible. Reported by the backend, never re-derived.
    excluded: str | None = None
    excluded_ms: int = 0
    # The time-decayed estimate (EstimatorParams): latency in us (None: never measured),
    # recent error rate, age of the latency estimate, live exploration reservations, and
    # whether the next decide may explore it (no estimate, or older than explore_after).
    estimate_us: float | None = None
    error_rate: float = 0.0
    estimate_age_ms: int | None = None
    explorations_in_use: int = 0
    stale: bool = True
    # How long it has had requests in flight and no answer (ms; 0 when idle).
    waiting_ms: int = 0
    # strategy weighted: its smooth weighted round-robin current weight (0 otherwise).
    current_weight: int = 0

    @property
    def latency_ms(self) -> float | None:
        return self.latency_sum_us / self.successes / 1000.0 if self.successes else None

    @property
    def estimate_ms(self) -> float | None:
        return None if self.estimate_us is None else self.estimate_us / 1000.0

    @property
    def success_rate(self) -> float | None:
        total = self.successes + self.failures
        return self.successes / total if total else None


@dataclass(slots=True)
class RouteSnapshot:
    """Every target of a route in configuration order. `rr_cursor` is the round-robin cursor
    the next request takes (the same number its `x-edgeroute-reason` will name)."""

    route: str
    rr_cursor: int
    now_ms: int
    targets: list[TargetSnapshot]
    pins: int = 0  # affinity: the route's live session pins
