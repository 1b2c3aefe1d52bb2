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
from operator import attrgetter

from edgeroute.errors import ConfigError
from edgeroute.types import Admission, CircuitState, TargetSpec

STRATEGY_KINDS = ("cost", "latency", "hybrid", "round_robin", "least_busy", "priority", "weighted")
# What orders the targets inside one priority group.
WITHIN_KINDS = ("round_robin", "latency", "cost", "hybrid", "least_busy")


@dataclass(frozen=True, slots=True)
class RoutingStrategy:
    """How to order targets. Build with the class methods; weights are normalised to sum 1."""

    kind: str
    cost_weight: float = 0.0
    latency_weight: float = 0.0
    reliability_weight: float = 0.0
    # strategy priority: what orders the targets inside one group ("" otherwise); a hybrid
    # `within` uses the weights above.
    within: str = ""
    # Fixed per strategy and read per reply (the reason text), so built once here: the
    # weights as the text shows them, and priority's `within` strategy.
    weights_text: str = field(init=False, repr=False, compare=False)
    _within: RoutingStrategy | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        text = f"{self.cost_weight:.2f}/{self.latency_weight:.2f}/{self.reliability_weight:.2f}"
        object.__setattr__(self, "weights_text", text)
        within = None
        if self.kind == "priority":
            within = RoutingStrategy(
                self.within, self.cost_weight, self.latency_weight, self.reliability_weight
            )
        object.__setattr__(self, "_within", within)

    @property
    def inner(self) -> RoutingStrategy:
        """The strategy that scores targets: `within` for priority, else this one."""
        return self if self._within is None else self._within

    @property
    def scoring(self) -> str:
        """The kind that scores and moves the cursor (priority: its `within`)."""
        return self.within if self.kind == "priority" else self.kind

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
    def priority(
        cls,
        within: str = "round_robin",
        *,
        cost: float = 0.4,
        latency: float = 0.4,
        reliability: float = 0.2,
    ) -> RoutingStrategy:
        """Groups by TargetSpec.priority (lower first); `within` orders each group."""
        if within not in WITHIN_KINDS:
            raise ConfigError(f"$.within: unknown strategy {within!r}")
        inner = cls.named(within, cost=cost, latency=latency, reliability=reliability)
        return cls(
            "priority",
            inner.cost_weight,
            inner.latency_weight,
            inner.reliability_weight,
            within,
        )

    @classmethod
    def weighted(cls) -> RoutingStrategy:
        """An exact split by TargetSpec.weight (smooth weighted round-robin, shared state)."""
        return cls("weighted")

    @classmethod
    def named(
        cls, kind: str, *, cost: float = 0.4, latency: float = 0.4, reliability: float = 0.2
    ) -> RoutingStrategy:
        if kind == "hybrid":
            return cls.hybrid(
                cost_weight=cost, latency_weight=latency, reliability_weight=reliability
            )
        if kind == "priority":
            return cls.priority(cost=cost, latency=latency, reliability=reliability)
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
    # The time-decayed estimate (EstimatorParams): mean latency in us, -1 when never
    # measured; recent error rate; age of the latency estimate in ms (-1: none).
    estimate_us: float = -1.0
    error_rate: float = 0.0
    estimate_age_ms: int = -1
    # This decide re-measures the target through the exploration budget.
    explore: bool = False
    # How long the target has had requests in flight and returned nothing (ms): at least
    # one request has been out that long, so a slowdown shows before its first slow sample.
    waiting_ms: int = 0
    # strategy weighted: the smooth weighted round-robin credit this decide sees (the
    # stored current weight plus the target's weight); the highest goes first.
    credit: int = 0

    @property
    def measured(self) -> bool:
        return self.estimate_us >= 0.0

    @property
    def latency_ms(self) -> float | None:
        """The estimate that ranks (time-decayed), else the window mean, else None."""
        if self.estimate_us >= 0.0:
            return self.estimate_us / 1000.0
        return self.latency_sum_us / self.successes / 1000.0 if self.successes else None

    @property
    def success_rate(self) -> float:
        total = self.successes + self.failures
        return self.successes / total if total else 1.0


@dataclass(frozen=True, slots=True)
class Shaping:
    """What latency and hybrid need beyond the scores (EstimatorParams, as rank sees them)."""

    load_penalty: float = 0.1
    tolerance: float = 0.1
    explore_after_ms: int = 3_000
    explore_max: int = 1


_NO_SHAPING = Shaping()
# A target failing most requests still ranks by a bounded multiple of its latency.
ERROR_FLOOR = 0.1
# Waiting counts up to this multiple of the estimate: a lease left by a crashed replica
# can't make a target look slower than that (exploration re-measures it meanwhile).
WAITING_CAP = 4.0


def rank(
    strategy: RoutingStrategy,
    candidates: list[Candidate],
    rr_cursor: int,
    shaping: Shaping = _NO_SHAPING,
    explore_slots: Sequence[int] | None = None,
) -> list[Candidate]:
    """Score `candidates` (admissible, in configuration order) and return them best first.

    Latency and hybrid: measured targets rank before unmeasured ones (those are explored
    through the budget), and the targets within `tolerance` of the best share traffic: the
    one at `rr_cursor` among them goes first (no herding). With `explore_slots` (the live
    exploration reservations per candidate; given only when the budget's share rule allows
    an exploration) the target `pick_exploration` names is marked `explore` and goes first
    among the ordinary ones.
    Half-open targets holding a free probe slot go first whatever their score: a breaker
    only recovers if somebody probes it, and the probe budget already bounds the risk.
    Held targets (see `is_held`) go last: used only when nothing else is admissible, so
    the fleet sends a failing provider no more than `failure_threshold` requests at once.
    """
    if not candidates:
        return candidates
    kind = strategy.kind
    if kind == "priority":
        return _rank_groups(strategy, candidates, rr_cursor, shaping, explore_slots)
    if kind == "round_robin":
        count = len(candidates)
        start = (rr_cursor - 1) % count
        ordered = candidates[start:] + candidates[:start]
        for position, candidate in enumerate(ordered):
            candidate.score = 1.0 - position / count
    elif kind == "cost" or kind == "least_busy":
        if kind == "cost":
            _score_cost(candidates)
        else:
            _score_least_busy(candidates)
        ordered = sorted(candidates, key=_by_score)
    elif kind == "weighted":
        ordered = sorted(candidates, key=_by_credit)
        total = sum(c.target.weight for c in candidates)
        for c in candidates:
            c.score = c.credit / total
    elif kind == "latency" or kind == "hybrid":
        if kind == "latency":
            _score_latency(candidates, shaping.load_penalty)
        else:
            _score_hybrid(strategy, candidates, shaping.load_penalty)
        if explore_slots is not None:
            explored = pick_exploration(candidates, shaping, explore_slots)
            if explored is not None:
                explored.explore = True
        # Measured targets first, each part best score first (ties in configuration order):
        # sorted by score with a C-level key, then the unmeasured moved behind, keeping
        # order (as the key (not measured, -score) would, without a Python call per target;
        # scores are never NaN: prices are finite, estimates integer microseconds).
        ordered = sorted(candidates, key=_SCORE, reverse=True)
        for c in ordered:
            if c.estimate_us < 0.0:
                ordered = [c for c in ordered if c.measured] + [
                    c for c in ordered if not c.measured
                ]
                break
        ordered = _share(ordered, rr_cursor, shaping.tolerance)
    else:  # pragma: no cover - RoutingStrategy validates kinds
        raise ValueError(kind)
    # (one plain loop rather than two any(): rank runs on every decide, seldom finding any)
    for c in ordered:
        if c.explore or c.probe or c.held:
            return _promote(ordered)
    return ordered


def _promote(ordered: list[Candidate]) -> list[Candidate]:
    """The exploration first, then half-open probes first and held targets last."""
    if any(c.explore for c in ordered):
        ordered = [c for c in ordered if c.explore] + [c for c in ordered if not c.explore]
    if any(c.probe or c.held for c in ordered):
        ordered = (
            [c for c in ordered if c.probe]
            + [c for c in ordered if not c.probe and not c.held]
            + [c for c in ordered if c.held]
        )
    return ordered


def _rank_groups(
    strategy: RoutingStrategy,
    candidates: list[Candidate],
    rr_cursor: int,
    shaping: Shaping,
    explore_slots: Sequence[int] | None,
) -> list[Candidate]:
    """Priority: each group (TargetSpec.priority, lower first) ranked on its own by the
    `within` strategy, groups concatenated. A group's half-open probes and held targets
    stay inside it: a backup group is only reached when the group before it is used up.
    Only the first group may explore: the request goes there."""
    inner = strategy.inner
    groups: dict[int, list[int]] = {}
    for j, c in enumerate(candidates):
        groups.setdefault(c.target.priority, []).append(j)
    ordered: list[Candidate] = []
    for n, level in enumerate(sorted(groups)):
        members = groups[level]
        slots = (
            [explore_slots[j] for j in members] if explore_slots is not None and n == 0 else None
        )
        ordered += rank(inner, [candidates[j] for j in members], rr_cursor, shaping, slots)
    return ordered


def _share(ordered: list[Candidate], cursor: int, tolerance: float) -> list[Candidate]:
    """The targets within `tolerance` of the best take turns by the route's cursor: near-equal
    targets share traffic instead of one taking it all, and every replica agrees on the turn
    because the cursor is shared state."""
    best = ordered[0]
    measured = best.measured
    bar = best.score
    factor = 1.0 + tolerance
    # `ordered` is rank's (measured first, best score first), so the near ones are its head:
    # the scan stops at the first one that is not.
    near: list[Candidate] = []
    for c in ordered:
        if (c.estimate_us >= 0.0) != measured or c.score * factor < bar:
            break
        near.append(c)
    if len(near) < 2:
        return ordered
    pick = near[(cursor - 1) % len(near)]
    return [pick] + [c for c in ordered if c is not pick]


def pick_exploration(
    candidates: Sequence[Candidate], shaping: Shaping, in_use: Sequence[int]
) -> Candidate | None:
    """The target an advancing decide re-measures (scores already computed): a closed, not
    held, stale target (no latency estimate, or one older than `explore_after_ms`) with a
    free exploration slot - never measured before measured, then
    the oldest estimate, then the better score, then configuration order. None when no
    target is measured at all (nothing to compare with: the scores decide) or the stale one
    is the only candidate (then it is simply the choice)."""
    if len(candidates) < 2:
        return None
    # One pass: this runs on most decides and usually finds every target fresh, so the
    # freshness test comes first, and "anything measured" is noted on the way rather than
    # in a pass of its own.
    after = shaping.explore_after_ms
    explore_max = shaping.explore_max
    any_measured = False
    chosen: Candidate | None = None
    for c, used in zip(candidates, in_use, strict=True):
        if c.estimate_us >= 0.0:
            any_measured = True
            if c.estimate_age_ms <= after:
                continue  # fresh
        if c.state is not CircuitState.CLOSED or c.held or used >= explore_max:
            continue
        if chosen is None or _staler(c, chosen):
            chosen = c
    return chosen if any_measured else None


def _staler(a: Candidate, b: Candidate) -> bool:
    if a.measured != b.measured:
        return not a.measured
    if a.measured and a.estimate_age_ms != b.estimate_age_ms:
        return a.estimate_age_ms > b.estimate_age_ms
    return a.score > b.score


def is_held(failures: int, inflight: int, failure_threshold: int) -> bool:
    """A suspect target's budget is spent: its next failures would already open it."""
    return failures > 0 and failures + inflight >= failure_threshold


_SCORE = attrgetter("score")


def _by_score(candidate: Candidate) -> float:
    return -candidate.score  # sorted() is stable: equal scores keep configuration order


def _by_credit(candidate: Candidate) -> int:
    return -candidate.credit  # stable: equal credits keep configuration order


def _score_cost(candidates: list[Candidate]) -> None:
    max_price = max(c.target.price_per_mtok for c in candidates)
    for c in candidates:
        c.score = 1.0 - c.target.price_per_mtok / max_price if max_price > 0.0 else 1.0


def _loaded_latencies(candidates: list[Candidate], load_penalty: float) -> list[float]:
    """Each candidate's loaded latency in us (-1: unmeasured). The expected latency is the
    estimate, or longer when a request has already been out longer than it; peak-EWMA
    style, it grows with the requests already in flight. (One call for all candidates
    rather than two per target: every latency and hybrid decide runs this.)"""
    loads: list[float] = []
    for c in candidates:
        expected = c.estimate_us
        if expected < 0.0:
            loads.append(-1.0)
            continue
        waiting = float(c.waiting_ms * 1000)
        if waiting > expected:
            expected = min(waiting, WAITING_CAP * expected)
        loads.append(expected * (1.0 + load_penalty * c.inflight))
    return loads


def _score_latency(candidates: list[Candidate], load_penalty: float) -> None:
    """score = best / expected latency, where the expected latency is the loaded estimate
    divided by the recent success rate (a failed attempt costs a retry)."""
    best = -1.0
    for c, loaded in zip(candidates, _loaded_latencies(candidates, load_penalty), strict=True):
        if c.estimate_us >= 0.0:
            cost = loaded / max(1.0 - c.error_rate, ERROR_FLOOR)
            c.score = cost  # held here until the best is known
            if best < 0.0 or cost < best:
                best = cost
    for c in candidates:
        if c.estimate_us < 0.0:
            c.score = 0.0  # never measured: explored through the budget, not ranked first
        elif c.score > 0.0:
            c.score = best / c.score
        else:
            c.score = 1.0


def _score_hybrid(
    strategy: RoutingStrategy, candidates: list[Candidate], load_penalty: float
) -> None:
    prices = [c.target.price_per_mtok for c in candidates]
    loads = _loaded_latencies(candidates, load_penalty)
    # (max() from 0.0 compares exactly as a loop keeping the larger would; an unmeasured
    # target's -1 never counts)
    max_price = max(0.0, *prices)
    max_latency = max(0.0, *loads)
    wc, wl, wr = strategy.cost_weight, strategy.latency_weight, strategy.reliability_weight
    for c, price, loaded in zip(candidates, prices, loads, strict=True):
        cost_term = 1.0 - price / max_price if max_price > 0.0 else 1.0
        reliability = 1.0 - c.error_rate
        if c.estimate_us < 0.0:
            latency_term = 0.0  # unmeasured: explored through the budget, not ranked first
        elif max_latency > 0.0:
            latency_term = 1.0 - loaded / max_latency
        else:
            latency_term = 1.0
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
    # Nothing admitted, and a quota or a learned provider limit kept a target out: the client
    # hears 429 (retry after `retry_after_s`) rather than 503.
    quota_limited: bool = False
    # Sticky sessions: what this decide did with the request's pin ("": none, "new",
    # "kept", "moved"), and for a moved one the target it left.
    affinity: str = ""
    pin_moved_from: str = ""
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


def _fmt_estimate(c: Candidate) -> str:
    if c.estimate_us < 0.0:
        return "unmeasured"
    # No age here: the reason travels in a header and must read the same from every replica
    # at once (explain shows the age).
    estimate = c.estimate_us / 1000.0
    return f"estimate {estimate:.1f}ms (errors {c.error_rate:.0%}, {c.inflight} in flight)"


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
    if strategy.kind == "priority":
        group = [c for c in ordered if c.target.priority == best.target.priority]
        inner = explain_choice(strategy.inner, group[:1], rr_cursor, len(group))
        head = f"priority group {best.target.priority}, {inner}"
        if len(ordered) > 1:
            runner = ordered[1]
            head += f"; next {runner.target.id} (group {runner.target.priority})"
        return head
    if best.probe:
        head = f"half-open probe of {name} (breaker recovering)"
    elif best.explore:
        state = "never measured" if best.estimate_us < 0.0 else f"{_fmt_estimate(best)} stale"
        head = f"{strategy.kind}: exploring {name} ({state})"
    elif strategy.kind == "cost":
        head = f"cost: {name} at {best.target.price_per_mtok:g} $/Mtok"
    elif strategy.kind == "latency":
        head = f"latency: {name} {_fmt_estimate(best)}"
    elif strategy.kind == "hybrid":
        head = (
            f"hybrid: {name} score {best.score:.3f} (cost {best.target.price_per_mtok:g} $/Mtok,"
            f" latency {_fmt_latency(best)}, success {best.success_rate:.0%};"
            f" weights {strategy.weights_text})"
        )
    elif strategy.kind == "round_robin":
        healthy = len(ordered) if admissible is None else admissible
        head = f"round_robin: cursor {rr_cursor} -> {name} of {healthy} healthy"
    elif strategy.kind == "weighted":
        head = f"weighted: {name} (weight {best.target.weight}, credit {best.credit})"
    else:
        head = f"least_busy: {name} with {best.inflight} in flight"
    if best.held:
        head += " (suspect: recent failures, its failure budget is in flight; nothing else left)"
    if len(ordered) > 1:
        runner = ordered[1]
        head += f"; next {runner.target.id} ({runner.score:.3f})"
    return head
