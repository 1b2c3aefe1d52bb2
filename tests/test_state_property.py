"""MemoryState is the oracle for RedisState: random operation sequences, run side by side.

A hypothesis rule-based state machine drives one route through both backends with the very
same operations (decide with excludes and piggy-backed outcomes, record / record_many of
outstanding admissions - late ones included -, unleased breaker-API outcomes, reset, and
"wait past the open timeout") and, after every step, holds the decision and the full
snapshot of the two equal.

Time: RedisState lives on Redis TIME, MemoryState on the wall clock (corrected by the offset
measured against Redis TIME when the example starts). The two backends see every operation
a little apart, so each timing boundary (a breaker's open timeout, a cooldown's end) is an
interval: from where the model puts it to where Redis does. Before each step the machine
sleeps past any boundary closer than `MARGIN_MS`; a step that straddles one anyway (the
process was descheduled on a loaded machine) cannot be judged, and neither can a step that
took so long that a boundary it created itself may have passed before the snapshot learnt
of it: from there on the example compares nothing more (it still draws the same data, so
hypothesis sees a deterministic test), and it never fails for it. Probe reservations, leases
and the rolling window are sized in minutes, far from any edge. Remaining-time fields are
compared as zero / non-zero and to within the longest step a judged example may take.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import warnings
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
    precondition,
    rule,
    run_state_machine_as_test,
)

from edgeroute.state.base import RouteSpec
from edgeroute.state.memory import MemoryState
from edgeroute.state.redis import RedisState, route_keys
from edgeroute.strategy import STRATEGY_KINDS, RoutingDecision, RoutingStrategy
from edgeroute.types import (
    Admission,
    BreakerParams,
    CircuitState,
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
WAIT_MS = OPEN_TIMEOUT_MS + 60
MARGIN_MS = 25.0  # no step starts closer than this to a known timing boundary
SLACK_MS = 3.0  # clock granularity (whole ms on both sides) and offset measurement error
# A step (its operation and the snapshots after it) must finish well within the shortest
# timing constant (a 50 ms cooldown): a boundary it creates is only learnt from the snapshot.
STEP_LIMIT_MS = 40.0
MAX_WAITS = 6  # per example: keeps the whole file well under a minute
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
# 0.05 s and 0.3 s cooldowns end inside an example (boundaries the machine steps around);
# 30 s ones outlast it; 0 means a 429 without Retry-After (no cooldown).
RETRY_AFTERS = st.sampled_from([0.0, 0.0, 0.05, 0.3, 30.0])
TOKENS = st.integers(min_value=0, max_value=2_000)
PRICES = st.one_of(
    st.sampled_from([0.0, 0.5, 1.0, 2.5, 10.0]),
    st.floats(min_value=0.0, max_value=60.0, allow_nan=False, allow_infinity=False),
)
WEIGHTS = st.sampled_from([0.0, 0.1, 0.2, 0.25, 1 / 3, 0.4, 0.5, 0.7, 1.0])
INDICES = st.integers(min_value=0, max_value=1_000)  # taken modulo the current list length


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
        f" ok={c.successes} lat={c.latency_sum_us} f={c.failures} inf={c.inflight}]"
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
    assert (actual.admission is None) == (memory.admission is None), f"admission differs{detail}"
    if memory.admission is not None and actual.admission is not None:
        assert (
            actual.admission.target_id,
            actual.admission.generation,
            actual.admission.probe,
        ) == (
            memory.admission.target_id,
            memory.admission.generation,
            memory.admission.probe,
        ), f"admission differs{detail}"
    assert (actual.retry_after_s > 0) == (memory.retry_after_s > 0), f"wait differs{detail}"
    assert actual.rr_cursor == memory.rr_cursor, f"rr_cursor differs{detail}"
    assert actual.admissible == memory.admissible, f"admissible count differs{detail}"


def assert_same_snapshot(memory: RouteSnapshot, actual: RouteSnapshot) -> None:
    assert actual.rr_cursor == memory.rr_cursor, (
        f"rr_cursor: memory {memory.rr_cursor} redis {actual.rr_cursor}"
    )
    for expected, got in zip(memory.targets, actual.targets, strict=True):
        assert got.target_id == expected.target_id

        def view(t: Any) -> dict[str, Any]:
            return {
                "state": t.state,
                "generation": t.generation,
                "consecutive_failures": t.consecutive_failures,
                "half_open_successes": t.half_open_successes,
                "open_timeout_ms": t.open_timeout_ms,
                "open_remaining>0": t.open_remaining_ms > 0,
                "cooldown_remaining>0": t.cooldown_remaining_ms > 0,
                "inflight": t.inflight,
                "probes_in_use": t.probes_in_use,
                "successes": t.successes,
                "failures": t.failures,
                "latency_sum_us": t.latency_sum_us,
                "input_tokens": t.input_tokens,
                "output_tokens": t.output_tokens,
            }

        want, have = view(expected), view(got)
        diff = {k: (want[k], have[k]) for k in want if want[k] != have[k]}
        # Remaining times differ by how far apart the backends saw the operation that set
        # them and the snapshot: both within one step, and a step is at most STEP_LIMIT_MS.
        for name in ("open_remaining_ms", "cooldown_remaining_ms"):
            mine, theirs = getattr(expected, name), getattr(got, name)
            if abs(mine - theirs) > STEP_LIMIT_MS + SLACK_MS:
                diff[name] = (mine, theirs)
        assert not diff, f"{got.target_id}: snapshot differs (memory, redis): {diff}"


class StateMachine(RuleBasedStateMachine):
    """One route, two backends, one sequence of operations."""

    redis_url: ClassVar[str]
    strategy_kind: ClassVar[str]
    examples: ClassVar[int] = 0
    tainted_examples: ClassVar[int] = 0

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.prefix = f"test-{uuid.uuid4().hex[:12]}"
        self.redis = RedisState(self.redis_url, key_prefix=self.prefix, timeout_ms=5_000)
        self.offset_s = 0.0
        self.memory = MemoryState(clock=self._memory_clock)
        self.route: RouteSpec | None = None
        self.outstanding: list[Outstanding] = []
        # (earliest, latest) ms, Redis-TIME frame, at which the backends change by themselves
        self.boundaries: set[tuple[float, float]] = set()
        self.step_started: float | None = None
        self.tainted = False  # a step could not be judged: the backends may now differ
        self.waits = 0
        self.labels = 0
        self.last: RouteSnapshot | None = None  # the model's snapshot after the last step

    # ---- plumbing ---------------------------------------------------------------------

    def _memory_clock(self) -> float:
        return time.time() + self.offset_s

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    @property
    def spec(self) -> RouteSpec:
        assert self.route is not None
        return self.route

    def _now_ms(self) -> float:
        return self._memory_clock() * 1000

    def settle(self) -> None:
        """Sleep past any timing boundary closer than MARGIN_MS (either side)."""
        while True:
            now = self._now_ms()
            near = [hi for lo, hi in self.boundaries if lo - MARGIN_MS <= now <= hi + MARGIN_MS]
            if not near:
                break
            time.sleep((max(near) + MARGIN_MS - now) / 1000 + 0.001)
        now = self._now_ms()
        self.boundaries = {(lo, hi) for lo, hi in self.boundaries if hi + SLACK_MS > now}

    def both(
        self,
        memory_call: Callable[[], Coroutine[Any, Any, T]],
        redis_call: Callable[[], Coroutine[Any, Any, U]],
        *,
        ends_step: bool = False,
    ) -> tuple[T, U] | None:
        """One operation on each backend, or None once a step straddled a boundary.

        A rule's operation settles first; the snapshot that ends a step with an operation
        must not (a boundary the operation created is not known yet) and instead bounds the
        step's duration.
        """
        if self.tainted:
            return None
        if not ends_step or self.step_started is None:
            self.settle()
        start = self._now_ms()
        if self.step_started is None:
            self.step_started = start
        expected = self.run(memory_call())
        actual = self.run(redis_call())
        end = self._now_ms()
        for lo, hi in self.boundaries:
            if lo - SLACK_MS <= end and start <= hi + SLACK_MS:
                self.tainted = True  # the two backends may legitimately disagree now
        if ends_step:
            began, self.step_started = self.step_started, None
            if end - began > STEP_LIMIT_MS:
                self.tainted = True  # descheduled mid-step: a fresh boundary may have passed
        return None if self.tainted else (expected, actual)

    def teardown(self) -> None:
        type(self).examples += 1
        type(self).tainted_examples += self.tainted
        try:
            self.run(self.redis.close())
            if self.route is not None:
                client = redis.Redis.from_url(self.redis_url)
                try:
                    client.delete(*route_keys(self.prefix, self.route.name))
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
    )
    def setup_route(
        self,
        prices: list[float],
        failure_threshold: int,
        success_threshold: int,
        half_open_max_probes: int,
        weights: tuple[float, float, float],
    ) -> None:
        if self.strategy_kind == "hybrid":
            strategy = RoutingStrategy.hybrid(
                cost_weight=weights[0], latency_weight=weights[1], reliability_weight=weights[2]
            )
        else:
            strategy = RoutingStrategy.named(self.strategy_kind)
        self.route = RouteSpec(
            name=f"route-{uuid.uuid4().hex[:8]}",
            strategy=strategy,
            targets=tuple(
                TargetSpec(id=f"t{i}", provider=f"p{i}", model=f"m{i}", price_per_mtok=price)
                for i, price in enumerate(prices)
            ),
            breaker=BreakerParams(
                failure_threshold=failure_threshold,
                open_timeout_ms=OPEN_TIMEOUT_MS,
                success_threshold=success_threshold,
                half_open_max_probes=half_open_max_probes,
                max_open_timeout_ms=MAX_OPEN_TIMEOUT_MS,
                probe_ttl_ms=600_000,
            ),
            window=WindowParams(bucket_ms=5_000, buckets=12),
            lease_ttl_ms=600_000,
            idle_ttl_ms=120_000,
        )
        # Align the model's clock with Redis TIME (the same host clock, normally ~0 ms).
        before = time.time()
        snapshot = self.run(self.redis.snapshot(self.spec))
        after = time.time()
        self.offset_s = snapshot.now_ms / 1000 - (before + after) / 2

    # ---- operations -------------------------------------------------------------------

    @rule(
        exclude=st.sets(st.integers(min_value=0, max_value=4), max_size=3),
        advance=st.booleans(),
        piggyback=st.none() | st.tuples(INDICES, OUTCOMES),
        limit=st.sampled_from([0, 0, 1, 2]),
    )
    def decide(
        self,
        exclude: set[int],
        advance: bool,
        piggyback: tuple[int, OutcomeDraw] | None,
        limit: int,
    ) -> None:
        self._decide(exclude, advance, piggyback, limit)

    def _decide(
        self,
        exclude: set[int],
        advance: bool,
        piggyback: tuple[int, OutcomeDraw] | None,
        limit: int = 0,
    ) -> None:
        route = self.spec
        excluded = [t.id for i, t in enumerate(route.targets) if i in exclude]
        memory_outcome = redis_outcome = None
        if piggyback is not None and self.outstanding:
            item = self._take(piggyback[0], consume=True)
            memory_outcome = piggyback[1].for_admission(item.memory)
            redis_outcome = piggyback[1].for_admission(item.redis)
        pair = self.both(
            lambda: self.memory.decide(
                route, exclude=excluded, outcome=memory_outcome, advance=advance, limit=limit
            ),
            lambda: self.redis.decide(
                route, exclude=excluded, outcome=redis_outcome, advance=advance, limit=limit
            ),
        )
        if pair is None:
            return
        expected, actual = pair
        assert_same_decision(expected, actual)
        self._admitted(expected, actual)

    # Rules carry no state-dependent preconditions: the state depends on wall-clock time,
    # so a replay (shrinking) must draw the same data whatever the breakers did meanwhile.
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

    @precondition(lambda self: self.waits < MAX_WAITS)
    @rule()
    def wait_past_open_timeout(self) -> None:
        self.waits += 1
        if self.tainted:
            return
        # Only worth the time when some breaker is open (per the model, which agrees).
        if self.last is not None and any(t.state is CircuitState.OPEN for t in self.last.targets):
            time.sleep(WAIT_MS / 1000)

    # ---- the comparison ---------------------------------------------------------------

    @invariant()
    def snapshots_agree(self) -> None:
        if self.route is None:
            return
        pair = self.both(
            lambda: self.memory.snapshot(self.spec),
            lambda: self.redis.snapshot(self.spec),
            ends_step=True,
        )
        if pair is None:
            return
        expected, actual = pair
        assert_same_snapshot(expected, actual)
        self.last = expected
        # Where each backend will change by itself: the model's instant and Redis's.
        for mine, theirs in zip(expected.targets, actual.targets, strict=True):
            for m_left, r_left in (
                (mine.open_remaining_ms, theirs.open_remaining_ms),
                (mine.cooldown_remaining_ms, theirs.cooldown_remaining_ms),
            ):
                if m_left > 0 or r_left > 0:
                    at = (expected.now_ms + m_left, actual.now_ms + r_left)
                    self.boundaries.add((min(at), max(at)))


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
    if machine.tainted_examples * 2 > machine.examples:
        warnings.warn(
            f"{machine.tainted_examples} of {machine.examples} examples hit a timing boundary"
            " mid-step (a heavily loaded machine?) and were only partly compared",
            stacklevel=1,
        )
