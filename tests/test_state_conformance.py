"""One conformance suite, run unchanged over every row of the backend table
(tests/support/backends.py): MemoryState, fakeredis, real Redis, a Redis Cluster, Sentinel
and the degraded-mode wrapper.

Every backend reads one virtual clock (Redis-backed ones through the scripts' `clock_ms`),
so `wait` steps time instead of sleeping, and boundaries are exact.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from edgeroute import CircuitBreaker, CircuitBreakerOpen, CircuitState, RoutingStrategy
from edgeroute.state import StateBackend
from edgeroute.state.base import RouteSpec
from edgeroute.strategy import RoutingDecision
from edgeroute.types import (
    Admission,
    BreakerParams,
    Outcome,
    OutcomeKind,
    TargetSpec,
    WindowParams,
)
from tests.support.backends import VirtualClock, open_backend, table


@dataclass
class Harness:
    state: StateBackend
    clock: VirtualClock
    kind: str

    async def wait(self, ms: float) -> None:
        self.clock.advance(ms)

    async def align(self, bucket_ms: int, offset_ms: int = 10) -> None:
        """Move to `offset_ms` past the next bucket boundary."""
        now_ms = self.clock.now * 1000
        boundary = (now_ms // bucket_ms + 1) * bucket_ms
        await self.wait(boundary + offset_ms - now_ms)


@pytest.fixture(params=table())
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    clock = VirtualClock()
    backend = open_backend(request.param, request, clock=clock)
    yield Harness(backend.state, clock, backend.kind)
    await backend.state.close()


def make_route(
    strategy: RoutingStrategy | None = None,
    *,
    prices: tuple[float, ...] = (1.0, 2.0, 3.0),
    breaker: BreakerParams | None = None,
    window: WindowParams | None = None,
    lease_ttl_ms: int = 600_000,
) -> RouteSpec:
    return RouteSpec(
        name=f"route-{uuid.uuid4().hex[:8]}",
        strategy=strategy or RoutingStrategy.cost_based(),
        targets=tuple(
            TargetSpec(id=f"t{i}", provider=f"p{i}", model=f"m{i}", price_per_mtok=price)
            for i, price in enumerate(prices)
        ),
        breaker=breaker or BreakerParams(failure_threshold=3, open_timeout_ms=300),
        window=window or WindowParams(bucket_ms=5_000, buckets=12),
        lease_ttl_ms=lease_ttl_ms,
    )


async def admit(
    h: Harness, route: RouteSpec, **kwargs: object
) -> tuple[RoutingDecision, Admission]:
    decision = await h.state.decide(route, **kwargs)  # type: ignore[arg-type]
    assert decision.admission is not None, f"nothing admitted: {decision}"
    return decision, decision.admission


async def fail(h: Harness, route: RouteSpec, target: str, times: int = 1) -> None:
    for _ in range(times):
        await h.state.record(route, Outcome(target_id=target, kind=OutcomeKind.FAILURE))


async def states(h: Harness, route: RouteSpec) -> dict[str, CircuitState]:
    snapshot = await h.state.snapshot(route)
    return {t.target_id: t.state for t in snapshot.targets}


async def target(h: Harness, route: RouteSpec, target_id: str):  # type: ignore[no-untyped-def]
    snapshot = await h.state.snapshot(route)
    return next(t for t in snapshot.targets if t.target_id == target_id)


# ---- breaker transitions ---------------------------------------------------------------


async def test_exactly_failure_threshold_consecutive_failures_open(harness: Harness) -> None:
    route = make_route()
    await fail(harness, route, "t0", 2)
    assert (await states(harness, route))["t0"] is CircuitState.CLOSED
    assert (await target(harness, route, "t0")).consecutive_failures == 2
    await fail(harness, route, "t0")
    assert (await states(harness, route))["t0"] is CircuitState.OPEN


async def test_a_success_resets_the_consecutive_failure_count(harness: Harness) -> None:
    route = make_route()
    await fail(harness, route, "t0", 2)
    await harness.state.record(
        route, Outcome(target_id="t0", kind=OutcomeKind.SUCCESS, latency_ms=5)
    )
    await fail(harness, route, "t0", 2)
    assert (await states(harness, route))["t0"] is CircuitState.CLOSED


async def test_open_target_is_skipped_and_all_open_gives_retry_after(harness: Harness) -> None:
    route = make_route(breaker=BreakerParams(failure_threshold=1, open_timeout_ms=5_000))
    await fail(harness, route, "t0")
    decision, admission = await admit(harness, route)
    assert admission.target_id == "t1"
    assert [c.target.id for c in decision.candidates] == ["t1", "t2"]
    await fail(harness, route, "t1")
    await fail(harness, route, "t2")
    empty = await harness.state.decide(route)
    assert empty.admission is None and empty.candidates == []
    assert 4.0 < empty.retry_after_s <= 5.0


async def test_half_open_after_timeout_grants_limited_probes(harness: Harness) -> None:
    route = make_route(
        breaker=BreakerParams(
            failure_threshold=1, open_timeout_ms=200, success_threshold=2, half_open_max_probes=2
        )
    )
    await fail(harness, route, "t2")  # the most expensive: only a probe puts it first
    await harness.wait(260)
    assert (await states(harness, route))["t2"] is CircuitState.HALF_OPEN
    first, a1 = await admit(harness, route)
    _second, a2 = await admit(harness, route)
    third, a3 = await admit(harness, route)
    assert (a1.target_id, a1.probe) == ("t2", True)
    assert (a2.target_id, a2.probe) == ("t2", True)
    assert (a3.target_id, a3.probe) == ("t0", False)  # probe slots exhausted
    assert "probe" in first.reason
    assert [c.target.id for c in third.candidates] == ["t0", "t1"]
    assert (await target(harness, route, "t2")).probes_in_use == 2


async def test_success_threshold_successes_close_half_open(harness: Harness) -> None:
    route = make_route(
        breaker=BreakerParams(failure_threshold=1, open_timeout_ms=200, success_threshold=2)
    )
    await fail(harness, route, "t0")
    await harness.wait(260)
    for expected in (CircuitState.HALF_OPEN, CircuitState.CLOSED):
        _, probe = await admit(harness, route)
        assert probe.probe and probe.target_id == "t0"
        await harness.state.record(route, Outcome.for_admission(probe, OutcomeKind.SUCCESS, 12.0))
        assert (await states(harness, route))["t0"] is expected
    snap = await target(harness, route, "t0")
    assert snap.probes_in_use == 0 and snap.inflight == 0


async def test_failure_while_half_open_reopens_with_doubled_capped_timeout(
    harness: Harness,
) -> None:
    route = make_route(
        breaker=BreakerParams(failure_threshold=1, open_timeout_ms=200, max_open_timeout_ms=300)
    )
    await fail(harness, route, "t0")
    assert (await target(harness, route, "t0")).open_timeout_ms == 200
    await harness.wait(260)
    _, probe = await admit(harness, route)
    await harness.state.record(route, Outcome.for_admission(probe, OutcomeKind.FAILURE))
    reopened = await target(harness, route, "t0")
    assert reopened.state is CircuitState.OPEN
    assert reopened.open_timeout_ms == 300  # 400 capped at max_open_timeout
    await harness.wait(260)
    assert (await states(harness, route))["t0"] is CircuitState.OPEN  # 260 < 300
    await harness.wait(100)
    assert (await states(harness, route))["t0"] is CircuitState.HALF_OPEN


async def test_late_outcomes_from_an_older_generation_are_ignored(harness: Harness) -> None:
    route = make_route(breaker=BreakerParams(failure_threshold=2, open_timeout_ms=200))
    _, early = await admit(harness, route)  # admitted while t0 is closed
    await fail(harness, route, "t0", 2)
    opened = await target(harness, route, "t0")
    assert opened.state is CircuitState.OPEN
    await harness.wait(260)
    _, probe = await admit(harness, route)
    assert probe.probe
    # The closed-era attempt fails late: it must not reopen the half-open breaker.
    await harness.state.record(route, Outcome.for_admission(early, OutcomeKind.FAILURE))
    late = await target(harness, route, "t0")
    assert late.state is CircuitState.HALF_OPEN
    assert late.generation == opened.generation + 1
    assert late.inflight == 1  # the late outcome still gave its lease back


async def test_expired_probe_reservation_frees_the_slot(harness: Harness) -> None:
    route = make_route(
        breaker=BreakerParams(failure_threshold=1, open_timeout_ms=200, probe_ttl_ms=200),
        prices=(1.0,),
    )
    await fail(harness, route, "t0")
    await harness.wait(260)
    _, probe = await admit(harness, route)
    assert probe.probe
    assert (await harness.state.decide(route)).admission is None  # the only slot is taken
    await harness.wait(260)  # the replica holding it "crashed"
    _, again = await admit(harness, route)
    assert again.probe and again.token != probe.token


async def test_reset_closes_breaker_and_lifts_cooldown(harness: Harness) -> None:
    route = make_route(breaker=BreakerParams(failure_threshold=1, open_timeout_ms=60_000))
    await fail(harness, route, "t0")
    await harness.state.record(
        route, Outcome(target_id="t1", kind=OutcomeKind.RATE_LIMITED, retry_after_s=60)
    )
    _, admission = await admit(harness, route)
    assert admission.target_id == "t2"
    await harness.state.reset(route, "t0")
    await harness.state.reset(route, "t1")
    snapshot = await harness.state.snapshot(route)
    assert [t.state for t in snapshot.targets] == [CircuitState.CLOSED] * 3
    assert snapshot.targets[1].cooldown_remaining_ms == 0
    _, admission = await admit(harness, route)
    assert admission.target_id == "t0"


async def test_suspect_target_gets_no_more_than_its_failure_budget_in_flight(
    harness: Harness,
) -> None:
    route = make_route(breaker=BreakerParams(failure_threshold=3, open_timeout_ms=60_000))
    await fail(harness, route, "t0")  # one failure in a row: budget 3 - 1 = 2 in flight
    first = [(await admit(harness, route))[1] for _ in range(3)]
    assert [a.target_id for a in first] == ["t0", "t0", "t1"]
    decision, _ = await admit(harness, route)
    assert decision.candidates[-1].target.id == "t0" and decision.candidates[-1].held
    # Both in-flight requests fail: the breaker opens with exactly 3 failures sent to t0.
    for admission in first[:2]:
        await harness.state.record(route, Outcome.for_admission(admission, OutcomeKind.FAILURE))
    assert (await states(harness, route))["t0"] is CircuitState.OPEN


async def test_a_success_lifts_the_suspicion(harness: Harness) -> None:
    route = make_route(breaker=BreakerParams(failure_threshold=2, open_timeout_ms=60_000))
    await fail(harness, route, "t0")
    _, a1 = await admit(harness, route)
    _, a2 = await admit(harness, route)
    assert (a1.target_id, a2.target_id) == ("t0", "t1")  # 1 failure + 1 in flight = budget
    await harness.state.record(route, Outcome.for_admission(a1, OutcomeKind.SUCCESS, 5.0))
    _, a3 = await admit(harness, route)
    _, a4 = await admit(harness, route)
    assert (a3.target_id, a4.target_id) == ("t0", "t0")  # healthy again: no budget


async def test_a_held_target_is_still_used_when_nothing_else_is_left(harness: Harness) -> None:
    route = make_route(
        breaker=BreakerParams(failure_threshold=2, open_timeout_ms=60_000), prices=(1.0,)
    )
    await fail(harness, route, "t0")
    _, a1 = await admit(harness, route)
    decision, a2 = await admit(harness, route)
    assert a1.target_id == a2.target_id == "t0"  # a single-target route never refuses for it
    assert decision.candidates[0].held and "suspect" in decision.reason


async def test_limit_returns_the_best_candidates_only(harness: Harness) -> None:
    route = make_route(RoutingStrategy.default_hybrid(), prices=(3.0, 1.0, 2.0, 4.0))
    full, _ = await admit(harness, route, advance=False)
    top, admission = await admit(harness, route, advance=False, limit=2)
    assert [c.target.id for c in top.candidates] == [c.target.id for c in full.candidates][:2]
    assert admission.target_id == top.candidates[0].target.id
    assert "next " in top.reason  # the runner-up is there for the reason
    one, _ = await admit(harness, route, advance=False, limit=1)
    assert len(one.candidates) == 1 and one.admissible == len(full.candidates) == 4


# ---- rate limits, exclusion, failover --------------------------------------------------


async def test_retry_after_keeps_target_out_and_is_never_shortened(harness: Harness) -> None:
    route = make_route()
    await harness.state.record(
        route, Outcome(target_id="t0", kind=OutcomeKind.RATE_LIMITED, retry_after_s=0.4)
    )
    await harness.state.record(
        route, Outcome(target_id="t0", kind=OutcomeKind.RATE_LIMITED, retry_after_s=0.05)
    )
    snap = await target(harness, route, "t0")
    assert snap.state is CircuitState.CLOSED and snap.consecutive_failures == 0
    assert snap.cooldown_remaining_ms > 300
    _, admission = await admit(harness, route)
    assert admission.target_id == "t1"
    await harness.wait(150)
    _, admission = await admit(harness, route)
    assert admission.target_id == "t1"  # the shorter Retry-After did not shorten it
    await harness.wait(300)
    _, admission = await admit(harness, route)
    assert admission.target_id == "t0"


async def test_failover_decide_records_and_excludes_in_one_call(harness: Harness) -> None:
    route = make_route(breaker=BreakerParams(failure_threshold=1, open_timeout_ms=60_000))
    _, first = await admit(harness, route)
    assert first.target_id == "t0"
    failure = Outcome.for_admission(first, OutcomeKind.FAILURE, 3.0)
    decision, second = await admit(harness, route, exclude=["t0"], outcome=failure)
    assert second.target_id == "t1"
    assert [c.target.id for c in decision.candidates] == ["t1", "t2"]
    snap = await target(harness, route, "t0")
    assert snap.state is CircuitState.OPEN and snap.inflight == 0


async def test_neutral_outcome_only_releases_the_lease(harness: Harness) -> None:
    route = make_route(breaker=BreakerParams(failure_threshold=1, open_timeout_ms=60_000))
    _, admission = await admit(harness, route)
    await harness.state.record(route, Outcome.for_admission(admission, OutcomeKind.NEUTRAL))
    snap = await target(harness, route, "t0")
    assert snap.state is CircuitState.CLOSED
    assert (snap.inflight, snap.successes, snap.failures) == (0, 0, 0)


# ---- strategies ------------------------------------------------------------------------


async def test_cost_orders_by_price_with_normalised_scores(harness: Harness) -> None:
    route = make_route(prices=(3.0, 1.0, 2.0))
    decision, admission = await admit(harness, route)
    assert admission.target_id == "t1"
    assert [(c.target.id, round(c.score, 9)) for c in decision.candidates] == [
        ("t1", round(1 - 1 / 3, 9)),
        ("t2", round(1 - 2 / 3, 9)),
        ("t0", 0.0),
    ]
    assert "t1 at 1 $/Mtok" in decision.reason


async def record_latency(h: Harness, route: RouteSpec, target_id: str, *latencies: float) -> None:
    for latency in latencies:
        await h.state.record(
            route, Outcome(target_id=target_id, kind=OutcomeKind.SUCCESS, latency_ms=latency)
        )


# Latency and hybrid scoring (time-decayed estimates, exploration, load, tolerance) are
# tested on every backend with an injected clock in test_state_estimator.py.


async def test_round_robin_cursor_skips_open_targets(harness: Harness) -> None:
    route = make_route(
        RoutingStrategy.round_robin(),
        breaker=BreakerParams(failure_threshold=1, open_timeout_ms=60_000),
    )
    seen = [(await admit(harness, route))[1].target_id for _ in range(6)]
    assert seen == ["t0", "t1", "t2", "t0", "t1", "t2"]
    await fail(harness, route, "t1")
    seen = [(await admit(harness, route))[1].target_id for _ in range(4)]
    assert set(seen) == {"t0", "t2"} and seen.count("t0") == seen.count("t2") == 2
    # The cursor the next request takes: ten decisions have taken 1..10.
    assert (await harness.state.snapshot(route)).rr_cursor == 11


async def test_least_busy_follows_in_flight_leases(harness: Harness) -> None:
    route = make_route(RoutingStrategy.least_busy())
    admitted = [(await admit(harness, route))[1] for _ in range(3)]
    assert [a.target_id for a in admitted] == ["t0", "t1", "t2"]
    await harness.state.record(route, Outcome.for_admission(admitted[1], OutcomeKind.SUCCESS, 1.0))
    decision, admission = await admit(harness, route)
    assert admission.target_id == "t1"
    assert "least_busy: t1 with 0 in flight" in decision.reason
    snapshot = await harness.state.snapshot(route)
    assert [t.inflight for t in snapshot.targets] == [1, 1, 1]


async def test_in_flight_leases_expire_when_never_reported(harness: Harness) -> None:
    route = make_route(RoutingStrategy.least_busy(), lease_ttl_ms=200)
    for _ in range(4):
        await admit(harness, route)
    assert sum(t.inflight for t in (await harness.state.snapshot(route)).targets) == 4
    await harness.wait(260)
    assert sum(t.inflight for t in (await harness.state.snapshot(route)).targets) == 0
    _, admission = await admit(harness, route)  # the sweep in decide keeps counts exact
    assert admission.target_id == "t0"
    assert sum(t.inflight for t in (await harness.state.snapshot(route)).targets) == 1


async def test_window_buckets_stop_counting_by_themselves(harness: Harness) -> None:
    route = make_route(
        RoutingStrategy.latency_based(), window=WindowParams(bucket_ms=100, buckets=2)
    )
    await harness.align(100)  # both samples and the first snapshot in one bucket's lifetime
    await record_latency(harness, route, "t0", 500)
    await harness.state.record(route, Outcome(target_id="t0", kind=OutcomeKind.FAILURE))
    snap = await target(harness, route, "t0")
    assert (snap.successes, snap.failures, snap.latency_sum_us) == (1, 1, 500_000)
    assert snap.latency_ms == pytest.approx(500.0) and snap.success_rate == pytest.approx(0.5)
    await harness.wait(350)
    snap = await target(harness, route, "t0")
    assert (snap.successes, snap.failures, snap.latency_sum_us) == (0, 0, 0)


async def test_window_drops_only_the_buckets_that_aged_out(harness: Harness) -> None:
    route = make_route(
        RoutingStrategy.latency_based(), window=WindowParams(bucket_ms=200, buckets=3)
    )
    await harness.align(200)  # bucket B
    await record_latency(harness, route, "t0", 100, 300)
    await harness.wait(200)  # bucket B + 1
    await record_latency(harness, route, "t0", 50)
    await harness.state.record(route, Outcome(target_id="t0", kind=OutcomeKind.FAILURE))
    snap = await target(harness, route, "t0")
    assert (snap.successes, snap.failures, snap.latency_sum_us) == (3, 1, 450_000)
    decision, _ = await admit(harness, route)  # decide reads (and may compact) the window
    assert decision.candidates[-1].target.id == "t0" or decision.candidates[0].successes == 0
    await harness.wait(400)  # bucket B + 3: B is out of the window, B + 1 is not
    snap = await target(harness, route, "t0")
    assert (snap.successes, snap.failures, snap.latency_sum_us) == (1, 1, 50_000)
    decision, _ = await admit(harness, route)
    t0 = next(c for c in decision.candidates if c.target.id == "t0")
    assert (t0.successes, t0.failures, t0.latency_sum_us) == (1, 1, 50_000)
    await record_latency(harness, route, "t0", 10)
    snap = await target(harness, route, "t0")
    assert (snap.successes, snap.failures, snap.latency_sum_us) == (2, 1, 60_000)


async def test_tokens_are_summed_in_the_window(harness: Harness) -> None:
    route = make_route()
    _, admission = await admit(harness, route)
    outcome = Outcome.for_admission(admission, OutcomeKind.SUCCESS, 20.0)
    outcome.input_tokens, outcome.output_tokens = 120, 30
    await harness.state.record_many([(route, outcome)])
    snap = await target(harness, route, "t0")
    assert (snap.input_tokens, snap.output_tokens) == (120, 30)


# ---- the standalone breaker ------------------------------------------------------------


async def test_standalone_circuit_breaker(harness: Harness) -> None:
    breaker = CircuitBreaker(
        threshold=3, timeout=0.2, name=f"cb-{uuid.uuid4().hex[:6]}", state=harness.state
    )
    assert await breaker.state() is CircuitState.CLOSED
    for _ in range(3):
        await breaker.record_failure()
    assert await breaker.state() is CircuitState.OPEN
    with pytest.raises(CircuitBreakerOpen) as raised:
        await breaker.allow()
    assert raised.value.provider == breaker.name and raised.value.retry_after_s > 0
    await harness.wait(260)
    assert await breaker.state() is CircuitState.HALF_OPEN
    result = await breaker.call(_answer)
    assert result == 42
    assert await breaker.state() is CircuitState.CLOSED


async def _answer() -> int:
    return 42


async def test_a_retry_after_longer_than_the_key_lifetime_is_capped(harness: Harness) -> None:
    route = RouteSpec(
        name=f"route-{uuid.uuid4().hex[:8]}",
        strategy=RoutingStrategy.cost_based(),
        targets=(TargetSpec(id="t0", provider="p", model="m"),),
        breaker=BreakerParams(open_timeout_ms=500, max_open_timeout_ms=1_000),
        lease_ttl_ms=1_000,
        idle_ttl_ms=200_000,
    )
    assert route.key_ttl_ms == 200_000 and route.max_cooldown_ms == 100_000
    await harness.state.record(
        route, Outcome(target_id="t0", kind=OutcomeKind.RATE_LIMITED, retry_after_s=86_400)
    )
    snap = await target(harness, route, "t0")
    assert 95_000 < snap.cooldown_remaining_ms <= 100_000  # not a day


async def test_a_lease_is_only_released_by_the_target_that_holds_it(harness: Harness) -> None:
    route = make_route()
    _, admission = await admit(harness, route)
    assert admission.target_id == "t0"
    wrong = Outcome(target_id="t1", kind=OutcomeKind.NEUTRAL, token=admission.token)
    await harness.state.record(route, wrong)
    snapshot = await harness.state.snapshot(route)
    assert [t.inflight for t in snapshot.targets] == [1, 0, 0]


# ---- explain: the backend's own reasons, the next decide's own order ----------------------


async def test_explain_reports_each_exclusion_reason_from_the_backend(harness: Harness) -> None:
    route = make_route(
        breaker=BreakerParams(failure_threshold=1, open_timeout_ms=60_000, half_open_max_probes=1)
    )
    await fail(harness, route, "t0")  # breaker open
    await harness.state.record(
        route, Outcome(target_id="t1", kind=OutcomeKind.RATE_LIMITED, retry_after_s=30.0)
    )
    view = await harness.state.explain(route)
    rows = {t.target_id: t for t in view.snapshot.targets}
    assert rows["t0"].excluded == "breaker_open"
    assert 0 < rows["t0"].excluded_ms <= 60_000
    assert rows["t0"].excluded_ms == rows["t0"].open_remaining_ms
    assert rows["t1"].excluded == "rate_limited"
    assert 0 < rows["t1"].excluded_ms <= 30_000
    assert rows["t2"].excluded is None and rows["t2"].excluded_ms == 0
    assert [c.target.id for c in view.decision.candidates] == ["t2"]
    assert view.decision.admission is None


async def test_explain_reports_full_probe_slots(harness: Harness) -> None:
    route = make_route(
        prices=(1.0, 2.0),
        breaker=BreakerParams(failure_threshold=1, open_timeout_ms=200, half_open_max_probes=1),
    )
    await fail(harness, route, "t0")
    await harness.wait(300)
    _, probe = await admit(harness, route)
    assert (probe.target_id, probe.probe) == ("t0", True)
    rows = {t.target_id: t for t in (await harness.state.explain(route)).snapshot.targets}
    assert rows["t0"].excluded == "probes_full"
    assert rows["t0"].probes_in_use == 1 and rows["t0"].excluded_ms > 0


async def test_explain_changes_nothing_and_predicts_the_next_decide(harness: Harness) -> None:
    for strategy in (RoutingStrategy.round_robin(), RoutingStrategy.default_hybrid()):
        route = make_route(strategy)
        for _ in range(4):
            _, admission = await admit(harness, route)
            await harness.state.record(
                route, Outcome.for_admission(admission, OutcomeKind.SUCCESS, 12.0)
            )
        first = await harness.state.explain(route)
        second = await harness.state.explain(route)
        assert [c.target.id for c in first.decision.candidates] == [
            c.target.id for c in second.decision.candidates
        ]
        assert first.snapshot.rr_cursor == second.snapshot.rr_cursor
        assert [t.inflight for t in first.snapshot.targets] == [0, 0, 0]
        decision, _ = await admit(harness, route)
        assert [c.target.id for c in decision.candidates] == [
            c.target.id for c in first.decision.candidates
        ]
        assert [c.score for c in decision.candidates] == pytest.approx(
            [c.score for c in first.decision.candidates]
        )
        # The cursor explain reports is the one the next decide took.
        assert decision.rr_cursor == first.snapshot.rr_cursor == first.decision.rr_cursor


async def test_explain_shows_a_held_target_demoted(harness: Harness) -> None:
    route = make_route(prices=(1.0, 2.0), breaker=BreakerParams(failure_threshold=3))
    await fail(harness, route, "t0", times=2)  # one failure short of opening
    await admit(harness, route)  # its last failure budget is now in flight
    view = await harness.state.explain(route)
    assert [(c.target.id, c.held) for c in view.decision.candidates] == [
        ("t1", False),
        ("t0", True),
    ]
