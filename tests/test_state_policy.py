"""Traffic policies (issue 11: priority, weighted, provider-wide breakers, sticky sessions)
on every row of the backend table: MemoryState and the Lua make the same decisions, so each
test here is also a conformance test of the two."""

from __future__ import annotations

import dataclasses
import random
import uuid
from collections import Counter

from redis.crc import key_slot

from edgeroute import CircuitState, RoutingStrategy
from edgeroute.state.base import RouteSpec
from edgeroute.state.memory import MemoryState
from edgeroute.state.redis import spec_keys
from edgeroute.strategy import RoutingDecision
from edgeroute.types import (
    AffinityParams,
    BreakerParams,
    EstimatorParams,
    Outcome,
    OutcomeKind,
    TargetSpec,
)
from tests.test_state_conformance import Harness, admit, fail, harness

__all__ = ["harness"]  # the backend-table fixture, shared with the conformance suite


def policy_route(
    strategy: RoutingStrategy,
    *,
    priorities: tuple[int, ...] | None = None,
    weights: tuple[int, ...] | None = None,
    count: int = 3,
    breaker: BreakerParams | None = None,
    providers: tuple[str, ...] | None = None,
    name: str | None = None,
) -> RouteSpec:
    n = len(priorities or weights or providers or ()) or count
    return RouteSpec(
        name=name or f"route-{uuid.uuid4().hex[:8]}",
        strategy=strategy,
        targets=tuple(
            TargetSpec(
                id=f"t{i}",
                provider=providers[i] if providers else f"p{i}",
                model=f"m{i}",
                price_per_mtok=float(i + 1),
                priority=priorities[i] if priorities else i,
                weight=weights[i] if weights else 1,
            )
            for i in range(n)
        ),
        breaker=breaker or BreakerParams(failure_threshold=1, open_timeout_ms=60_000),
    )


async def served(h: Harness, route: RouteSpec, times: int) -> list[str]:
    """Target ids of `times` first decides, each released at once (a success)."""
    seen = []
    for _ in range(times):
        _, admission = await admit(h, route)
        await h.state.record(route, Outcome.for_admission(admission, OutcomeKind.SUCCESS, 1.0))
        seen.append(admission.target_id)
    return seen


# ---- strategy priority -------------------------------------------------------------------


async def test_priority_takes_config_order_and_fails_over_down_it(harness: Harness) -> None:
    route = policy_route(RoutingStrategy.priority())
    assert await served(harness, route, 3) == ["t0", "t0", "t0"]
    # One request's failover: each decide excludes what it tried, next in order comes.
    decision, first = await admit(harness, route)
    assert [c.target.id for c in decision.candidates] == ["t0", "t1", "t2"]
    assert decision.reason.startswith("priority group 0, round_robin: cursor")
    failed = Outcome.for_admission(first, OutcomeKind.FAILURE, 1.0)
    decision, second = await admit(harness, route, exclude=["t0"], outcome=failed, advance=False)
    assert second.target_id == "t1"
    failed = Outcome.for_admission(second, OutcomeKind.FAILURE, 1.0)
    _, third = await admit(harness, route, exclude=["t0", "t1"], outcome=failed, advance=False)
    assert third.target_id == "t2"
    # failure_threshold 1: t0 and t1 are open now, every request lands on t2.
    await harness.state.record(route, Outcome.for_admission(third, OutcomeKind.SUCCESS, 1.0))
    assert await served(harness, route, 2) == ["t2", "t2"]


async def test_priority_groups_round_robin_inside_and_fall_back_as_a_group(
    harness: Harness,
) -> None:
    route = policy_route(RoutingStrategy.priority(), priorities=(1, 1, 2, 2))
    assert await served(harness, route, 4) == ["t0", "t1", "t0", "t1"]
    await fail(harness, route, "t0")
    assert await served(harness, route, 2) == ["t1", "t1"]
    await fail(harness, route, "t1")
    # The whole first group is out: the second takes turns on the same shared cursor.
    seen = await served(harness, route, 4)
    assert Counter(seen) == {"t2": 2, "t3": 2}
    explanation = await harness.state.explain(route)
    order = [c.target.id for c in explanation.decision.candidates]
    assert set(order) == {"t2", "t3"}


async def test_priority_within_cost_orders_each_group_by_price(harness: Harness) -> None:
    # Prices rise with the index; within cost the cheapest of a group goes first.
    route = policy_route(RoutingStrategy.priority("cost"), priorities=(2, 1, 1, 0))
    decision, _ = await admit(harness, route)
    assert [c.target.id for c in decision.candidates] == ["t3", "t1", "t2", "t0"]


# ---- strategy weighted -------------------------------------------------------------------


async def test_weighted_is_smooth_and_exact(harness: Harness) -> None:
    route = policy_route(RoutingStrategy.weighted(), weights=(5, 1, 1))
    # nginx's smooth weighted round-robin sequence for 5/1/1.
    assert await served(harness, route, 7) == ["t0", "t0", "t1", "t0", "t2", "t0", "t0"]
    snapshot = await harness.state.snapshot(route)
    assert [t.current_weight for t in snapshot.targets] == [0, 0, 0]


async def test_weighted_70_20_10_within_one_in_every_window_of_100(harness: Harness) -> None:
    route = policy_route(RoutingStrategy.weighted(), weights=(70, 20, 10))
    seen = await served(harness, route, 300)
    assert Counter(seen) == {"t0": 210, "t1": 60, "t2": 30}
    for start in range(0, 201):
        counts = Counter(seen[start : start + 100])
        for target, share in (("t0", 70), ("t1", 20), ("t2", 10)):
            assert abs(counts[target] - share) <= 1, (start, counts)


async def test_weighted_excluded_share_goes_to_the_rest_by_weight(harness: Harness) -> None:
    route = policy_route(RoutingStrategy.weighted(), weights=(70, 20, 10))
    await fail(harness, route, "t0")  # open for a minute
    seen = await served(harness, route, 30)
    # t0's 70 % is shared 20:10 by the others, exactly (2:1 in every 3 decisions).
    assert Counter(seen) == {"t1": 20, "t2": 10}
    for start in range(0, 28, 3):
        assert Counter(seen[start : start + 3]) == {"t1": 2, "t2": 1}
    # While out, t0 earned nothing: no burst when it is back.
    snapshot = await harness.state.snapshot(route)
    assert snapshot.targets[0].current_weight == 0
    assert sum(t.current_weight for t in snapshot.targets) == 0


async def test_weighted_failover_and_explain_change_no_weights(harness: Harness) -> None:
    route = policy_route(RoutingStrategy.weighted(), weights=(2, 1))
    before = [t.current_weight for t in (await harness.state.snapshot(route)).targets]
    explanation = await harness.state.explain(route)
    assert explanation.decision.candidates[0].target.id == "t0"
    assert [t.current_weight for t in explanation.snapshot.targets] == before
    decision, first = await admit(harness, route)
    assert decision.reason.startswith("weighted: t0 (weight 2, credit 2)")
    weights = [t.current_weight for t in (await harness.state.snapshot(route)).targets]
    assert weights == [-1, 1]
    failed = Outcome.for_admission(first, OutcomeKind.NEUTRAL)
    _, second = await admit(harness, route, exclude=["t0"], outcome=failed, advance=False)
    assert second.target_id == "t1"
    assert [t.current_weight for t in (await harness.state.snapshot(route)).targets] == weights


# ---- breaker scope provider --------------------------------------------------------------


def provider_routes(**breaker: int) -> tuple[RouteSpec, RouteSpec]:
    """Two routes sharing provider `sick` under one group tag, as router.breaker_groups
    puts them, each with a target of its own elsewhere."""
    group = f"g-{uuid.uuid4().hex[:8]}"
    params = BreakerParams(**{"failure_threshold": 2, "open_timeout_ms": 1_000, **breaker})
    a = policy_route(
        RoutingStrategy.cost_based(), providers=("sick", "pa"), breaker=params, name=group
    )
    b = policy_route(
        RoutingStrategy.cost_based(), providers=("sick", "pb"), breaker=params, name=group + "-b"
    )
    return (
        dataclasses.replace(a, breaker_scope="provider", state_group=group),
        dataclasses.replace(b, breaker_scope="provider", state_group=group),
    )


async def test_a_provider_breaker_opened_through_one_route_is_seen_by_another(
    harness: Harness,
) -> None:
    a, b = provider_routes()
    await fail(harness, a, "t0", 2)
    snapshot = await harness.state.snapshot(b)
    assert snapshot.targets[0].state is CircuitState.OPEN
    assert snapshot.targets[0].excluded == "breaker_open"
    decision, admission = await admit(harness, b)
    assert admission.target_id == "t1" and [c.target.id for c in decision.candidates] == ["t1"]
    # Half-open after the timeout: one probe slot for the provider, whichever route takes it.
    await harness.wait(1_000)
    _, probe = await admit(harness, b)
    assert probe.target_id == "t0" and probe.probe
    decision, admission = await admit(harness, a)
    assert admission.target_id == "t1"
    assert (await harness.state.snapshot(a)).targets[0].excluded == "probes_full"
    # The probe fails through route b: open again, for both, with a doubled timeout.
    await harness.state.record(b, Outcome.for_admission(probe, OutcomeKind.FAILURE, 1.0))
    for route in (a, b):
        row = (await harness.state.snapshot(route)).targets[0]
        assert row.state is CircuitState.OPEN and row.open_timeout_ms == 2_000
    # An operator's reset through one route closes it for both.
    await harness.state.reset(a, "t0")
    assert (await harness.state.snapshot(b)).targets[0].state is CircuitState.CLOSED


async def test_failures_through_two_routes_add_up_on_the_provider(harness: Harness) -> None:
    a, b = provider_routes()
    await fail(harness, a, "t0")
    await fail(harness, b, "t0")
    for route in (a, b):
        assert (await harness.state.snapshot(route)).targets[0].state is CircuitState.OPEN
    # Target scope (the default) keeps them apart: the same failures open nothing.
    a2, b2 = (dataclasses.replace(r, breaker_scope="target", state_group="") for r in (a, b))
    await fail(harness, a2, "t0")
    await fail(harness, b2, "t0")
    for route in (a2, b2):
        assert (await harness.state.snapshot(route)).targets[0].state is CircuitState.CLOSED


def test_routes_of_one_group_keep_every_key_in_one_slot() -> None:
    a, b = provider_routes()
    slots = {key_slot(k.encode()) for r in (a, b) for k in spec_keys("edgeroute", r)}
    assert len(slots) == 1
    assert len({*spec_keys("edgeroute", a), *spec_keys("edgeroute", b)}) == 7  # one :p


# ---- sticky sessions ---------------------------------------------------------------------


def sticky_route(ttl_ms: int = 10_000, max_pins: int = 100) -> RouteSpec:
    route = policy_route(RoutingStrategy.round_robin())
    return dataclasses.replace(route, affinity=AffinityParams("header", "x-s", ttl_ms, max_pins))


async def pinned(h: Harness, route: RouteSpec, session: str, **kwargs: object) -> RoutingDecision:
    decision, admission = await admit(h, route, session=session, **kwargs)
    await h.state.record(route, Outcome.for_admission(admission, OutcomeKind.SUCCESS, 1.0))
    return decision


async def test_a_pin_holds_its_target_against_the_strategy(harness: Harness) -> None:
    route = sticky_route()
    first = await pinned(harness, route, "s1")
    assert (first.target_id, first.affinity) == ("t0", "new")
    for _ in range(4):
        again = await pinned(harness, route, "s1")
        assert (again.target_id, again.affinity) == ("t0", "kept")
    # Other sessions and requests without one go round as before (the cursor moved on).
    other = await pinned(harness, route, "s2")
    assert other.affinity == "new" and other.target_id != "t0"
    plain, _ = await admit(harness, route)
    assert plain.affinity == ""
    assert (await harness.state.snapshot(route)).pins == 2


async def test_a_pin_moves_when_its_target_is_excluded(harness: Harness) -> None:
    route = sticky_route()
    assert (await pinned(harness, route, "s1")).target_id == "t0"
    await fail(harness, route, "t0")  # breaker open (threshold 1)
    moved = await pinned(harness, route, "s1")
    assert (moved.affinity, moved.pin_moved_from) == ("moved", "t0")
    assert moved.target_id != "t0"
    kept = await pinned(harness, route, "s1")
    assert (kept.target_id, kept.affinity) == (moved.target_id, "kept")
    # A failover inside one request: the pinned target tried and failed, the pin follows.
    _, admission = await admit(harness, route, session="s1")
    failed = Outcome.for_admission(admission, OutcomeKind.NEUTRAL)
    after, _ = await admit(
        harness, route, session="s1", exclude=[admission.target_id], outcome=failed, advance=False
    )
    assert after.affinity == "moved" and after.pin_moved_from == admission.target_id


async def test_pins_expire_and_their_count_is_bounded(harness: Harness) -> None:
    route = sticky_route(ttl_ms=1_000, max_pins=2)
    for session in ("a", "b"):
        await pinned(harness, route, session)
    await harness.wait(10)
    await pinned(harness, route, "a")  # used again: now b is the least recently used
    await harness.wait(10)
    await pinned(harness, route, "c")  # a third pin: b goes
    assert (await harness.state.snapshot(route)).pins == 2
    assert (await pinned(harness, route, "a")).affinity == "kept"
    assert (await pinned(harness, route, "b")).affinity == "new"  # evicted; c goes now
    await harness.wait(1_000)
    assert (await harness.state.snapshot(route)).pins == 0
    assert (await pinned(harness, route, "a")).affinity == "new"


def test_weighted_bounds_for_any_weights() -> None:
    """Any weights: exact per period (the weights' sum), every prefix within 1 of its
    share, every window within 2 (the reference model; the Lua is held equal to it above
    and in the property test)."""
    state = MemoryState(clock=lambda: 1_800_000_000.0)
    luck = random.Random(7)
    for _ in range(40):
        weights = tuple(luck.randint(1, 60) for _ in range(luck.randint(2, 5)))
        route = policy_route(RoutingStrategy.weighted(), weights=weights)
        total = sum(weights)
        seen = []
        for _ in range(2 * total):
            decision = state.decide_now(route)
            assert decision.admission is not None
            state.record_now(route, Outcome.for_admission(decision.admission, OutcomeKind.NEUTRAL))
            seen.append(int(decision.admission.target_id[1:]))
        for i, weight in enumerate(weights):
            share = weight / total
            assert seen[:total].count(i) == weight
            count = 0
            for n, picked in enumerate(seen, 1):
                count += picked == i
                assert abs(count - n * share) < 1
            for start in range(0, len(seen) - 100):
                assert abs(seen[start : start + 100].count(i) - 100 * share) < 2


async def test_a_fallback_route_pins_by_its_own_affinity() -> None:
    """Router.call down a chain: the first route has no affinity, its fallback has; the
    session pins there, and the next call with the same session lands on the same target."""
    from edgeroute.config import parse_config
    from edgeroute.router import AttemptFailed, Router
    from edgeroute.strategy import Candidate

    config = parse_config(
        {
            "providers": [
                {"name": n, "base_url": "http://127.0.0.1:9/v1"} for n in ("down", "x", "y")
            ],
            "routes": [
                {
                    "model": "main",
                    "strategy": "cost",
                    "targets": [{"provider": "down", "model": "m"}],
                    "fallbacks": ["backup"],
                },
                {
                    "model": "backup",
                    "strategy": "round_robin",
                    "targets": [{"provider": "x", "model": "m"}, {"provider": "y", "model": "m"}],
                    "affinity": {"key": "header:x-session-id"},
                },
            ],
        },
        env={},
    )
    router = Router(config, MemoryState())

    async def attempt(candidate: Candidate) -> str:
        if candidate.target.provider == "down":
            raise AttemptFailed(OutcomeKind.FAILURE, "server_error")
        return candidate.target.provider

    first = await router.call("main", attempt, session="alice")
    for _ in range(4):
        assert await router.call("main", attempt, session="alice") == first
    assert {await router.call("main", attempt) for _ in range(4)} == {"x", "y"}
    assert (await router.explain("backup")).snapshot.pins == 1
    await router.close()


async def test_a_pin_on_a_stale_target_behind_a_probe_is_no_exploration(
    harness: Harness,
) -> None:
    """The pinned target is the stalest (an exploration candidate), a half-open probe ranks
    first: the probe cancels the exploration, and the pin going first does not revive it."""
    route = dataclasses.replace(
        policy_route(
            RoutingStrategy.latency_based(),
            breaker=BreakerParams(failure_threshold=1, open_timeout_ms=1_000),
        ),
        affinity=AffinityParams("header", "x-s", 600_000, 100),
        estimator=EstimatorParams(explore_after_ms=500, explore_every=1, half_life_ms=60_000),
    )
    for target_id in ("t0", "t1", "t2"):  # t0 measured first: the oldest estimate
        await harness.state.record(
            route, Outcome(target_id=target_id, kind=OutcomeKind.SUCCESS, latency_ms=10.0)
        )
        await harness.wait(10)
    decision, admission = await admit(harness, route, session="s")
    pin = decision.target_id  # t0, the oldest estimate; a neutral outcome keeps it so
    await harness.state.record(route, Outcome.for_admission(admission, OutcomeKind.NEUTRAL))
    await fail(harness, route, "t1")  # opens (threshold 1)
    await harness.wait(1_000)  # half-open now; every estimate is stale
    decision, _ = await admit(harness, route, session="s")
    assert (pin, decision.affinity, decision.target_id) == ("t0", "kept", "t0")
    assert [c.target.id for c in decision.candidates] == ["t0", "t1", "t2"]  # t1 the probe
    assert not any(c.explore for c in decision.candidates)
