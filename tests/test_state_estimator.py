"""The time-decayed estimate, the exploration budget, load and tolerance, on every backend.

Every row of the backend table (tests/support/backends.py) runs on one virtual clock
(MemoryState's `clock`, RedisState's: the scripts' `clock_ms`), so decay, estimate age and
reservation expiry are exact and these tests assert numbers, never timings.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from edgeroute import RoutingStrategy
from edgeroute.state import StateBackend
from edgeroute.state.base import RouteSpec
from edgeroute.strategy import RoutingDecision
from edgeroute.types import (
    Admission,
    BreakerParams,
    EstimatorParams,
    Outcome,
    OutcomeKind,
    TargetSnapshot,
    TargetSpec,
)
from tests.support.backends import VirtualClock, open_backend, table


class Clocked:
    def __init__(self, state: StateBackend, clock: VirtualClock) -> None:
        self.state = state
        self.clock = clock

    def wait(self, ms: float) -> None:
        self.clock.advance(ms)


@pytest.fixture(params=table())
async def clocked(request: pytest.FixtureRequest) -> AsyncIterator[Clocked]:
    clock = VirtualClock()
    backend = open_backend(request.param, request, clock=clock)
    yield Clocked(backend.state, clock)
    await backend.state.close()


def make_route(
    strategy: RoutingStrategy | None = None,
    *,
    targets: int = 3,
    prices: tuple[float, ...] | None = None,
    **estimator: float,
) -> RouteSpec:
    prices = prices or tuple(1.0 for _ in range(targets))
    return RouteSpec(
        name=f"route-{uuid.uuid4().hex[:8]}",
        strategy=strategy or RoutingStrategy.latency_based(),
        targets=tuple(
            TargetSpec(id=f"t{i}", provider=f"p{i}", model=f"m{i}", price_per_mtok=price)
            for i, price in enumerate(prices)
        ),
        breaker=BreakerParams(failure_threshold=3, open_timeout_ms=300),
        estimator=EstimatorParams(**estimator),  # type: ignore[arg-type]
    )


async def sample(
    h: Clocked,
    route: RouteSpec,
    target_id: str,
    *latencies: float,
    kind: OutcomeKind = OutcomeKind.SUCCESS,
) -> None:
    for latency in latencies:
        await h.state.record(route, Outcome(target_id=target_id, kind=kind, latency_ms=latency))


async def admit(
    h: Clocked, route: RouteSpec, **kwargs: object
) -> tuple[RoutingDecision, Admission]:
    decision = await h.state.decide(route, **kwargs)  # type: ignore[arg-type]
    assert decision.admission is not None, f"nothing admitted: {decision}"
    return decision, decision.admission


async def row(h: Clocked, route: RouteSpec, target_id: str) -> TargetSnapshot:
    snapshot = await h.state.snapshot(route)
    return next(t for t in snapshot.targets if t.target_id == target_id)


async def test_the_estimate_is_a_time_decayed_mean(clocked: Clocked) -> None:
    route = make_route(half_life_ms=1_000, explore_after_ms=2_000)
    await sample(clocked, route, "t0", 100)
    clocked.wait(1_000)  # one half-life: the first sample now weighs half as much
    await sample(clocked, route, "t0", 300)
    await sample(clocked, route, "t0", 0, kind=OutcomeKind.FAILURE)
    t0 = await row(clocked, route, "t0")
    assert t0.estimate_us == (100_000 * 0.5 + 300_000) / (0.5 + 1.0)
    assert t0.error_rate == 1.0 / (1.5 + 1.0)
    assert t0.estimate_age_ms == 0 and not t0.stale
    clocked.wait(2_500)
    t0 = await row(clocked, route, "t0")
    # Unused, the estimate holds (both sums decay alike); it only grows old.
    assert t0.estimate_us == (100_000 * 0.5 + 300_000) / (0.5 + 1.0)
    assert t0.estimate_age_ms == 2_500 and t0.stale
    assert (await row(clocked, route, "t1")).estimate_us is None


async def test_a_change_is_followed_within_a_few_half_lives(clocked: Clocked) -> None:
    route = make_route(half_life_ms=1_000)
    for _ in range(60):  # a minute of good history at 1 req/s
        await sample(clocked, route, "t0", 40)
        clocked.wait(1_000)
    for _ in range(20):  # then two seconds at 10 req/s of 400 ms
        await sample(clocked, route, "t0", 400)
        clocked.wait(100)
    t0 = await row(clocked, route, "t0")
    assert t0.estimate_us is not None and t0.estimate_us > 300_000


async def test_an_unknown_target_is_explored_once_not_in_a_burst(clocked: Clocked) -> None:
    route = make_route(explore_every=1)
    await sample(clocked, route, "t0", 100, 300)
    await sample(clocked, route, "t1", 50)
    decision, admission = await admit(clocked, route)
    assert admission.target_id == "t2" and decision.chosen.explore
    assert "exploring t2 (never measured)" in decision.reason
    t2 = await row(clocked, route, "t2")
    assert t2.explorations_in_use == 1 and t2.inflight == 1
    # Its one exploration slot is taken: the next requests go to the best measured one.
    for _ in range(5):
        decision, _ = await admit(clocked, route)
        assert decision.target_id == "t1" and not decision.chosen.explore
        assert [c.target.id for c in decision.candidates] == ["t1", "t0", "t2"]
    await clocked.state.record(route, Outcome.for_admission(admission, OutcomeKind.SUCCESS, 30))
    decision, _ = await admit(clocked, route)
    assert decision.target_id == "t2" and decision.chosen.estimate_us == 30_000


async def test_the_share_rule_spaces_explorations_fleet_wide(clocked: Clocked) -> None:
    route = make_route(targets=4, explore_every=5)
    await sample(clocked, route, "t0", 50)
    chosen = [(await admit(clocked, route))[1].target_id for _ in range(12)]
    # t1..t3 were never measured: one of them per 5 decides, none in between.
    assert chosen == ["t1", "t0", "t0", "t0", "t0", "t2", "t0", "t0", "t0", "t0", "t3", "t0"]


async def test_a_stale_estimate_is_re_measured_and_the_measurement_replaces_it(
    clocked: Clocked,
) -> None:
    route = make_route(targets=2, explore_after_ms=2_000, explore_every=2)
    await sample(clocked, route, "t0", 400, 400, 400)  # degraded once
    clocked.wait(1_000)
    await sample(clocked, route, "t1", 90)
    _, admission = await admit(clocked, route)
    assert admission.target_id == "t1"
    await clocked.state.record(route, Outcome.for_admission(admission, OutcomeKind.SUCCESS, 90))
    clocked.wait(1_001)  # t0's estimate is now older than explore_after, t1's is not
    assert (await row(clocked, route, "t0")).stale
    assert not (await row(clocked, route, "t1")).stale
    decision, admission = await admit(clocked, route)
    assert admission.target_id == "t0" and decision.chosen.explore
    await clocked.state.record(route, Outcome.for_admission(admission, OutcomeKind.SUCCESS, 40))
    t0 = await row(clocked, route, "t0")
    assert t0.estimate_us == 40_000 and not t0.stale  # recovered: back at once
    decision, _ = await admit(clocked, route)
    assert decision.target_id == "t0"


async def test_a_failover_decide_never_explores(clocked: Clocked) -> None:
    route = make_route(explore_every=1)
    await sample(clocked, route, "t0", 100)
    await sample(clocked, route, "t1", 50)
    decision, _ = await admit(clocked, route, advance=False, exclude=["t1"])
    assert decision.target_id == "t0" and not decision.chosen.explore


async def test_an_exploration_reservation_expires_by_itself(clocked: Clocked) -> None:
    route = make_route(targets=2, explore_every=1, explore_ttl_ms=500)
    await sample(clocked, route, "t0", 50)
    _, admission = await admit(clocked, route)
    assert admission.target_id == "t1"  # never measured: explored, and never reported back
    _, again = await admit(clocked, route)
    assert again.target_id == "t0"
    clocked.wait(501)
    assert (await row(clocked, route, "t1")).explorations_in_use == 0
    _, admission = await admit(clocked, route)
    assert admission.target_id == "t1"


async def test_in_flight_requests_count_against_the_latency(clocked: Clocked) -> None:
    route = make_route(targets=2, load_penalty=0.5, tolerance=0.0)
    await sample(clocked, route, "t0", 40)
    await sample(clocked, route, "t1", 90)
    # 40 x (1 + 0.5 k) stays below 90 up to k = 2 in flight; the third goes to t1.
    chosen = [(await admit(clocked, route))[1].target_id for _ in range(4)]
    assert chosen == ["t0", "t0", "t0", "t1"]
    decision = (await clocked.state.explain(route)).decision
    # Three in flight on t0 (40 x 2.5 = 100), one on t1 (90 x 1.5 = 135).
    assert [c.target.id for c in decision.candidates] == ["t0", "t1"]
    assert decision.candidates[1].score == pytest.approx(100 / 135)


async def test_near_equal_targets_take_turns(clocked: Clocked) -> None:
    route = make_route(load_penalty=0.0, tolerance=0.1)
    await sample(clocked, route, "t0", 60.0)
    await sample(clocked, route, "t1", 60.1)
    await sample(clocked, route, "t2", 66.5)  # more than 10 % slower than t0: not shared
    chosen = [(await admit(clocked, route))[1].target_id for _ in range(6)]
    assert sorted(chosen) == ["t0", "t0", "t0", "t1", "t1", "t1"]
    route = make_route(targets=2, load_penalty=0.0, tolerance=0.0)
    await sample(clocked, route, "t0", 60.0)
    await sample(clocked, route, "t1", 60.1)
    chosen = [(await admit(clocked, route))[1].target_id for _ in range(4)]
    assert chosen == ["t0"] * 4  # no tolerance: winner takes all


async def test_recent_errors_penalise_latency(clocked: Clocked) -> None:
    route = make_route(targets=2, tolerance=0.0)
    await sample(clocked, route, "t0", 50, 50)
    await sample(clocked, route, "t0", 0, kind=OutcomeKind.FAILURE)  # fails one in three
    await sample(clocked, route, "t1", 70)
    decision, _ = await admit(clocked, route)
    # t0 expects 50 / (1 - 1/3) = 75 ms including the retry; t1 70 ms.
    assert decision.target_id == "t1"
    assert decision.candidates[1].error_rate == pytest.approx(1 / 3)
    assert decision.candidates[1].score == pytest.approx(70 / 75)


async def test_hybrid_follows_the_seed_formula_on_the_estimates(clocked: Clocked) -> None:
    route = make_route(
        RoutingStrategy.default_hybrid(), targets=2, prices=(1.0, 4.0), tolerance=0.0
    )
    await sample(clocked, route, "t0", 400, 400, 400)
    await sample(clocked, route, "t0", 0, kind=OutcomeKind.FAILURE)
    await sample(clocked, route, "t1", 100)
    decision, _ = await admit(clocked, route)
    scores = {c.target.id: c.score for c in decision.candidates}
    expected_t0 = 0.4 * (1 - 1 / 4) + 0.4 * (1 - 400 / 400) + 0.2 * (3 / 4)
    expected_t1 = 0.4 * (1 - 4 / 4) + 0.4 * (1 - 100 / 400) + 0.2 * 1.0
    assert scores["t0"] == pytest.approx(expected_t0)
    assert scores["t1"] == pytest.approx(expected_t1)
    assert decision.target_id == ("t0" if expected_t0 > expected_t1 else "t1")
    assert "weights 0.40/0.40/0.20" in decision.reason


async def test_hybrid_does_not_rank_an_unmeasured_target_first(clocked: Clocked) -> None:
    route = make_route(RoutingStrategy.default_hybrid(), prices=(2.0, 2.0, 1.0), explore_every=50)
    await sample(clocked, route, "t0", 100)
    await sample(clocked, route, "t1", 100)
    clocked_first = await admit(clocked, route)
    assert clocked_first[1].target_id == "t2" and clocked_first[0].chosen.explore
    # The budget is spent for 50 decides: t2 (cheapest, never measured) now ranks last.
    decision, _ = await admit(clocked, route)
    assert decision.candidates[-1].target.id == "t2"


async def test_explain_shows_estimate_age_in_flight_and_exploration(clocked: Clocked) -> None:
    route = make_route(targets=2, explore_every=1)
    await sample(clocked, route, "t0", 50)
    clocked.wait(1_000)
    view = await clocked.state.explain(route)
    assert view.decision.chosen.target.id == "t1" and view.decision.chosen.explore
    t0, t1 = view.snapshot.targets
    assert (t0.estimate_us, t0.estimate_age_ms, t0.stale) == (50_000, 1_000, False)
    assert (t1.estimate_us, t1.estimate_age_ms, t1.stale) == (None, None, True)
    _, admission = await admit(clocked, route)
    assert admission.target_id == "t1"
    t1 = await row(clocked, route, "t1")
    assert (t1.inflight, t1.explorations_in_use) == (1, 1)
    view = await clocked.state.explain(route)
    assert not view.decision.chosen.explore  # explain changed nothing, t1's slot is taken


async def test_a_request_out_longer_than_the_estimate_counts_before_it_answers(
    clocked: Clocked,
) -> None:
    route = make_route(targets=2, load_penalty=0.0, tolerance=0.0)
    await sample(clocked, route, "t0", 40)
    await sample(clocked, route, "t1", 90)
    _, first = await admit(clocked, route)
    assert first.target_id == "t0"
    clocked.wait(60)  # t0 has not answered for 60 ms: it is at least that slow now
    decision, _ = await admit(clocked, route)
    assert decision.target_id == "t0" and decision.chosen.waiting_ms == 60
    clocked.wait(40)  # 100 ms > t1's 90 ms: the next request goes to t1
    decision, _ = await admit(clocked, route)
    assert decision.target_id == "t1"
    assert (await row(clocked, route, "t0")).waiting_ms == 100
    # Capped at 4 x the estimate: a lease nobody reports back can't make it look slower.
    clocked.wait(10_000)
    view = await clocked.state.explain(route)
    scores = {c.target.id: c.score for c in view.decision.candidates}
    # Both wait 10 s now: t0 counts as 4 x 40 = 160 ms, t1 as 4 x 90 = 360 ms.
    assert scores == {"t0": 1.0, "t1": pytest.approx(160 / 360)}
    # An answer resets the wait: whatever is still out was sent before it.
    await clocked.state.record(route, Outcome.for_admission(first, OutcomeKind.SUCCESS, 40))
    assert (await row(clocked, route, "t0")).waiting_ms == 0
