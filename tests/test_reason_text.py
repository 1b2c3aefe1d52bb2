# ruff: noqa: E501 (each expected text whole on one line, as the header carries it)
"""The `x-edgeroute-reason` text, word for word, for every strategy and decision shape.

The header is a contract (clients and dashboards read it, explain repeats it), and the text
is built per reply, so it gets optimised: these cases pin what it says, numbers and
rounding included, so a cheaper way of building it cannot say anything else.
"""

from __future__ import annotations

import pytest

from edgeroute.strategy import Candidate, RoutingDecision, RoutingStrategy, explain_choice
from edgeroute.types import CircuitState, TargetSpec

A = TargetSpec("up-a/gpt-4o-mini", "up-a", "gpt-4o-mini", price_per_mtok=0.75, weight=70)
B = TargetSpec("up-b/gpt-4o", "up-b", "gpt-4o", price_per_mtok=12.5, priority=1, weight=30)
C = TargetSpec("up-c/free", "up-c", "free", price_per_mtok=0.0, priority=1)


def measured(target: TargetSpec, index: int, score: float, estimate_us: float) -> Candidate:
    return Candidate(
        target,
        index,
        successes=120,
        latency_sum_us=120 * 900,
        failures=3,
        inflight=4,
        score=score,
        estimate_us=estimate_us,
        error_rate=0.0249,
        credit=55,
    )


def two() -> list[Candidate]:
    return [measured(A, 0, 0.81249, 912.35), measured(B, 1, 0.3455, 1949.96)]


def unmeasured(target: TargetSpec, *, explore: bool = False) -> Candidate:
    return Candidate(target, 0, score=0.0, explore=explore)


def probe() -> list[Candidate]:
    first = measured(A, 0, 1.0, 500.0)
    first.probe, first.state = True, CircuitState.HALF_OPEN
    return [first, measured(B, 1, 0.5, 700.0)]


def explore(estimate_us: float) -> list[Candidate]:
    first = measured(A, 0, 0.2, estimate_us)
    first.explore = True
    return [first, measured(B, 1, 0.9, 800.0)]


def held() -> list[Candidate]:
    first = measured(A, 0, 0.0, 3000.0)
    first.held = True
    return [first]


HYBRID = RoutingStrategy.hybrid(cost_weight=1, latency_weight=1, reliability_weight=1)

CASES: dict[str, tuple[RoutingStrategy, list[Candidate], int, int | None]] = {
    "none": (RoutingStrategy.cost_based(), [], 0, None),
    "cost": (RoutingStrategy.cost_based(), two(), 0, None),
    "cost alone": (RoutingStrategy.cost_based(), two()[:1], 0, None),
    "cost free": (RoutingStrategy.cost_based(), [measured(C, 0, 1.0, 10.0)], 0, None),
    "latency": (RoutingStrategy.latency_based(), two(), 0, None),
    "latency unmeasured": (RoutingStrategy.latency_based(), [unmeasured(A)], 0, None),
    "hybrid default": (RoutingStrategy.default_hybrid(), two(), 0, None),
    "hybrid thirds": (HYBRID, two(), 0, None),
    "hybrid window mean": (
        RoutingStrategy.default_hybrid(),
        [Candidate(A, 0, successes=3, latency_sum_us=3500, score=0.5)],
        0,
        None,
    ),
    "hybrid unexplored": (RoutingStrategy.default_hybrid(), [unmeasured(A)], 0, None),
    "round_robin": (RoutingStrategy.round_robin(), two(), 7, None),
    "round_robin admissible": (RoutingStrategy.round_robin(), two(), 7, 5),
    "least_busy": (RoutingStrategy.least_busy(), two(), 0, None),
    "weighted": (RoutingStrategy.weighted(), two(), 0, None),
    "probe": (RoutingStrategy.latency_based(), probe(), 0, None),
    "explore never measured": (
        RoutingStrategy.latency_based(),
        [unmeasured(A, explore=True), measured(B, 1, 0.9, 800.0)],
        0,
        None,
    ),
    "explore stale": (RoutingStrategy.default_hybrid(), explore(1234.56), 0, None),
    "held": (RoutingStrategy.cost_based(), held(), 0, None),
    "priority": (RoutingStrategy.priority("latency"), two(), 0, None),
    "priority same group": (
        RoutingStrategy.priority("round_robin"),
        [measured(B, 0, 1.0, 10.0), measured(C, 1, 0.5, 20.0)],
        3,
        None,
    ),
    "priority hybrid": (RoutingStrategy.priority("hybrid"), two()[:1], 0, None),
}

EXPECTED = {
    "none": "no admissible target",
    "cost": "cost: up-a/gpt-4o-mini at 0.75 $/Mtok; next up-b/gpt-4o (0.345)",
    "cost alone": "cost: up-a/gpt-4o-mini at 0.75 $/Mtok",
    "cost free": "cost: up-c/free at 0 $/Mtok",
    "latency": "latency: up-a/gpt-4o-mini estimate 0.9ms (errors 2%, 4 in flight); next up-b/gpt-4o (0.345)",
    "latency unmeasured": "latency: up-a/gpt-4o-mini unmeasured",
    "hybrid default": "hybrid: up-a/gpt-4o-mini score 0.812 (cost 0.75 $/Mtok, latency 0.9ms, success 98%; weights 0.40/0.40/0.20); next up-b/gpt-4o (0.345)",
    "hybrid thirds": "hybrid: up-a/gpt-4o-mini score 0.812 (cost 0.75 $/Mtok, latency 0.9ms, success 98%; weights 0.33/0.33/0.33); next up-b/gpt-4o (0.345)",
    "hybrid window mean": "hybrid: up-a/gpt-4o-mini score 0.500 (cost 0.75 $/Mtok, latency 1.2ms, success 100%; weights 0.40/0.40/0.20)",
    "hybrid unexplored": "hybrid: up-a/gpt-4o-mini score 0.000 (cost 0.75 $/Mtok, latency unexplored, success 100%; weights 0.40/0.40/0.20)",
    "round_robin": "round_robin: cursor 7 -> up-a/gpt-4o-mini of 2 healthy; next up-b/gpt-4o (0.345)",
    "round_robin admissible": "round_robin: cursor 7 -> up-a/gpt-4o-mini of 5 healthy; next up-b/gpt-4o (0.345)",
    "least_busy": "least_busy: up-a/gpt-4o-mini with 4 in flight; next up-b/gpt-4o (0.345)",
    "weighted": "weighted: up-a/gpt-4o-mini (weight 70, credit 55); next up-b/gpt-4o (0.345)",
    "probe": "half-open probe of up-a/gpt-4o-mini (breaker recovering); next up-b/gpt-4o (0.500)",
    "explore never measured": "latency: exploring up-a/gpt-4o-mini (never measured); next up-b/gpt-4o (0.900)",
    "explore stale": "hybrid: exploring up-a/gpt-4o-mini (estimate 1.2ms (errors 2%, 4 in flight) stale); next up-b/gpt-4o (0.900)",
    "held": "cost: up-a/gpt-4o-mini at 0.75 $/Mtok (suspect: recent failures, its failure budget is in flight; nothing else left)",
    "priority": "priority group 0, latency: up-a/gpt-4o-mini estimate 0.9ms (errors 2%, 4 in flight); next up-b/gpt-4o (group 1)",
    "priority same group": "priority group 1, round_robin: cursor 3 -> up-b/gpt-4o of 2 healthy; next up-c/free (group 1)",
    "priority hybrid": "priority group 0, hybrid: up-a/gpt-4o-mini score 0.812 (cost 0.75 $/Mtok, latency 0.9ms, success 98%; weights 0.40/0.40/0.20)",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_reason_text_word_for_word(name: str) -> None:
    strategy, candidates, cursor, admissible = CASES[name]
    assert explain_choice(strategy, candidates, cursor, admissible) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(CASES))
def test_decision_reason_is_the_same_text(name: str) -> None:
    strategy, candidates, cursor, admissible = CASES[name]
    if not candidates:
        return
    decision = RoutingDecision(
        "chat", strategy, candidates, rr_cursor=cursor, admissible=admissible or -1
    )
    assert decision.reason == EXPECTED[name]
