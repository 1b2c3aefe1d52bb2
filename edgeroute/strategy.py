"""Pure scoring: how a route orders its admissible targets. No Redis, no HTTP, no clock.

`rank` is the reference implementation. `lua/decide.lua` computes the very same numbers in
the same floating-point order of operations, and the conformance suite holds the two equal;
change one only together with the other.

Every score is "higher is better" and lies in [0, 1] (hybrid: in [0, sum of weights] = [0, 1]).
Ties keep configuration order, so every replica breaks them the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from edgeroute.errors import ConfigError
from edgeroute.types import Admission, CircuitState, TargetSpec

STRATEGY_KINDS = ("cost", "latency", "hybrid", "round_robin", "least_busy")


@dataclass(frozen=True, slots=True)
class RoutingStrategy:
    """How to order targets. Build with the class methods; weights are normalised to sum 1."""

    kind: str
    cost_weight: float = 0.0
    latency_weight: float = 0.0
    reliability_weight: float = 0.0

    @classmethod
    def cost_based(cls) -> RoutingStrategy:
        return cls("cost")

    @classmethod
    def latency_based(cls) -> RoutingStrategy:
        return cls("latency")

    @classmethod
    def round_robin(cls) -> RoutingStrategy:
        return cls("round_robin")

    @classmethod
    def least_busy(cls) -> RoutingStrategy:
        return cls("least_busy")

    @classmethod
    def default_hybrid(cls) -> RoutingStrategy:
        return cls.hybrid(cost_weight=0.4, latency_weight=0.4, reliability_weight=0.2)

    @classmethod
    def hybrid(
        cls,
        *,
        cost_weight: float = 0.4,
        latency_weight: float = 0.4,
        reliability_weight: float = 0.2,
    ) -> RoutingStrategy:
        weights = (cost_weight, latency_weight, reliability_weight)
        for name, value in zip(("cost", "latency", "reliability"), weights, strict=True):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"$.weights.{name}: {value} is outside 0..1")
        total = sum(weights)
        if total <= 0.0:
            raise ConfigError("$.weights: all weights are zero")
        return cls(
            "hybrid", cost_weight / total, latency_weight / total, reliability_weight / total
        )

    @classmethod
    def named(
        cls, kind: str, *, cost: float = 0.4, latency: float = 0.4, reliability: float = 0.2
    ) -> RoutingStrategy:
        if kind == "hybrid":
            return cls.hybrid(
                cost_weight=cost, latency_weight=latency, reliability_weight=reliability
            )
        if kind not in STRATEGY_KINDS:
            raise ConfigError(f"$.strategy: unknown strategy {kind!r}")
        return cls(kind)


@dataclass(slots=True)
class Candidate:
    """One admissible target with the numbers its score came from."""

    target: TargetSpec
    index: int
    state: CircuitState = CircuitState.CLOSED
    probe: bool = False
    successes: int = 0
    latency_sum_us: int = 0
    failures: int = 0
    inflight: int = 0
    score: float = 0.0
    # A closed breaker with failures in a row whose in-flight requests could already reach
    # the threshold: more traffic could only add failures, so it goes last.
    held: bool = False

    @property
    def latency_ms(self) -> float | None:
        return self.latency_sum_us / self.successes / 1000.0 if self.successes else None

    @property
    def success_rate(self) -> float:
        total = self.successes + self.failures
        return self.successes / total if total else 1.0


def rank(strategy: RoutingStrategy, candidates: list[Candidate], rr_cursor: int) -> list[Candidate]:
    """Score `candidates` (admissible, in configuration order) and return them best first.

    Half-open targets holding a free probe slot go first whatever their score: a breaker
    only recovers if somebody probes it, and the probe budget already bounds the risk.
    Held targets (see `is_held`) go last: used only when nothing else is admissible, so
    the fleet sends a failing provider no more than `failure_threshold` requests at once.
    """
    if not candidates:
        return candidates
    kind = strategy.kind
    if kind == "round_robin":
        count = len(candidates)
        start = (rr_cursor - 1) % count
        ordered = candidates[start:] + candidates[:start]
        for position, candidate in enumerate(ordered):
            candidate.score = 1.0 - position / count
    else:
        if kind == "cost":
            _score_cost(candidates)
        elif kind == "latency":
            _score_latency(candidates)
        elif kind == "hybrid":
            _score_hybrid(strategy, candidates)
        elif kind == "least_busy":
            _score_least_busy(candidates)
        else:  # pragma: no cover - RoutingStrategy validates kinds
            raise ValueError(kind)
        ordered = sorted(candidates, key=_by_score)
    if any(c.probe or c.held for c in ordered):
        ordered = (
            [c for c in ordered if c.probe]
            + [c for c in ordered if not c.probe and not c.held]
            + [c for c in ordered if c.held]
        )
    return ordered


def is_held(failures: int, inflight: int, failure_threshold: int) -> bool:
    """A suspect target's budget is spent: its next failures would already open it."""
    return failures > 0 and failures + inflight >= failure_threshold


def _by_score(candidate: Candidate) -> float:
    return -candidate.score  # sorted() is stable: equal scores keep configuration order


def _score_cost(candidates: list[Candidate]) -> None:
    max_price = max(c.target.price_per_mtok for c in candidates)
    for c in candidates:
        c.score = 1.0 - c.target.price_per_mtok / max_price if max_price > 0.0 else 1.0


def _mean_latency_us(c: Candidate) -> float | None:
    return c.latency_sum_us / c.successes if c.successes else None


def _max_latency_us(candidates: list[Candidate]) -> float:
    return max((c.latency_sum_us / c.successes for c in candidates if c.successes), default=0.0)


def _latency_term(c: Candidate, max_latency: float) -> float:
    # No samples yet: optimistic, so a new or recovered target gets explored.
    if not c.successes or max_latency <= 0.0:
        return 1.0
    return 1.0 - (c.latency_sum_us / c.successes) / max_latency


def _score_latency(candidates: list[Candidate]) -> None:
    max_latency = _max_latency_us(candidates)
    for c in candidates:
        c.score = _latency_term(c, max_latency)


def _score_hybrid(strategy: RoutingStrategy, candidates: list[Candidate]) -> None:
    max_price = 0.0
    max_latency = 0.0
    for c in candidates:
        if c.target.price_per_mtok > max_price:
            max_price = c.target.price_per_mtok
        if c.successes:
            mean = c.latency_sum_us / c.successes
            if mean > max_latency:
                max_latency = mean
    wc, wl, wr = strategy.cost_weight, strategy.latency_weight, strategy.reliability_weight
    for c in candidates:
        price = c.target.price_per_mtok
        cost_term = 1.0 - price / max_price if max_price > 0.0 else 1.0
        successes = c.successes
        total = successes + c.failures
        reliability = successes / total if total else 1.0
        if successes and max_latency > 0.0:
            latency_term = 1.0 - (c.latency_sum_us / successes) / max_latency
        else:
            latency_term = 1.0  # no samples yet: optimistic, so it gets explored
        c.score = wc * cost_term + wl * latency_term + wr * reliability


def _score_least_busy(candidates: list[Candidate]) -> None:
    most = max(c.inflight for c in candidates)
    for c in candidates:
        c.score = 1.0 - c.inflight / most if most > 0 else 1.0


@dataclass(slots=True)
class RoutingDecision:
    """The outcome of one decide: candidates best first; the first one is admitted.

    `reason` is built on first use: most requests never read it in full.
    """

    route: str
    strategy: RoutingStrategy
    candidates: list[Candidate]
    admission: Admission | None = None
    retry_after_s: float = 0.0
    rr_cursor: int = 0
    # How many targets were admissible; `candidates` may hold only the best few (limit).
    admissible: int = -1
    _reason: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.admissible < 0:
            self.admissible = len(self.candidates)

    @property
    def chosen(self) -> Candidate:
        return self.candidates[0]

    @property
    def provider(self) -> str:
        return self.candidates[0].target.provider

    @property
    def model(self) -> str:
        return self.candidates[0].target.model

    @property
    def target_id(self) -> str:
        return self.candidates[0].target.id

    @property
    def score(self) -> float:
        return self.candidates[0].score

    @property
    def fallbacks(self) -> list[Candidate]:
        return self.candidates[1:]

    @property
    def reason(self) -> str:
        if self._reason is None:
            self._reason = explain_choice(
                self.strategy, self.candidates, self.rr_cursor, self.admissible
            )
        return self._reason


def _fmt_latency(c: Candidate) -> str:
    latency = c.latency_ms
    return "unexplored" if latency is None else f"{latency:.1f}ms"


def explain_choice(
    strategy: RoutingStrategy,
    ordered: Sequence[Candidate],
    rr_cursor: int = 0,
    admissible: int | None = None,
) -> str:
    """One line naming the numbers that decided, e.g. for the `x-edgeroute-reason` header."""
    if not ordered:
        return "no admissible target"
    best = ordered[0]
    name = best.target.id
    if best.probe:
        head = f"half-open probe of {name} (breaker recovering)"
    elif strategy.kind == "cost":
        head = f"cost: {name} at {best.target.price_per_mtok:g} $/Mtok"
    elif strategy.kind == "latency":
        head = f"latency: {name} mean {_fmt_latency(best)} over {best.successes} samples"
    elif strategy.kind == "hybrid":
        head = (
            f"hybrid: {name} score {best.score:.3f} (cost {best.target.price_per_mtok:g} $/Mtok,"
            f" latency {_fmt_latency(best)}, success {best.success_rate:.0%};"
            f" weights {strategy.cost_weight:.2f}/{strategy.latency_weight:.2f}"
            f"/{strategy.reliability_weight:.2f})"
        )
    elif strategy.kind == "round_robin":
        healthy = len(ordered) if admissible is None else admissible
        head = f"round_robin: cursor {rr_cursor} -> {name} of {healthy} healthy"
    else:
        head = f"least_busy: {name} with {best.inflight} in flight"
    if best.held:
        head += " (suspect: recent failures, its failure budget is in flight; nothing else left)"
    if len(ordered) > 1:
        runner = ordered[1]
        head += f"; next {runner.target.id} ({runner.score:.3f})"
    return head
