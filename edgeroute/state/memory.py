"""In-process state: the embedded default, the degraded-mode fallback, and the reference model.

`lua/*.lua` implement exactly these semantics; the conformance suite and the property test
hold the two equal, so when in doubt about what the Lua should do, this file is the answer.
Everything is synchronous inside each coroutine, so every call is atomic on one event loop.
"""

from __future__ import annotations

import heapq
import itertools
import os
import time
from collections.abc import Callable, Collection, Sequence

from edgeroute.state import wire
from edgeroute.state.base import RouteSpec, StateHealth, StateView
from edgeroute.strategy import (
    Candidate,
    RoutingDecision,
    Shaping,
    is_held,
    rank,
)
from edgeroute.types import (
    Admission,
    AffinityParams,
    Outcome,
    OutcomeKind,
    RouteSnapshot,
    TargetSnapshot,
    TargetSpec,
)

CLOSED, OPEN, HALF_OPEN = (wire.STATE_CODE[s] for s in wire.STATE_CODES)
_STATES = wire.STATE_CODES
_WINDOWED = frozenset(("latency", "hybrid"))
# wire.EXCLUSION_REASONS codes
_ADMISSIBLE, _BREAKER_OPEN, _RATE_LIMITED, _PROBES_FULL = range(4)
_QUOTA_CONCURRENCY, _QUOTA_RPM, _QUOTA_TPM, _LEARNED_LIMIT = range(4, 8)
# Quota windows (lua/lib.lua quota_*): 1 s buckets; a request counts for the bucket it was
# admitted in and the 60 after it, so no 60 s interval anywhere ever holds more than a quota.
_Q_BUCKET_MS, _Q_SPAN = 1000, 61
_Q_CONCURRENCY_WAIT_MS = 1000  # nothing says when a lease comes back: ask again in 1 s


class _Target:
    __slots__ = (
        "cached_bucket",
        "cached_totals",
        "cooldown_until",
        "est_errors",
        "est_latency",
        "est_ls",
        "est_t",
        "est_tl",
        "est_w",
        "est_wf",
        "est_ws",
        "explores",
        "failures",
        "generation",
        "half_open_successes",
        "inflight",
        "learned_until",
        "open_timeout",
        "open_until",
        "probes",
        "quota",
        "state",
        "window",
    )

    def __init__(self) -> None:
        self.state = CLOSED
        self.generation = 0
        self.failures = 0
        self.half_open_successes = 0
        self.open_until = 0
        self.open_timeout = 0  # 0: the route's base open timeout
        self.cooldown_until = 0
        self.inflight = 0
        self.learned_until = 0
        self.probes: dict[str, int] = {}  # token -> expiry (ms)
        # Quota buckets, oldest first: [bucket, requests, tokens]
        self.quota: list[list[int]] = []
        # Sparse time buckets, oldest first: [bucket, successes, latency_us, failures, tin, tout]
        self.window: list[list[int]] = []
        # Window totals are summed once per bucket and sample, not once per decide.
        self.cached_bucket = -1
        self.cached_totals = (0, 0, 0, 0, 0)
        # The time-decayed estimate: decayed success count, latency sum (us) and failure
        # count, all as of est_t (the last sample, ms); est_tl is the last success (-1: none).
        self.est_t = -1
        self.est_tl = -1
        self.est_ws = 0.0
        self.est_ls = 0.0
        self.est_wf = 0.0
        # Since when the target has had requests in flight without an answer: the last
        # sample, or the admission that found it idle (-1: never).
        self.est_w = -1
        self.explores: dict[str, int] = {}  # token -> expiry (ms): exploration reservations
        # The ratios `estimate` reads, worked out when a sample changes the sums rather than
        # on every decide (every decide reads every target's; samples come far less often).
        self.est_latency = -1.0
        self.est_errors = 0.0

    def refresh_estimate(self) -> None:
        """Latency (us, -1: none) and error rate: ratios of equally decayed sums, so they
        need no decay when read. Call whenever a sum changes."""
        ws, wf = self.est_ws, self.est_wf
        self.est_latency = self.est_ls / ws if ws > 0.0 else -1.0
        self.est_errors = wf / (ws + wf) if ws + wf > 0.0 else 0.0

    def estimate(self, now: int) -> tuple[float, float, int]:
        """(latency us or -1, error rate, age ms or -1)."""
        age = now - self.est_tl if self.est_ws > 0.0 else -1
        return self.est_latency, self.est_errors, age

    def waiting(self, now: int) -> int:
        return now - self.est_w if self.inflight > 0 and self.est_w >= 0 else 0


class _Plan:
    """What a decide reads of its RouteSpec, worked out once per spec against one state's
    records. A RouteSpec is frozen (a reload brings a new one), and a decide visits every
    target on every request: there it reads tuples and locals instead of attribute chains,
    properties and dict lookups."""

    __slots__ = (
        "advances",
        "bucket_ms",
        "max_probes",
        "route",
        "rows",
        "shaping",
        "threshold",
        "weighted",
        "windowed",
    )

    def __init__(
        self, route: RouteSpec, targets: Sequence[_Target], breakers: Sequence[_Target]
    ) -> None:
        self.route = route
        strategy = route.strategy
        self.windowed = strategy.scoring in _WINDOWED
        self.weighted = strategy.kind == "weighted"
        # Whether an advancing decide moves the cursor.
        self.advances = self.windowed or strategy.scoring == "round_robin"
        self.shaping = _shaping(route)
        self.max_probes = route.breaker.half_open_max_probes
        self.threshold = route.breaker.failure_threshold
        self.bucket_ms = route.window.bucket_ms
        # Per target in configuration order: (index, spec, its record, its breaker's holder,
        # no quota). The records stay valid: a route's records are never replaced.
        self.rows = tuple(
            (index, spec, target, breaker, not spec.has_quota)
            for index, (spec, target, breaker) in enumerate(
                zip(route.targets, targets, breakers, strict=True)
            )
        )


class _Route:
    __slots__ = (
        "last_explore",
        "lease_heap",
        "leases",
        "pin_heap",
        "pins",
        "plan",
        "rr_cursor",
        "swrr",
        "targets",
    )

    def __init__(self) -> None:
        self.targets: dict[str, _Target] = {}
        self.plan: _Plan | None = None  # rebuilt when the RouteSpec changes
        self.rr_cursor = 0
        # strategy weighted: each target's smooth weighted round-robin current weight.
        self.swrr: dict[str, int] = {}
        # affinity: session hash -> (pinned target id, expiry ms); the heap orders them by
        # (expiry, hash) like Redis's sorted set (entries no longer current are skipped).
        self.pins: dict[str, tuple[str, int]] = {}
        self.pin_heap: list[tuple[int, str]] = []
        self.last_explore: int | None = None  # the cursor of the last exploration
        self.leases: dict[str, tuple[str, int]] = {}  # token -> (target id, expiry)
        self.lease_heap: list[tuple[int, str]] = []


def _open(target: _Target, now: int, timeout: int) -> None:
    target.state = OPEN
    target.generation += 1
    target.failures = 0
    target.half_open_successes = 0
    target.open_timeout = timeout
    target.open_until = now + timeout
    target.probes.clear()


def _half_open_if_due(target: _Target, now: int) -> None:
    if target.state == OPEN and now >= target.open_until:
        target.state = HALF_OPEN
        target.generation += 1
        target.half_open_successes = 0
        target.probes.clear()


def _live_probes(target: _Target, now: int) -> int:
    expired = [token for token, expiry in target.probes.items() if expiry <= now]
    for token in expired:
        del target.probes[token]
    return len(target.probes)


def _exclusion(
    target: _Target,
    breaker: _Target,
    spec: TargetSpec,
    now: int,
    live_probes: int,
    max_probes: int,
    tokens: int,
) -> tuple[int, int]:
    """Why `target` is not admissible, and for how long: the one statement of the admission
    rules, for decide and explain alike. `breaker` holds its breaker (already moved to
    `now`): the target itself, or its provider's shared one (breaker_scope provider)."""
    if breaker.state == OPEN:
        return _BREAKER_OPEN, breaker.open_until - now
    if target.cooldown_until > now:
        return _RATE_LIMITED, target.cooldown_until - now
    if target.learned_until > now:
        return _LEARNED_LIMIT, target.learned_until - now
    if breaker.state == HALF_OPEN and live_probes >= max_probes:
        return _PROBES_FULL, min(e for e in breaker.probes.values() if e > now) - now
    if spec.has_quota:
        if spec.max_concurrency > 0 and target.inflight >= spec.max_concurrency:
            return _QUOTA_CONCURRENCY, _Q_CONCURRENCY_WAIT_MS
        slots = _quota_slots(target, now)
        requests = sum(slot[1] for slot in slots)
        if spec.rpm > 0 and requests + 1 > spec.rpm:
            return _QUOTA_RPM, _quota_wait(slots, now, 1, requests + 1 - spec.rpm)
        used = sum(slot[2] for slot in slots)
        need = _quota_reserve(spec, tokens)
        if spec.tpm > 0 and used + need > spec.tpm:
            return _QUOTA_TPM, _quota_wait(slots, now, 2, used + need - spec.tpm)
    return _ADMISSIBLE, 0


def _live_explores(target: _Target, now: int) -> int:
    expired = [token for token, expiry in target.explores.items() if expiry <= now]
    for token in expired:
        del target.explores[token]
    return len(target.explores)


def _swrr_step(
    state: _Route, route: RouteSpec, admissible: Sequence[Candidate], chosen: Candidate
) -> None:
    """One smooth weighted round-robin step (nginx's): every admissible target earns its
    weight, the admitted one pays the admissible total. An excluded target earns nothing
    while out, so its share goes to the others in proportion to their weights and it comes
    back without a burst; the current weights always sum to 0."""
    total = 0
    for c in admissible:
        state.swrr[c.target.id] = c.credit
        total += c.target.weight
    state.swrr[chosen.target.id] -= total
    if len(state.swrr) > len(route.targets):  # targets gone from the config
        state.swrr = {k: v for k, v in state.swrr.items() if k in route.positions}


_PIN_EXPIRY_BATCH = 100  # expired pins dropped per decide, as decide.lua


def _pop_pin(state: _Route) -> str | None:
    """Remove and return the current pin with the lowest (expiry, hash)."""
    while state.pin_heap:
        expiry, key = heapq.heappop(state.pin_heap)
        pin = state.pins.get(key)
        if pin is not None and pin[1] == expiry:
            del state.pins[key]
            return key
    return None


def _pin(
    state: _Route, positions: dict[str, int], ordered: list[Candidate], session: str, now: int
) -> tuple[str, str]:
    """Sticky sessions, before admission: drop expired pins (a batch per call), then put the
    session's pinned target first when it is among the admissible ones. Returns what
    happens to the pin (wire.AFFINITY_STATES; "" when nothing is admitted) and, for a
    moved pin, the target it leaves."""
    dropped = 0
    while dropped < _PIN_EXPIRY_BATCH and state.pin_heap and state.pin_heap[0][0] <= now:
        expiry, key = heapq.heappop(state.pin_heap)
        pin = state.pins.get(key)
        if pin is not None and pin[1] == expiry:
            del state.pins[key]
            dropped += 1
    if not ordered:
        return "", ""
    pin = state.pins.get(session)
    if pin is None or pin[1] <= now:
        return "new", ""
    for j, c in enumerate(ordered):
        if c.target.id == pin[0]:
            if j:
                ordered.insert(0, ordered.pop(j))
            return "kept", ""
    # (a pin on a target the route no longer lists names none, as in decide.lua)
    return "moved", pin[0] if pin[0] in positions else ""


def _keep_pin(
    state: _Route, affinity: AffinityParams, session: str, target_id: str, now: int
) -> None:
    """The admitted target holds the pin for `ttl_ms` from now; a new pin first makes room
    (the least recently used go past `max_pins`)."""
    if session not in state.pins:
        over = len(state.pins) + 1 - affinity.max_pins
        for _ in range(max(0, over)):
            _pop_pin(state)
    expiry = now + affinity.ttl_ms
    state.pins[session] = (target_id, expiry)
    heapq.heappush(state.pin_heap, (expiry, session))


def _shaping(route: RouteSpec) -> Shaping:
    estimator = route.estimator
    return Shaping(
        estimator.load_penalty,
        estimator.tolerance,
        estimator.explore_after_ms,
        estimator.explore_max,
    )


def _may_explore(state: _Route, route: RouteSpec, cursor: int) -> bool:
    """The fleet-wide share: one exploration per `explore_every` advancing decides."""
    last = state.last_explore
    return last is None or cursor - last >= route.estimator.explore_every


def _quota_slots(target: _Target, now: int) -> list[list[int]]:
    """The target's quota buckets that still count at `now` (dropping the others)."""
    oldest = now // _Q_BUCKET_MS - _Q_SPAN
    quota = target.quota
    while quota and quota[0][0] <= oldest:
        quota.pop(0)
    return quota


def _quota_wait(slots: list[list[int]], now: int, column: int, over: int) -> int:
    """How long until `over` requests (column 1) or tokens (column 2) have aged out."""
    freed = 0
    for slot in slots:
        freed += slot[column]
        if freed >= over:
            return (slot[0] + _Q_SPAN) * _Q_BUCKET_MS - now
    return _Q_SPAN * _Q_BUCKET_MS


def _quota_reserve(spec: TargetSpec, tokens: int) -> int:
    """The estimate, at least 1, at most the whole quota (a request larger than a
    provider's minute still goes out, alone)."""
    return min(max(tokens, 1), spec.tpm) if spec.tpm > 0 else 0


def _quota_add(target: _Target, now: int, requests: int, tokens: int, at: int) -> None:
    """Count requests and tokens in the bucket of `at` (a negative `tokens` corrects a
    reservation: lost if that bucket no longer counts, and never below 0)."""
    slots = _quota_slots(target, now)
    bucket = at // _Q_BUCKET_MS
    slot = next((s for s in slots if s[0] == bucket), None)
    if slot is None:
        if tokens < 0:
            return
        bucket = now // _Q_BUCKET_MS
        if slots and slots[-1][0] == bucket:
            slot = slots[-1]
        else:
            slot = [bucket, 0, 0]
            slots.append(slot)
    slot[1] += requests
    slot[2] = max(0, slot[2] + tokens)


def _window_totals(target: _Target, now: int, route: RouteSpec) -> tuple[int, int, int, int, int]:
    bucket = now // route.window.bucket_ms
    if target.cached_bucket == bucket:
        return target.cached_totals
    oldest = bucket - route.window.buckets
    successes = latency = failures = tin = tout = 0
    for slot_bucket, s, lat, f, i, o in target.window:
        if slot_bucket > oldest:
            successes += s
            latency += lat
            failures += f
            tin += i
            tout += o
    totals = (successes, latency, failures, tin, tout)
    target.cached_bucket = bucket
    target.cached_totals = totals
    return totals


def _add_estimate(
    target: _Target, route: RouteSpec, outcome: Outcome, now: int, explored: bool, sample_us: int
) -> None:
    """Decay the sums to `now` (half-life), then add the sample (`sample_us`: a success's
    latency_us). An exploration's success replaces the latency estimate: it was re-measured
    because the old one was stale."""
    if target.est_t >= 0 and now > target.est_t:
        decay = 0.5 ** ((now - target.est_t) / route.estimator.half_life_ms)
        target.est_ws = target.est_ws * decay
        target.est_ls = target.est_ls * decay
        target.est_wf = target.est_wf * decay
    if outcome.kind == OutcomeKind.SUCCESS:
        if explored:
            target.est_ws = 0.0
            target.est_ls = 0.0
        target.est_ws = target.est_ws + 1.0
        target.est_ls = target.est_ls + sample_us
        target.est_tl = now
    else:
        target.est_wf = target.est_wf + 1.0
    if now > target.est_t:
        target.est_t = now
    target.est_w = now  # an answer: whatever is still out was sent before now
    target.refresh_estimate()


class MemoryState:
    """State for one process. `clock` returns seconds; tests pass a controllable one."""

    name = "memory"

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock or time.monotonic
        self._routes: dict[str, _Route] = {}
        # breaker_scope provider: one breaker per provider, shared by every such route (in
        # Redis, routes sharing a provider share one hash tag, so this is the same scope).
        self._providers: dict[str, _Target] = {}
        self._token_prefix = os.urandom(4).hex() + "-"
        self._tokens = itertools.count(1)

    def _now(self) -> int:
        return int(self._clock() * 1000)

    def _route(self, name: str) -> _Route:
        route = self._routes.get(name)
        if route is None:
            route = self._routes[name] = _Route()
        return route

    def _breaker(self, route: RouteSpec, target_id: str, target: _Target) -> _Target:
        """What holds a target's breaker fields: itself, or its provider's shared record."""
        provider = route.breaker_provider(target_id)
        if not provider:
            return target
        shared = self._providers.get(provider)
        if shared is None:
            shared = self._providers[provider] = _Target()
        return shared

    def _plan(self, state: _Route, route: RouteSpec) -> _Plan:
        targets = [self._target(state, spec.id) for spec in route.targets]
        breakers = [
            self._breaker(route, spec.id, target)
            for spec, target in zip(route.targets, targets, strict=True)
        ]
        return _Plan(route, targets, breakers)

    @staticmethod
    def _target(route: _Route, target_id: str) -> _Target:
        target = route.targets.get(target_id)
        if target is None:
            target = route.targets[target_id] = _Target()
        return target

    async def decide(
        self,
        route: RouteSpec,
        *,
        exclude: Collection[str] = (),
        outcome: Outcome | None = None,
        advance: bool = True,
        limit: int = 0,
        tokens: int = 0,
        session: str = "",
    ) -> RoutingDecision:
        return self.decide_now(
            route,
            exclude=exclude,
            outcome=outcome,
            advance=advance,
            limit=limit,
            tokens=tokens,
            session=session,
        )

    def decide_now(
        self,
        route: RouteSpec,
        *,
        exclude: Collection[str] = (),
        outcome: Outcome | None = None,
        advance: bool = True,
        limit: int = 0,
        tokens: int = 0,
        session: str = "",
    ) -> RoutingDecision:
        """Synchronous decide: the gateway's degraded mode calls it without an await."""
        now = self._now()
        state = self._routes.get(route.name) or self._route(route.name)
        if outcome is not None:
            self._apply(state, route, outcome, now)
        if state.lease_heap and state.lease_heap[0][0] <= now:
            self._expire_leases(state, now)
        plan = state.plan
        if plan is None or plan.route is not route:
            plan = state.plan = self._plan(state, route)
        windowed = plan.windowed
        weighted = plan.weighted
        if advance and plan.advances:
            state.rr_cursor += 1
        max_probes = plan.max_probes
        threshold = plan.threshold
        bucket = now // plan.bucket_ms
        candidates: list[Candidate] = []
        explores: list[int] = []
        wait = 0
        quota_out = False
        for index, spec, target, b, unlimited in plan.rows:
            code = b.state
            if code == OPEN and now >= b.open_until:
                _half_open_if_due(b, now)
                code = b.state
            if exclude and spec.id in exclude:
                continue
            # The common case first: a closed breaker, no cooldown, no learned limit and no
            # quota leave nothing for _exclusion to find; everything else asks it.
            if not (
                code == CLOSED
                and unlimited
                and target.cooldown_until <= now
                and target.learned_until <= now
            ):
                live = _live_probes(b, now) if code == HALF_OPEN else 0
                reason, pause = _exclusion(target, b, spec, now, live, max_probes, tokens)
                if reason != _ADMISSIBLE:
                    wait = pause if wait == 0 else min(wait, pause)
                    quota_out = quota_out or reason >= _QUOTA_CONCURRENCY
                    continue
            inflight = target.inflight
            failures = b.failures
            held = code == CLOSED and failures > 0 and is_held(failures, inflight, threshold)
            credit = state.swrr.get(spec.id, 0) + spec.weight if weighted else 0
            if windowed:
                if target.cached_bucket == bucket:
                    successes, latency, failed, _, _ = target.cached_totals
                else:
                    successes, latency, failed, _, _ = _window_totals(target, now, route)
                # (_Target.estimate and .waiting, inlined: two method calls per target and
                # decide otherwise)
                candidates.append(
                    Candidate(
                        spec,
                        index,
                        _STATES[code],
                        code == HALF_OPEN,
                        successes,
                        latency,
                        failed,
                        inflight,
                        0.0,
                        held,
                        target.est_latency,
                        target.est_errors,
                        now - target.est_tl if target.est_ws > 0.0 else -1,
                        False,
                        now - target.est_w if inflight > 0 and target.est_w >= 0 else 0,
                        credit,
                    )
                )
                # (dropping expired reservations is part of the decide, as in decide.lua)
                explores.append(_live_explores(target, now) if target.explores else 0)
            else:
                candidates.append(
                    Candidate(
                        spec,
                        index,
                        _STATES[code],
                        code == HALF_OPEN,
                        0,
                        0,
                        0,
                        inflight,
                        0.0,
                        held,
                        credit=credit,
                    )
                )
        cursor = state.rr_cursor
        may_explore = windowed and advance and _may_explore(state, route, cursor)
        strategy = route.strategy
        ordered = rank(
            strategy, candidates, cursor, plan.shaping, explores if may_explore else None
        )
        sticky = route.affinity is not None and session != ""
        pin: tuple[str, str] = ("", "")
        if sticky:
            # Only the target ranked first may be an exploration (a half-open probe ahead of
            # it cancels it), and then only if the pin leaves it first (decide.lua alike).
            for c in ordered[1:]:
                c.explore = False
            pin = _pin(state, route.positions, ordered, session, now)
        if not ordered:
            return RoutingDecision(
                route.name,
                strategy,
                ordered,
                None,
                wait / 1000.0,
                cursor,
                quota_limited=quota_out,
            )
        first = ordered[0]
        if may_explore:  # (only then may rank have marked an exploration)
            for c in ordered[1:]:
                c.explore = False  # a half-open probe went first: nothing is explored
        _, _, target, b, _ = plan.rows[first.index]
        token = f"{self._token_prefix}{next(self._tokens):x}"
        if first.probe:
            b.probes[token] = now + route.breaker.probe_ttl_ms
        if first.explore:
            target.explores[token] = now + route.estimator.explore_ttl_ms
            state.last_explore = cursor
        if windowed and target.inflight == 0:
            target.est_w = now  # busy from now: nothing outstanding before
        target.inflight += 1
        expiry = now + route.lease_ttl_ms
        state.leases[token] = (first.target.id, expiry)
        heapq.heappush(state.lease_heap, (expiry, token))
        reserved = 0
        if first.target.has_quota:
            reserved = _quota_reserve(first.target, tokens)
            _quota_add(target, now, 1, reserved, now)
        if weighted and advance:
            _swrr_step(state, route, ordered, first)
        if sticky:
            assert route.affinity is not None
            _keep_pin(state, route.affinity, session, first.target.id, now)
        admission = Admission(
            first.target.id, b.generation, token, first.probe, reserved, now if reserved else 0
        )
        admissible = len(ordered)
        if 0 < limit < admissible:
            ordered = ordered[:limit]
        return RoutingDecision(
            route.name,
            strategy,
            ordered,
            admission,
            0.0,
            cursor,
            admissible,
            affinity=pin[0],
            pin_moved_from=pin[1],
        )

    def _expire_leases(self, state: _Route, now: int) -> None:
        heap = state.lease_heap
        while heap and heap[0][0] <= now:
            _, token = heapq.heappop(heap)
            lease = state.leases.pop(token, None)
            if lease is not None:
                state.targets[lease[0]].inflight -= 1

    async def record(self, route: RouteSpec, outcome: Outcome) -> None:
        self.record_now(route, outcome)

    def record_now(self, route: RouteSpec, outcome: Outcome) -> None:
        self._apply(self._route(route.name), route, outcome, self._now())

    async def record_many(self, items: Sequence[tuple[RouteSpec, Outcome]]) -> None:
        now = self._now()
        for route, outcome in items:
            self._apply(self._route(route.name), route, outcome, now)

    def _apply(self, state: _Route, route: RouteSpec, outcome: Outcome, now: int) -> None:
        target_id = outcome.target_id
        target = state.targets.get(target_id) or self._target(state, target_id)
        # (the checks in front of _breaker and _half_open_if_due spare a call per outcome)
        b = target if route.breaker_scope != "provider" else self._breaker(route, target_id, target)
        if b.state == OPEN:
            _half_open_if_due(b, now)
        token = outcome.token
        explored = False
        if token is not None:
            lease = state.leases.get(token)
            if lease is not None and lease[0] == target_id:  # as Lua's ZREM id|token
                del state.leases[token]
                target.inflight -= 1
            if outcome.probe:
                b.probes.pop(token, None)
            if target.explores:
                explored = target.explores.pop(token, None) is not None
        kind = outcome.kind
        if kind != OutcomeKind.NEUTRAL:
            sample_us = latency_us(outcome.latency_ms) if kind == OutcomeKind.SUCCESS else 0
            self._add_sample(target, route, outcome, now, sample_us)
            _add_estimate(target, route, outcome, now, explored, sample_us)
        if kind == OutcomeKind.RATE_LIMITED and outcome.retry_after_s > 0:
            # A later, shorter Retry-After never shortens a cooldown already in force.
            until = now + min(round(outcome.retry_after_s * 1000), route.max_cooldown_ms)
            target.cooldown_until = max(target.cooldown_until, until)
        if outcome.limit_reset_s > 0:
            # The provider's rate-limit headers said 0 remaining until this reset.
            until = now + min(round(outcome.limit_reset_s * 1000), route.max_cooldown_ms)
            target.learned_until = max(target.learned_until, until)
        if outcome.reserved_tokens > 0:
            # Replace the decide's estimate with the real usage when the provider reported
            # it; give it back when the provider served nothing.
            used = outcome.input_tokens + outcome.output_tokens
            if used > 0 or kind in (OutcomeKind.FAILURE, OutcomeKind.RATE_LIMITED):
                _quota_add(target, now, 0, used - outcome.reserved_tokens, outcome.reserved_at_ms)
        if outcome.generation not in (-1, b.generation):
            return  # admitted before a transition: too late to move this breaker
        breaker = route.breaker
        if b.state == CLOSED:
            if kind == OutcomeKind.SUCCESS:
                b.failures = 0
            elif kind == OutcomeKind.FAILURE:
                b.failures += 1
                if b.failures >= breaker.failure_threshold:
                    _open(b, now, breaker.open_timeout_ms)
        elif b.state == HALF_OPEN:
            if kind == OutcomeKind.SUCCESS:
                b.half_open_successes += 1
                if b.half_open_successes >= breaker.success_threshold:
                    b.state = CLOSED
                    b.generation += 1
                    b.failures = 0
                    b.half_open_successes = 0
                    b.open_timeout = 0
                    b.probes.clear()
            elif kind == OutcomeKind.FAILURE:
                previous = b.open_timeout or breaker.open_timeout_ms
                _open(b, now, min(previous * 2, breaker.max_open_timeout_ms))

    @staticmethod
    def _add_sample(
        target: _Target, route: RouteSpec, outcome: Outcome, now: int, sample_us: int
    ) -> None:
        bucket = now // route.window.bucket_ms
        oldest = bucket - route.window.buckets
        window = target.window
        while window and window[0][0] <= oldest:
            window.pop(0)
        if not window or window[-1][0] != bucket:
            window.append([bucket, 0, 0, 0, 0, 0])
        slot = window[-1]
        if outcome.kind == OutcomeKind.SUCCESS:
            slot[1] += 1
            slot[2] += sample_us
        else:
            slot[3] += 1
        slot[4] += outcome.input_tokens
        slot[5] += outcome.output_tokens
        target.cached_bucket = -1

    async def explain(self, route: RouteSpec) -> StateView:
        return self.explain_now(route)

    def explain_now(self, route: RouteSpec) -> StateView:
        """A dry-run decide at this instant: the same rules and ranking, nothing changed."""
        now = self._now()
        state = self._routes.get(route.name) or _Route()
        stale: dict[str, int] = {}
        for target_id, expiry in state.leases.values():
            if expiry <= now:
                stale[target_id] = stale.get(target_id, 0) + 1
        strategy = route.strategy
        windowed = strategy.scoring in _WINDOWED
        weighted = strategy.kind == "weighted"
        breaker = route.breaker
        candidates: list[Candidate] = []
        explore_slots: list[int] = []
        rows: list[TargetSnapshot] = []
        wait = 0
        for index, spec in enumerate(route.targets):
            stored = state.targets.get(spec.id) or _Target()
            # The target as a decide at `now` would see it, on a copy: explain changes nothing.
            target = _Target()
            for slot in _Target.__slots__:
                setattr(target, slot, getattr(stored, slot))
            target.probes = {t: e for t, e in stored.probes.items() if e > now}
            target.quota = [list(slot) for slot in stored.quota]
            target.inflight -= stale.get(spec.id, 0)
            b = target
            provider = route.breaker_provider(spec.id)
            if provider:  # the shared breaker, on a copy of its own
                shared = self._providers.get(provider) or _Target()
                b = _Target()
                b.state, b.generation, b.failures = shared.state, shared.generation, shared.failures
                b.half_open_successes = shared.half_open_successes
                b.open_until, b.open_timeout = shared.open_until, shared.open_timeout
                b.probes = {t: e for t, e in shared.probes.items() if e > now}
            _half_open_if_due(b, now)
            code = b.state
            live = len(b.probes) if code == HALF_OPEN else 0
            reason, pause = _exclusion(target, b, spec, now, live, breaker.half_open_max_probes, 0)
            successes, latency, failures, tin, tout = _window_totals(stored, now, route)
            estimate, errors, age = target.estimate(now)
            explores = sum(1 for e in stored.explores.values() if e > now)
            stale_estimate = estimate < 0.0 or age > route.estimator.explore_after_ms
            if reason != _ADMISSIBLE:
                wait = pause if wait == 0 else min(wait, pause)
            else:
                candidate = Candidate(
                    spec,
                    index,
                    _STATES[code],
                    code == HALF_OPEN,
                    successes if windowed else 0,
                    latency if windowed else 0,
                    failures if windowed else 0,
                    target.inflight,
                    0.0,
                    code == CLOSED
                    and is_held(b.failures, target.inflight, breaker.failure_threshold),
                )
                if windowed:
                    candidate.estimate_us = estimate
                    candidate.error_rate = errors
                    candidate.estimate_age_ms = age
                    candidate.waiting_ms = target.waiting(now)
                    explore_slots.append(explores)
                if weighted:
                    candidate.credit = state.swrr.get(spec.id, 0) + spec.weight
                candidates.append(candidate)
            rows.append(
                TargetSnapshot(
                    target_id=spec.id,
                    state=_STATES[code],
                    generation=b.generation,
                    consecutive_failures=b.failures if code == CLOSED else 0,
                    half_open_successes=b.half_open_successes if code == HALF_OPEN else 0,
                    open_remaining_ms=max(0, b.open_until - now) if code == OPEN else 0,
                    open_timeout_ms=b.open_timeout or breaker.open_timeout_ms,
                    cooldown_remaining_ms=max(0, target.cooldown_until - now),
                    inflight=target.inflight,
                    probes_in_use=live,
                    successes=successes,
                    failures=failures,
                    latency_sum_us=latency,
                    input_tokens=tin,
                    output_tokens=tout,
                    excluded=wire.EXCLUSION_REASONS[reason],
                    excluded_ms=max(0, pause),
                    estimate_us=None if estimate < 0.0 else estimate,
                    error_rate=errors,
                    estimate_age_ms=None if age < 0 else age,
                    explorations_in_use=explores,
                    stale=stale_estimate,
                    waiting_ms=target.waiting(now),
                    current_weight=state.swrr.get(spec.id, 0),
                )
            )
        # The next advancing decide moves the cursor first: rank and report with that one.
        moves = strategy.scoring == "round_robin" or windowed
        cursor = state.rr_cursor + (1 if moves else 0)
        may_explore = windowed and _may_explore(state, route, cursor)
        ordered = rank(
            strategy, candidates, cursor, _shaping(route), explore_slots if may_explore else None
        )
        for c in ordered[1:]:
            c.explore = False  # only the next request's target can be an exploration
        decision = RoutingDecision(route.name, strategy, ordered, None, wait / 1000.0, cursor)
        pins = sum(1 for _, expiry in state.pins.values() if expiry > now)
        return StateView(decision, RouteSnapshot(route.name, cursor, now, rows, pins))

    async def snapshot(self, route: RouteSpec) -> RouteSnapshot:
        return self.explain_now(route).snapshot

    def health(self) -> StateHealth:
        return StateHealth("memory", "local")

    async def reset(self, route: RouteSpec, target_id: str) -> None:
        target = self._target(self._route(route.name), target_id)
        b = self._breaker(route, target_id, target)
        b.state = CLOSED
        b.generation += 1
        b.failures = 0
        b.half_open_successes = 0
        b.open_until = 0
        b.open_timeout = 0
        b.probes.clear()
        target.cooldown_until = 0
        target.learned_until = 0

    async def close(self) -> None:
        return None


def latency_us(latency_ms: float) -> int:
    """Latency travels as integer microseconds so Lua and Python sum exactly the same."""
    return max(0, round(latency_ms * 1000))
