"""Provider quotas and learned limits, conformance over every backend of the table.

targets[].rpm / tpm / max_concurrency are checked and reserved inside decide (one call),
learned provider limits arrive as an outcome's `limit_reset_s`; the memory model and the
Lua scripts must agree on every count and every boundary (one virtual clock drives both).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from edgeroute import RoutingStrategy
from edgeroute.state.base import RouteSpec
from edgeroute.types import Outcome, OutcomeKind, TargetSpec
from tests.support.backends import VirtualClock, open_backend, table
from tests.test_state_conformance import Harness, admit, target


@pytest.fixture(params=table())
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    clock = VirtualClock()
    backend = open_backend(request.param, request, clock=clock)
    yield Harness(backend.state, clock, backend.kind)
    await backend.state.close()


def quota_route(first: TargetSpec, second_price: float = 2.0) -> RouteSpec:
    """A cost route: `first` (cheapest, with quotas) and a plain fallback `t1`."""
    return RouteSpec(
        name=f"route-{uuid.uuid4().hex[:8]}",
        strategy=RoutingStrategy.cost_based(),
        targets=(first, TargetSpec("t1", "p1", "m1", price_per_mtok=second_price)),
    )


def limited(rpm: int = 0, tpm: int = 0, max_concurrency: int = 0) -> TargetSpec:
    return TargetSpec(
        "t0", "p0", "m0", price_per_mtok=1.0, rpm=rpm, tpm=tpm, max_concurrency=max_concurrency
    )


async def test_max_concurrency_counts_leases_and_frees_on_record(harness: Harness) -> None:
    route = quota_route(limited(max_concurrency=2))
    held = [(await admit(harness, route))[1] for _ in range(2)]
    assert [a.target_id for a in held] == ["t0", "t0"]
    _, third = await admit(harness, route)
    assert third.target_id == "t1"
    row = await target(harness, route, "t0")
    assert (row.excluded, row.inflight) == ("quota_concurrency", 2)
    await harness.state.record(route, Outcome.for_admission(held[0], OutcomeKind.SUCCESS, 5))
    assert (await admit(harness, route))[1].target_id == "t0"


async def test_rpm_holds_for_61_seconds_in_1s_buckets(harness: Harness) -> None:
    route = quota_route(limited(rpm=3))
    await harness.align(1000, offset_ms=0)
    for _ in range(3):
        _, admission = await admit(harness, route)
        assert admission.target_id == "t0"
        await harness.state.record(route, Outcome.for_admission(admission, OutcomeKind.SUCCESS))
    _, admission = await admit(harness, route)
    assert admission.target_id == "t1"
    row = await target(harness, route, "t0")
    assert (row.excluded, row.excluded_ms) == ("quota_rpm", 61_000)
    await harness.wait(60_999)
    assert (await target(harness, route, "t0")).excluded == "quota_rpm"
    await harness.wait(1)
    assert (await target(harness, route, "t0")).excluded is None
    assert (await admit(harness, route))[1].target_id == "t0"


async def test_all_at_quota_admits_nothing_and_says_when_the_first_frees(
    harness: Harness,
) -> None:
    route = RouteSpec(
        name=f"route-{uuid.uuid4().hex[:8]}",
        strategy=RoutingStrategy.cost_based(),
        targets=(limited(rpm=1), TargetSpec("t1", "p1", "m1", 2.0, rpm=1)),
    )
    await harness.align(1000, offset_ms=0)
    await admit(harness, route)
    await harness.wait(10_000)
    await admit(harness, route)
    await harness.wait(500)
    decision = await harness.state.decide(route)
    assert decision.admission is None
    assert decision.quota_limited
    assert decision.retry_after_s == pytest.approx(50.5)


async def test_tpm_reserves_the_estimate_and_record_corrects_it(harness: Harness) -> None:
    route = quota_route(limited(tpm=1000))
    await harness.align(1000)
    _, first = await admit(harness, route, tokens=600)
    assert (first.target_id, first.reserved_tokens) == ("t0", 600)
    # 600 + 600 > 1000: the next estimate goes to the fallback, which reserves nothing.
    _, second = await admit(harness, route, tokens=600)
    assert (second.target_id, second.reserved_tokens) == ("t1", 0)
    assert (await target(harness, route, "t0")).excluded is None  # explain needs 1 token
    # The real usage was 150: 850 tokens are back.
    await harness.wait(3_000)
    await harness.state.record(
        route,
        Outcome.for_admission(first, OutcomeKind.SUCCESS, 5, input_tokens=100, output_tokens=50),
    )
    _, third = await admit(harness, route, tokens=850)
    assert third.target_id == "t0"
    decision = await harness.state.decide(route, tokens=1, exclude=("t1",))
    assert decision.admission is None and decision.quota_limited
    # Tokens count in the bucket the request was admitted in: 61 s after the first one.
    row = await target(harness, route, "t0")
    assert row.excluded == "quota_tpm"
    assert row.excluded_ms == 58_000 - 10


async def test_a_failed_attempt_gives_its_reserved_tokens_back(harness: Harness) -> None:
    route = quota_route(limited(tpm=100))
    _, admission = await admit(harness, route, tokens=100)
    assert (await admit(harness, route, tokens=1))[1].target_id == "t1"
    await harness.state.record(route, Outcome.for_admission(admission, OutcomeKind.FAILURE))
    assert (await admit(harness, route, tokens=100))[1].target_id == "t0"


async def test_an_estimate_above_the_quota_reserves_the_whole_quota(harness: Harness) -> None:
    route = quota_route(limited(tpm=100))
    _, admission = await admit(harness, route, tokens=5000)
    assert (admission.target_id, admission.reserved_tokens) == ("t0", 100)


async def test_learned_limit_keeps_the_target_out_until_its_reset(harness: Harness) -> None:
    route = quota_route(TargetSpec("t0", "p0", "m0", price_per_mtok=1.0))
    _, admission = await admit(harness, route)
    await harness.state.record(
        route, Outcome.for_admission(admission, OutcomeKind.SUCCESS, 5, limit_reset_s=6.0)
    )
    row = await target(harness, route, "t0")
    assert (row.excluded, row.excluded_ms) == ("learned_limit", 6000)
    assert (await admit(harness, route))[1].target_id == "t1"
    decision = await harness.state.decide(route, exclude=("t1",))
    assert decision.admission is None and decision.quota_limited
    assert decision.retry_after_s == pytest.approx(6.0)
    # A later, shorter reset never shortens it; reset lifts it.
    await harness.state.record(route, Outcome("t0", OutcomeKind.NEUTRAL, limit_reset_s=1.0))
    await harness.wait(5_999)
    assert (await target(harness, route, "t0")).excluded == "learned_limit"
    await harness.state.reset(route, "t0")
    assert (await target(harness, route, "t0")).excluded is None


async def test_a_route_without_quotas_decides_as_before(harness: Harness) -> None:
    route = quota_route(TargetSpec("t0", "p0", "m0", price_per_mtok=1.0))
    for _ in range(5):
        decision, admission = await admit(harness, route, tokens=10**6)
        assert admission.target_id == "t0" and admission.reserved_tokens == 0
        assert not decision.quota_limited
