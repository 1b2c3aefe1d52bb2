"""MemoryState is the oracle for RedisState: random operation sequences, run side by side.

A hypothesis rule-based state machine drives one route through both backends with the very
same operations (decide with excludes and piggy-backed outcomes, record / record_many of
outstanding admissions - late ones included -, unleased breaker-API outcomes, reset, and
waits of chosen lengths) and, after every step, holds the decision and the full snapshot
of the two equal.

Time: both backends read one virtual clock (MemoryState's `clock`; RedisState's `clock`
sends it as every script's `clock_ms` instead of Redis TIME), and only the `wait` rule moves
it. So every step is compared exactly, remaining times included, and waits can land on
either side of any boundary (an open timeout, a cooldown, a lease or probe expiry, a window
bucket) to the millisecond, with nothing waved through and no real sleeping. The
time-decayed estimates (a power of two per sample) must therefore agree to the last bit.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, TypeVar

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from edgeroute.state.base import RouteSpec
from edgeroute.state.memory import MemoryState
from edgeroute.state.redis import RedisState, spec_keys
from edgeroute.strategy import STRATEGY_KINDS, WITHIN_KINDS, RoutingDecision, RoutingStrategy
from edgeroute.types import (
    Admission,
    AffinityParams,
    BreakerParams,
    EstimatorParams,
    Outcome,
    OutcomeKind,
    RouteSnapshot,
    TargetSpec,
    WindowParams,
)

T = TypeVar("T")
U = TypeVar("U")

OPEN_TIMEOUT_MS = 150
MAX_OPEN_TIMEOUT_MS = 600  # half-open failures double the timeout: 150, 300, 600
PROBE_TTL_MS = 2_000
LEASE_TTL_MS = 20_000
# Waits straddle every constant above, the cooldowns below and the 5 s window buckets.
# ...and the estimator's (half-lives, explore_after, explore_ttl drawn in setup_route).
_WAIT_CHOICES = (1, 7, 49, 50, 51, 149, 150, 151, 299, 300, 301, 333, 500, 600, 1_999, 2_000)
WAITS_MS = st.sampled_from((*_WAIT_CHOICES, 2_001, 5_000, 20_001, 61_000))
SCORE_TOLERANCE = 1e-9

KINDS = st.sampled_from(
    [
        OutcomeKind.FAILURE,
        OutcomeKind.FAILURE,
        OutcomeKind.SUCCESS,
        OutcomeKind.SUCCESS,
        OutcomeKind.RATE_LIMITED,
        OutcomeKind.NEUTRAL,
    ]
)
LATENCIES = st.one_of(
    st.sampled_from([0.0, 1.0, 100.0, 250.5]),
    st.floats(min_value=0.0, max_value=5_000.0, allow_nan=False, allow_infinity=False),
)
# 0.05 s and 0.3 s cooldowns end inside an example, 30 s ones only after the longer waits;
# 0 means a 429 without Retry-After (no cooldown).
RETRY_AFTERS = st.sampled_from([0.0, 0.0, 0.05, 0.3, 30.0])
TOKENS = st.integers(min_value=0, max_value=2_000)
PRICES = st.one_of(
    st.sampled_from([0.0, 0.5, 1.0, 2.5, 10.0]),
    st.floats(min_value=0.0, max_value=60.0, allow_nan=False, allow_infinity=False),
)
WEIGHTS = st.sampled_from([0.0, 0.1, 0.2, 0.25, 1 / 3, 0.4, 0.5, 0.7, 1.0])
INDICES = st.integers(min_value=0, max_value=1_000)  # taken modulo the current list length
# A target's (rpm, tpm, max_concurrency); 0 = no such quota, and most targets have none.
QUOTAS = st.one_of(
    st.just((0, 0, 0)),
    st.just((0, 0, 0)),
    st.tuples(
        st.sampled_from([0, 1, 3]), st.sampled_from([0, 100, 500]), st.sampled_from([0, 1, 2])
    ),
)


class OutcomeDraw:
    """What to report for an admission; turned into one Outcome per backend."""

    __slots__ = ("input_tokens", "kind", "latency_ms", "output_tokens", "retry_after_s")

    def __init__(
        self,
        kind: OutcomeKind,
        latency_ms: float,
        retry_after_s: float,
        input_tokens: int,
        output_tokens: int,
    ) -> None:
        self.kind = kind
        self.latency_ms = latency_ms
        self.retry_after_s = retry_after_s
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens

    def __repr__(self) -> str:
        return (
            f"OutcomeDraw({self.kind.name}, latency_ms={self.latency_ms!r}, "
            f"retry_after_s={self.retry_after_s!r}, tokens=({self.input_tokens}, "
            f"{self.output_tokens}))"
        )

    def for_admission(self, admission: Admission) -> Outcome:
        return Outcome(
            target_id=admission.target_id,
            kind=self.kind,
            latency_ms=self.latency_ms,
            generation=admission.generation,
            token=admission.token,
            probe=admission.probe,
            retry_after_s=self.retry_after_s,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
        )

    def unleased(self, target_id: str) -> Outcome:
        """The standalone breaker API: no lease, applies to the current generation."""
        return Outcome(
            target_id=target_id,
            kind=self.kind,
            latency_ms=self.latency_ms,
            retry_after_s=self.retry_after_s,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
        )


OUTCOMES = st.builds(OutcomeDraw, KINDS, LATENCIES, RETRY_AFTERS, TOKENS, TOKENS)


class Outstanding:
    """One attempt admitted by both backends (same target, generation and probe flag)."""

    __slots__ = ("label", "memory", "redis")

    def __init__(self, label: str, memory: Admission, redis_admission: Admission) -> None:
        self.label = label
        self.memory = memory
        self.redis = redis_admission

    def __repr__(self) -> str:
        m = self.memory
        return f"<{self.label} {m.target_id} gen={m.generation} probe={m.probe}>"


def describe_decision(decision: RoutingDecision) -> str:
    candidates = ", ".join(
        f"{c.target.id}[{c.state.value}{' held' if c.held else ''} s={c.score!r}"
        f" ok={c.successes} lat={c.latency_sum_us} f={c.failures} inf={c.inflight}"
        f" est={c.estimate_us!r} err={c.error_rate!r} age={c.estimate_age_ms}"
        f"{' explore' if c.explore else ''}]"
        for c in decision.candidates
    )
    admission = decision.admission
    admitted = (
        "none"
        if admission is None
        else f"{admission.target_id} gen={admission.generation} probe={admission.probe}"
    )
    return (
        f"admitted={admitted} wait={decision.retry_after_s!r} rr={decision.rr_cursor} "
        f"admissible={decision.admissible} candidates=[{candidates}]"
    )


def assert_same_decision(memory: RoutingDecision, actual: RoutingDecision) -> None:
    detail = f"\n  memory: {describe_decision(memory)}\n  redis:  {describe_decision(actual)}"
    assert [c.target.id for c in actual.candidates] == [c.target.id for c in memory.candidates], (
        f"candidate order differs{detail}"
    )
    for expected, got in zip(memory.candidates, actual.candidates, strict=True):
        assert got.state is expected.state, f"{got.target.id}: state differs{detail}"
        assert got.probe == expected.probe, f"{got.target.id}: probe flag differs{detail}"
        assert got.held == expected.held, f"{got.target.id}: held flag differs{detail}"
        assert abs(got.score - expected.score) <= SCORE_TOLERANCE, (
            f"{got.target.id}: score differs{detail}"
        )
        assert (got.successes, got.latency_sum_us, got.failures, got.inflight) == (
            expected.successes,
            expected.latency_sum_us,
            expected.failures,
            expected.inflight,
        ), f"{got.target.id}: candidate numbers differ{detail}"
        assert (
            got.estimate_us,
            got.error_rate,
            got.estimate_age_ms,
            got.explore,
            got.waiting_ms,
            got.credit,
        ) == (
            expected.estimate_us,
            expected.error_rate,
            expected.estimate_age_ms,
            expected.explore,
            expected.waiting_ms,
            expected.credit,
        ), f"{got.target.id}: estimate differs{detail}"
    assert (actual.admission is None) == (memory.admission is None), f"admission differs{detail}"
    if memory.admission is not None and actual.admission is not None:
        assert (
            actual.admission.target_id,
            actual.admission.generation,
            actual.admission.probe,
            actual.admission.reserved_tokens,
        ) == (
            memory.admission.target_id,
            memory.admission.generation,
            memory.admission.probe,
            memory.admission.reserved_tokens,
        ), f"admission differs{detail}"
    assert actual.quota_limited == memory.quota_limited, f"quota_limited differs{detail}"
    assert actual.retry_after_s == memory.retry_after_s, f"wait differs{detail}"
    assert actual.rr_cursor == memory.rr_cursor, f"rr_cursor differs{detail}"
    assert actual.admissible == memory.admissible, f"admissible count differs{detail}"
    assert (actual.affinity, actual.pin_moved_from) == (memory.affinity, memory.pin_moved_from), (
        f"affinity differs{detail}"
    )


def assert_same_snapshot(memory: RouteSnapshot, actual: RouteSnapshot) -> None:
    assert actual.rr_cursor == memory.rr_cursor, (
        f"rr_cursor: memory {memory.rr_cursor} redis {actual.rr_cursor}"
    )
    assert actual.pins == memory.pins, f"pins: memory {memory.pins} redis {actual.pins}"
    for expected, got in zip(memory.targets, actual.targets, strict=True):
        assert got.target_id == expected.target_id

        def view(t: Any) -> dict[str, Any]:
            return {
                "state": t.state,
                "generation": t.generation,
                "consecutive_failures": t.consecutive_failures,
                "half_open_successes": t.half_open_successes,
                "open_timeout_ms": t.open_timeout_ms,
                "open_remaining_ms": t.open_remaining_ms,
                "cooldown_remaining_ms": t.cooldown_remaining_ms,
                "excluded": t.excluded,
                "excluded_ms": t.excluded_ms,
                "inflight": t.inflight,
                "probes_in_use": t.probes_in_use,
                "successes": t.successes,
                "failures": t.failures,
                "latency_sum_us": t.latency_sum_us,
                "input_tokens": t.input_tokens,
                "output_tokens": t.output_tokens,
                "estimate_us": t.estimate_us,
                "error_rate": t.error_rate,
                "estimate_age_ms": t.estimate_age_ms,
                "explorations_in_use": t.explorations_in_use,
                "stale": t.stale,
                "waiting_ms": t.waiting_ms,
                "current_weight": t.current_weight,
            }

        want, have = view(expected), view(got)
        diff = {k: (want[k], have[k]) for k in want if want[k] != have[k]}
        assert not diff, f"{got.target_id}: snapshot differs (memory, redis): {diff}"


class VirtualClock:
    """Seconds; both backends read it, only the `wait` rule moves it."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class StateMachine(RuleBasedStateMachine):
    """One route, two backends, one clock, one sequence of operations."""

    redis_url: ClassVar[str]
    strategy_kind: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.prefix = f"test-{uuid.uuid4().hex[:12]}"
        self.clock = VirtualClock()
        self.redis = RedisState(
            self.redis_url, key_prefix=self.prefix, timeout_ms=5_000, clock=self.clock
        )
        self.memory = MemoryState(clock=self.clock)
        self.route: RouteSpec | None = None
        self.outstanding: list[Outstanding] = []
        self.labels = 0

    # ---- plumbing ---------------------------------------------------------------------

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    @property
    def spec(self) -> RouteSpec:
        assert self.route is not None
        return self.route

    def both(
        self,
        memory_call: Callable[[], Coroutine[Any, Any, T]],
        redis_call: Callable[[], Coroutine[Any, Any, U]],
    ) -> tuple[T, U]:
        """One operation on each backend, at the same virtual instant."""
        return self.run(memory_call()), self.run(redis_call())

    def teardown(self) -> None:
        try:
            self.run(self.redis.close())
            if self.route is not None:
                client = redis.Redis.from_url(self.redis_url)
                try:
                    client.delete(*spec_keys(self.prefix, self.route))
                finally:
                    client.close()
        finally:
            self.loop.close()

    def _take(self, index: int, consume: bool) -> Outstanding:
        item = self.outstanding[index % len(self.outstanding)]
        if consume:
            self.outstanding.remove(item)
        return item

    def _admitted(self, memory: RoutingDecision, actual: RoutingDecision) -> None:
        if memory.admission is not None and actual.admission is not None:
            self.labels += 1
            self.outstanding.append(
                Outstanding(f"a{self.labels}", memory.admission, actual.admission)
            )

    # ---- setup ------------------------------------------------------------------------

    @initialize(
        prices=st.lists(PRICES, min_size=2, max_size=5),
        failure_threshold=st.integers(min_value=1, max_value=4),
        success_threshold=st.integers(min_value=1, max_value=3),
        half_open_max_probes=st.integers(min_value=1, max_value=3),
        weights=st.tuples(WEIGHTS, WEIGHTS, WEIGHTS).filter(lambda w: sum(w) > 0),
        estimator=st.builds(
            EstimatorParams,
            half_life_ms=st.sampled_from([100, 1_000, 2_000, 7_777]),
            explore_after_ms=st.sampled_from([0, 500, 2_000]),
            explore_max=st.integers(min_value=1, max_value=2),
            explore_every=st.integers(min_value=1, max_value=4),
            explore_ttl_ms=st.sampled_from([300, 30_000]),
            load_penalty=st.sampled_from([0.0, 0.25, 1 / 3, 1.0]),
            tolerance=st.sampled_from([0.0, 0.1, 0.5]),
        ),
        # Per target (rpm, tpm, max_concurrency), 0 = none: small enough to bind often.
        quotas=st.lists(QUOTAS, min_size=5, max_size=5),
        # Traffic policies: priority groups and `within`, weights, provider-wide breakers
        # (targets drawn onto fewer providers, so some share one), sticky sessions.
        groups=st.lists(st.integers(min_value=0, max_value=2), min_size=5, max_size=5),
        within=st.sampled_from(WITHIN_KINDS),
        shares=st.lists(st.integers(min_value=1, max_value=5), min_size=5, max_size=5),
        providers=st.lists(st.integers(min_value=0, max_value=2), min_size=5, max_size=5),
        scope=st.sampled_from(["target", "provider"]),
        affinity=st.none()
        | st.builds(
            AffinityParams,
            st.just("header"),
            st.just("x-s"),
            st.sampled_from([300, 5_000]),
            st.sampled_from([1, 2, 100]),
        ),
    )
    def setup_route(
        self,
        prices: list[float],
        failure_threshold: int,
        success_threshold: int,
        half_open_max_probes: int,
        weights: tuple[float, float, float],
        estimator: EstimatorParams,
        quotas: list[tuple[int, int, int]],
        groups: list[int],
        within: str,
        shares: list[int],
        providers: list[int],
        scope: str,
        affinity: AffinityParams | None,
    ) -> None:
        if self.strategy_kind == "hybrid":
            strategy = RoutingStrategy.hybrid(
                cost_weight=weights[0], latency_weight=weights[1], reliability_weight=weights[2]
            )
        elif self.strategy_kind == "priority":
            strategy = RoutingStrategy.priority(
                within, cost=weights[0], latency=weights[1], reliability=weights[2]
            )
        else:
            strategy = RoutingStrategy.named(self.strategy_kind)
        self.route = RouteSpec(
            name=f"route-{uuid.uuid4().hex[:8]}",
            strategy=strategy,
            targets=tuple(
                TargetSpec(
                    id=f"t{i}",
                    provider=f"p{providers[i] if scope == 'provider' else i}",
                    model=f"m{i}",
                    price_per_mtok=price,
                    rpm=quota[0],
                    tpm=quota[1],
                    max_concurrency=quota[2],
                    priority=groups[i],
                    weight=shares[i],
                )
                for i, (price, quota) in enumerate(zip(prices, quotas, strict=False))
            ),
            breaker_scope=scope,
            affinity=affinity,
            breaker=BreakerParams(
                failure_threshold=failure_threshold,
                open_timeout_ms=OPEN_TIMEOUT_MS,
                success_threshold=success_threshold,
                half_open_max_probes=half_open_max_probes,
                max_open_timeout_ms=MAX_OPEN_TIMEOUT_MS,
                probe_ttl_ms=PROBE_TTL_MS,
            ),
            window=WindowParams(bucket_ms=5_000, buckets=12),
            estimator=estimator,
            lease_ttl_ms=LEASE_TTL_MS,
            idle_ttl_ms=120_000,
        )

    # ---- operations -------------------------------------------------------------------

    @rule(
        exclude=st.sets(st.integers(min_value=0, max_value=4), max_size=3),
        advance=st.booleans(),
        piggyback=st.none() | st.tuples(INDICES, OUTCOMES),
        limit=st.sampled_from([0, 0, 1, 2]),
        tokens=st.sampled_from([0, 0, 10, 60, 150, 400]),
        session=st.sampled_from(["", "", "s1", "s2", "s3"]),
    )
    def decide(
        self,
        exclude: set[int],
        advance: bool,
        piggyback: tuple[int, OutcomeDraw] | None,
        limit: int,
        tokens: int,
        session: str,
    ) -> None:
        self._decide(exclude, advance, piggyback, limit, tokens, session)

    def _decide(
        self,
        exclude: set[int],
        advance: bool,
        piggyback: tuple[int, OutcomeDraw] | None,
        limit: int = 0,
        tokens: int = 0,
        session: str = "",
    ) -> None:
        route = self.spec
        excluded = [t.id for i, t in enumerate(route.targets) if i in exclude]
        memory_outcome = redis_outcome = None
        if piggyback is not None and self.outstanding:
            item = self._take(piggyback[0], consume=True)
            memory_outcome = piggyback[1].for_admission(item.memory)
            redis_outcome = piggyback[1].for_admission(item.redis)
        expected, actual = self.both(
            lambda: self.memory.decide(
                route,
                exclude=excluded,
                outcome=memory_outcome,
                advance=advance,
                limit=limit,
                tokens=tokens,
                session=session,
            ),
            lambda: self.redis.decide(
                route,
                exclude=excluded,
                outcome=redis_outcome,
                advance=advance,
                limit=limit,
                tokens=tokens,
                session=session,
            ),
        )
        assert_same_decision(expected, actual)
        self._admitted(expected, actual)

    # A record with nothing outstanding makes a plain decide instead.

    @rule(index=INDICES, outcome=OUTCOMES, consume=st.booleans() | st.just(True))
    def record(self, index: int, outcome: OutcomeDraw, consume: bool) -> None:
        """Report an outstanding attempt (consume=False: a duplicate delivery may follow)."""
        if not self.outstanding:
            self._decide(set(), True, None)
            return
        item = self._take(index, consume)
        self.both(
            lambda: self.memory.record(self.spec, outcome.for_admission(item.memory)),
            lambda: self.redis.record(self.spec, outcome.for_admission(item.redis)),
        )

    @rule(batch=st.lists(st.tuples(INDICES, OUTCOMES), min_size=1, max_size=4))
    def record_many(self, batch: list[tuple[int, OutcomeDraw]]) -> None:
        if not self.outstanding:
            self._decide(set(), True, None)
            return
        memory_items: list[tuple[RouteSpec, Outcome]] = []
        redis_items: list[tuple[RouteSpec, Outcome]] = []
        for index, outcome in batch:
            if not self.outstanding:
                break
            item = self._take(index, consume=True)
            memory_items.append((self.spec, outcome.for_admission(item.memory)))
            redis_items.append((self.spec, outcome.for_admission(item.redis)))
        self.both(
            lambda: self.memory.record_many(memory_items),
            lambda: self.redis.record_many(redis_items),
        )

    @rule(target_index=st.integers(min_value=0, max_value=4), outcome=OUTCOMES)
    def record_unleased(self, target_index: int, outcome: OutcomeDraw) -> None:
        target_id = self.spec.targets[target_index % len(self.spec.targets)].id
        self.both(
            lambda: self.memory.record(self.spec, outcome.unleased(target_id)),
            lambda: self.redis.record(self.spec, outcome.unleased(target_id)),
        )

    @rule(target_index=st.integers(min_value=0, max_value=9))
    def reset(self, target_index: int) -> None:
        # Indices past the route's targets do nothing: resets stay rarer than failures.
        if target_index >= len(self.spec.targets):
            return
        target_id = self.spec.targets[target_index].id
        self.both(
            lambda: self.memory.reset(self.spec, target_id),
            lambda: self.redis.reset(self.spec, target_id),
        )

    @rule(ms=WAITS_MS)
    def wait(self, ms: int) -> None:
        self.clock.now += ms / 1000

    # ---- the comparison ---------------------------------------------------------------

    @invariant()
    def snapshots_agree(self) -> None:
        if self.route is None:
            return
        expected, actual = self.both(
            lambda: self.memory.snapshot(self.spec),
            lambda: self.redis.snapshot(self.spec),
        )
        assert expected.now_ms == actual.now_ms
        assert_same_snapshot(expected, actual)


@pytest.mark.parametrize("strategy_kind", STRATEGY_KINDS)
def test_redis_state_matches_memory_state(redis_url: str, strategy_kind: str) -> None:
    class Machine(StateMachine):
        pass

    Machine.__name__ = Machine.__qualname__ = f"StateMachine_{strategy_kind}"
    Machine.redis_url = redis_url
    Machine.strategy_kind = strategy_kind
    machine = Machine
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=35,
            stateful_step_count=50,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
