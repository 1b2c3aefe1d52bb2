"""`edgeroute simulate`: routing proved in virtual time, against an oracle and round-robin.

A discrete-event simulation drives the REAL state code - `MemoryState`, or `RedisState`
through its injected clock (the scripts' `clock_ms`) - with an open-loop client, through
scenarios where each upstream's latency, error rate and capacity change over time. Nothing
sleeps: minutes of traffic take seconds of CPU, and a run is deterministic for a seed.

Every request is routed the way the gateway does it (`failover.py`): an advancing decide
with `limit=2`; a failed attempt is reported by the next, non-advancing decide that excludes
what was tried, up to `max_attempts`; a success is recorded. Three policies see the very
same arrivals and the same luck (jitter, errors):

- edgeroute: the scenario's route (strategy and `latency:`/`breaker:` config) on the state;
- round_robin: the same route with strategy round_robin (breakers included);
- oracle: knows every upstream's true latency, load and error rate at each instant and
  picks the best (latency: lowest expected latency; hybrid: the seed formula on true
  numbers), with the same failover.

A scenario file (YAML) holds `scenarios:`, each like the built-in ones below (`upstreams`,
`events`, optional `latency:`, `breaker:`, `weights:`, `focus`, `degraded`, `goals`).
"""

from __future__ import annotations

import asyncio
import heapq
import math
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import yaml

from edgeroute.config import BreakerConfig, Config, LatencyConfig, parse_config
from edgeroute.errors import ConfigError
from edgeroute.router import compile_route
from edgeroute.state.base import RouteSpec, StateBackend
from edgeroute.types import Admission, CircuitState, Outcome, OutcomeKind

TOKENS_PER_REQUEST = 1_000  # what a request costs: price_per_mtok x this / 1e6
POLICIES = ("edgeroute", "oracle", "round_robin")
SHARE_WINDOW_S = 1.0  # traffic shares (leave / come back) are measured over 1 s of arrivals


class Upstream(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    latency_ms: float
    price: float = 1.0
    error_rate: float = 0.0
    # Concurrent requests it serves at full speed; beyond, latency grows with concurrency
    # (latency x in-flight / capacity). 0: unlimited.
    capacity: int = 0
    # How long a failed request takes (an HTTP 500 answers fast).
    fail_latency_ms: float = 20.0
    # strategy priority: its group (targets[].priority); strategy weighted: its share.
    priority: int | None = None
    weight: int | None = None


class Event(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    at_s: float
    target: str
    latency_ms: float | None = None
    error_rate: float | None = None
    capacity: int | None = None


class Goal(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A PASS/MISS target on one metric of the edgeroute run (see `METRICS`)."""

    metric: str
    limit: float
    higher: bool = False  # the figure must be at least `limit` (else at most)
    label: str = ""


class Scenario(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    description: str = ""
    strategy: str = "latency"
    within: str | None = None  # strategy priority: what orders a group
    rate: float = 40.0  # open-loop arrivals per second (Poisson)
    duration_s: float = 60.0
    upstreams: list[Upstream]
    events: list[Event] = []
    # The target whose degradation is measured, and when it is degraded [start, end).
    focus: str | None = None
    degraded: tuple[float, float] | None = None
    # For hybrid: [start, end) phases in which the majority pick must be the formula's.
    phases: list[tuple[float, float]] = []
    latency: dict[str, Any] = {}
    breaker: dict[str, Any] = {}
    weights: dict[str, float] | None = None
    max_attempts: int = 3
    goals: list[Goal] = []


class ScenarioFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    scenarios: list[Scenario]


# ---- built-in scenarios ------------------------------------------------------------------


def builtin_scenarios() -> list[Scenario]:
    three = [
        Upstream(name="fast", latency_ms=40),
        Upstream(name="medium", latency_ms=90),
        Upstream(name="slow", latency_ms=150),
    ]
    equal = [Upstream(name=n, latency_ms=60) for n in ("a", "b", "c")]
    return [
        Scenario(
            name="latency-shift",
            description="fastest of 40/90/150 ms jumps to 400 ms from 15 s to 35 s",
            upstreams=three,
            rate=40,
            duration_s=50,
            events=[
                Event(at_s=15, target="fast", latency_ms=400),
                Event(at_s=35, target="fast", latency_ms=40),
            ],
            focus="fast",
            degraded=(15, 35),
            goals=[
                Goal(metric="mean_vs_oracle", limit=1.10, label="mean latency vs oracle"),
                Goal(metric="leave_s", limit=2.0, label=">= 90 % off the degraded target (s)"),
                Goal(metric="back_s", limit=5.0, label=">= 50 % back after recovery (s)"),
                Goal(metric="degraded_share", limit=0.02, label="share sent to it while degraded"),
            ],
        ),
        Scenario(
            name="outage",
            description="one of three 60 ms upstreams answers 500 from 10 s to 30 s",
            upstreams=equal,
            rate=40,
            duration_s=45,
            events=[
                Event(at_s=10, target="b", error_rate=1.0),
                Event(at_s=30, target="b", error_rate=0.0),
            ],
            focus="b",
            degraded=(10, 30),
            goals=[
                Goal(metric="failed", limit=0, label="failed client requests"),
                Goal(metric="per_opening", limit=3, label="requests to it per breaker opening"),
            ],
        ),
        Scenario(
            name="near-equal",
            description="three equal 60 ms upstreams (jitter only)",
            upstreams=equal,
            rate=40,
            duration_s=30,
            goals=[Goal(metric="max_share", limit=0.5, label="largest share of traffic")],
        ),
        Scenario(
            name="capacity",
            description="50 ms upstream slows beyond 4 concurrent; 80 ms and 120 ms ones don't",
            upstreams=[
                Upstream(name="small", latency_ms=50, capacity=4),
                Upstream(name="big", latency_ms=80),
                Upstream(name="far", latency_ms=120),
            ],
            rate=100,
            duration_s=30,
            goals=[Goal(metric="p95_vs_oracle", limit=1.2, label="p95 latency vs oracle")],
        ),
        Scenario(
            name="cost-vs-latency",
            description="cheap/slow, dear/fast; the middle one slows from 100 to 450 ms at 20 s",
            strategy="hybrid",
            upstreams=[
                Upstream(name="cheap", latency_ms=500, price=1.0),
                Upstream(name="dear", latency_ms=50, price=4.0),
                Upstream(name="middle", latency_ms=100, price=2.0),
            ],
            rate=20,
            duration_s=40,
            events=[Event(at_s=20, target="middle", latency_ms=450)],
            phases=[(5, 20), (25, 40)],
            goals=[
                Goal(
                    metric="follows_formula",
                    limit=1.0,
                    higher=True,
                    label="phases whose pick is the formula's",
                )
            ],
        ),
    ]


def load_scenarios(path: str) -> list[Scenario]:
    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"$: cannot read scenarios from {path}: {exc}") from None
    try:
        return msgspec.convert(raw, ScenarioFile).scenarios
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from None


# ---- the route a scenario runs -----------------------------------------------------------


def scenario_route(scenario: Scenario, strategy: str | None = None) -> RouteSpec:
    """The scenario as a real config, compiled the way the gateway compiles it (with
    `strategy`, a baseline: the scenario's own policy keys are left out)."""
    own = strategy is None
    document: dict[str, Any] = {
        "providers": [
            {"name": u.name, "base_url": f"http://{u.name}.invalid"} for u in scenario.upstreams
        ],
        "routes": [
            {
                "model": f"sim-{scenario.name}",
                "strategy": strategy or scenario.strategy,
                "targets": [
                    {
                        "provider": u.name,
                        "model": "m",
                        "id": u.name,
                        "input_cost_per_mtok": u.price,
                        **({"priority": u.priority} if u.priority is not None and own else {}),
                        **({"weight": u.weight} if u.weight is not None and own else {}),
                    }
                    for u in scenario.upstreams
                ],
                **({"weights": scenario.weights} if scenario.weights and own else {}),
                **({"within": scenario.within} if scenario.within and own else {}),
                # Validated as the config would be (unknown keys are errors).
                "latency": msgspec.to_builtins(msgspec.convert(scenario.latency, LatencyConfig)),
                "breaker": msgspec.to_builtins(msgspec.convert(scenario.breaker, BreakerConfig)),
            }
        ],
    }
    config: Config = parse_config(document, env={})
    return compile_route(config, config.routes[0])


# ---- the simulation ----------------------------------------------------------------------


@dataclass
class Result:
    policy: str
    latencies_ms: list[float] = field(default_factory=list)
    failed: int = 0
    cost: float = 0.0
    # (send time s, target) of every attempt, and (arrival time s, first target) per request
    attempts: list[tuple[float, str]] = field(default_factory=list)
    firsts: list[tuple[float, str]] = field(default_factory=list)
    openings: int = 0
    metrics: dict[str, float | None] = field(default_factory=dict)


class VirtualClock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.origin = start
        self.now = start

    def __call__(self) -> float:
        return self.now

    @property
    def t(self) -> float:
        return self.now - self.origin


StateFactory = Callable[[VirtualClock], Awaitable[StateBackend]]


async def memory_state(clock: VirtualClock) -> StateBackend:
    from edgeroute.state.memory import MemoryState

    return MemoryState(clock)


def redis_state_factory(url: str) -> StateFactory:
    async def make(clock: VirtualClock) -> StateBackend:
        from edgeroute.state.redis import RedisState

        prefix = f"sim-{uuid.uuid4().hex[:12]}"
        return RedisState(url, key_prefix=prefix, timeout_ms=5_000, clock=clock)

    return make


@dataclass
class _Request:
    index: int
    arrival: float
    tried: list[str] = field(default_factory=list)
    attempts: int = 0


@dataclass(order=True)
class _Attempt:
    end: float
    seq: int
    request: _Request = field(compare=False)
    target: str = field(compare=False)
    ok: bool = field(compare=False)
    latency_ms: float = field(compare=False)
    admission: Admission | None = field(compare=False)


class _World:
    """The upstreams as they are at each instant: events applied in time order."""

    def __init__(self, scenario: Scenario) -> None:
        self.upstreams = {u.name: u for u in scenario.upstreams}
        self.latency = {u.name: u.latency_ms for u in scenario.upstreams}
        self.errors = {u.name: u.error_rate for u in scenario.upstreams}
        self.capacity = {u.name: u.capacity for u in scenario.upstreams}
        self.active = {u.name: 0 for u in scenario.upstreams}
        self.events = sorted(scenario.events, key=lambda e: e.at_s)
        self.next_event = 0

    def advance(self, t: float) -> None:
        while self.next_event < len(self.events) and self.events[self.next_event].at_s <= t:
            event = self.events[self.next_event]
            self.next_event += 1
            if event.target not in self.latency:
                raise ConfigError(f"event at {event.at_s}s: unknown target {event.target!r}")
            if event.latency_ms is not None:
                self.latency[event.target] = event.latency_ms
            if event.error_rate is not None:
                self.errors[event.target] = event.error_rate
            if event.capacity is not None:
                self.capacity[event.target] = event.capacity

    def load_factor(self, name: str, extra: int = 1) -> float:
        capacity = self.capacity[name]
        concurrent = self.active[name] + extra
        return max(1.0, concurrent / capacity) if capacity > 0 else 1.0

    def expected_ms(self, name: str) -> float:
        """What the oracle knows: the latency the next request would see, retries included."""
        errors = self.errors[name]
        if errors >= 1.0:
            return math.inf
        return self.latency[name] * self.load_factor(name) / (1.0 - errors)


def _oracle_pick(scenario: Scenario, route: RouteSpec, world: _World, tried: Sequence[str]) -> str:
    names = [u.name for u in scenario.upstreams if u.name not in tried]
    if not names:
        return ""
    if route.strategy.kind == "hybrid":
        return max(names, key=lambda n: _formula(route, world, names)[n])
    return min(names, key=world.expected_ms)


def _formula(route: RouteSpec, world: _World, names: Sequence[str]) -> dict[str, float]:
    """The documented hybrid formula on the true latencies and error rates."""
    strategy = route.strategy
    prices = {t.id: t.price_per_mtok for t in route.targets}
    latencies = {n: world.latency[n] * world.load_factor(n) for n in names}
    max_price = max(prices[n] for n in names)
    max_latency = max(latencies.values())
    return {
        n: strategy.cost_weight * (1 - prices[n] / max_price if max_price > 0 else 1.0)
        + strategy.latency_weight * (1 - latencies[n] / max_latency if max_latency > 0 else 1.0)
        + strategy.reliability_weight * (1 - world.errors[n])
        for n in names
    }


def poisson_arrivals(scenario: Scenario, luck: random.Random) -> list[float]:
    """Open-loop send times (s) at the scenario's rate; the simulator and bench/routing.py
    draw the same schedule from the same seed."""
    arrivals: list[float] = []
    t = 0.0
    while True:
        t += luck.expovariate(scenario.rate)
        if t >= scenario.duration_s:
            return arrivals
        arrivals.append(t)


async def run_policy(
    scenario: Scenario, policy: str, make_state: StateFactory, seed: int = 1
) -> Result:
    """One policy through one scenario; the arrivals and luck depend on `seed` only."""
    luck = random.Random(seed)
    arrivals = poisson_arrivals(scenario, luck)
    # Per request and attempt: a jitter draw and an error draw, the same for every policy.
    draws = [
        [(luck.random(), luck.random()) for _ in range(scenario.max_attempts)] for _ in arrivals
    ]

    route = scenario_route(scenario, "round_robin" if policy == "round_robin" else None)
    clock = VirtualClock()
    state = None if policy == "oracle" else await make_state(clock)
    world = _World(scenario)
    result = Result(policy)
    heap: list[tuple[float, int, Any]] = []
    seq = 0
    for index, at in enumerate(arrivals):
        heap.append((at, seq, _Request(index, at)))
        seq += 1
    heapq.heapify(heap)
    focus = scenario.focus
    last_state: CircuitState | None = None
    poll_every = 0.25
    next_poll = 0.0

    async def start(request: _Request, pending: Outcome | None) -> None:
        nonlocal seq
        now = clock.t
        first = request.attempts == 0
        admission: Admission | None = None
        if state is None:
            target = _oracle_pick(scenario, route, world, request.tried)
        else:
            decision = await state.decide(
                route, exclude=request.tried, outcome=pending, advance=first, limit=2
            )
            admission = decision.admission
            target = admission.target_id if admission is not None else ""
        if not target:
            result.failed += 1
            return
        jitter, error = draws[request.index][request.attempts]
        request.attempts += 1
        request.tried.append(target)
        ok = error >= world.errors[target]
        if ok:
            latency = world.latency[target] * (0.9 + 0.2 * jitter) * world.load_factor(target)
        else:
            latency = world.upstreams[target].fail_latency_ms
        world.active[target] += 1
        result.attempts.append((now, target))
        if first:
            result.firsts.append((now, target))
        attempt = _Attempt(now + latency / 1000.0, seq, request, target, ok, latency, admission)
        seq += 1
        heapq.heappush(heap, (attempt.end, attempt.seq, attempt))

    async def finish(attempt: _Attempt) -> None:
        world.active[attempt.target] -= 1
        request = attempt.request
        kind = OutcomeKind.SUCCESS if attempt.ok else OutcomeKind.FAILURE
        outcome = None
        if attempt.admission is not None:
            outcome = Outcome.for_admission(
                attempt.admission,
                kind,
                attempt.latency_ms,
                input_tokens=TOKENS_PER_REQUEST // 2 if attempt.ok else 0,
                output_tokens=TOKENS_PER_REQUEST // 2 if attempt.ok else 0,
            )
        if attempt.ok:
            result.latencies_ms.append((clock.t - request.arrival) * 1000.0)
            price = world.upstreams[attempt.target].price
            result.cost += price * TOKENS_PER_REQUEST / 1e6
            if state is not None and outcome is not None:
                await state.record(route, outcome)
            return
        if request.attempts < scenario.max_attempts:
            await start(request, outcome)  # the failure rides on the next decide
            return
        result.failed += 1
        if state is not None and outcome is not None:
            await state.record(route, outcome)

    try:
        while heap:
            at, _, item = heapq.heappop(heap)
            while state is not None and focus is not None and next_poll <= at:
                # Breaker openings of the focus target, seen as an operator would.
                clock.now = clock.origin + next_poll
                snapshot = await state.snapshot(route)
                current = next(s.state for s in snapshot.targets if s.target_id == focus)
                if current is CircuitState.OPEN and last_state is not CircuitState.OPEN:
                    result.openings += 1
                last_state = current
                next_poll += poll_every
            clock.now = clock.origin + at
            world.advance(at)
            if isinstance(item, _Request):
                await start(item, None)
            else:
                await finish(item)
    finally:
        if state is not None:
            await state.close()
    return result


# ---- metrics -----------------------------------------------------------------------------


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def _share(picks: Sequence[tuple[float, str]], target: str, start: float, end: float) -> float:
    inside = [name for t, name in picks if start <= t < end]
    return sum(1 for name in inside if name == target) / len(inside) if inside else 0.0


def _first_window(
    picks: Sequence[tuple[float, str]],
    target: str,
    start: float,
    end: float,
    test: Callable[[float], bool],
) -> float | None:
    """Seconds after `start` until the share of `target` in a 1 s window first passes `test`."""
    step = 0.05
    offset = 0.0
    while start + offset + SHARE_WINDOW_S <= end:
        if test(_share(picks, target, start + offset, start + offset + SHARE_WINDOW_S)):
            return round(offset, 2)
        offset += step
    return None


def measure(scenario: Scenario, result: Result) -> dict[str, float | None]:
    metrics: dict[str, float | None] = {
        "mean_ms": sum(result.latencies_ms) / len(result.latencies_ms)
        if result.latencies_ms
        else None,
        "p95_ms": _percentile(result.latencies_ms, 0.95),
        "cost": result.cost,
        "failed": float(result.failed),
    }
    counts: dict[str, int] = {}
    for _, name in result.attempts:
        counts[name] = counts.get(name, 0) + 1
    total = sum(counts.values())
    metrics["max_share"] = max(counts.values()) / total if total else None
    if scenario.focus is not None and scenario.degraded is not None:
        start, end = scenario.degraded
        focus = scenario.focus
        metrics["leave_s"] = _first_window(
            result.firsts, focus, start, end, lambda share: share <= 0.10
        )
        metrics["back_s"] = _first_window(
            result.firsts, focus, end, scenario.duration_s, lambda share: share >= 0.50
        )
        sent = sum(1 for t, name in result.attempts if start <= t < end and name == focus)
        arrived = sum(1 for t, _ in result.firsts if start <= t < end)
        metrics["degraded_share"] = sent / arrived if arrived else None
        metrics["sent_while_degraded"] = float(sent)
        metrics["per_opening"] = float(sent) / max(1, result.openings)
    return metrics


def _majority(picks: Sequence[tuple[float, str]], start: float, end: float) -> str | None:
    counts: dict[str, int] = {}
    for t, name in picks:
        if start <= t < end:
            counts[name] = counts.get(name, 0) + 1
    return max(counts, key=lambda n: counts[n]) if counts else None


def formula_pick(scenario: Scenario, at: float) -> str:
    """What the documented hybrid formula picks on the true numbers at `at` (no load)."""
    route = scenario_route(scenario)
    world = _World(scenario)
    world.advance(at)
    names = [u.name for u in scenario.upstreams]
    scores = _formula(route, world, names)
    return max(names, key=lambda n: scores[n])


@dataclass
class Report:
    scenario: Scenario
    results: dict[str, Result]
    goals: list[dict[str, Any]]


async def simulate(scenario: Scenario, make_state: StateFactory, seed: int = 1) -> Report:
    results: dict[str, Result] = {}
    for policy in POLICIES:
        result = await run_policy(scenario, policy, make_state, seed)
        result.metrics = measure(scenario, result)
        results[policy] = result
    return finish_report(scenario, results)


def finish_report(scenario: Scenario, results: dict[str, Result]) -> Report:
    """Oracle-relative figures and the PASS/MISS goals (the simulator and bench/routing.py)."""
    ours, oracle = results["edgeroute"].metrics, results["oracle"].metrics
    for name in ("mean_ms", "p95_ms"):
        mine, best = ours.get(name), oracle.get(name)
        ours[name.replace("_ms", "_vs_oracle")] = mine / best if mine is not None and best else None
    if scenario.phases:
        hits = sum(
            1
            for start, end in scenario.phases
            if _majority(results["edgeroute"].firsts, start, end)
            == formula_pick(scenario, (start + end) / 2)
        )
        ours["follows_formula"] = hits / len(scenario.phases)
    goals = []
    for goal in scenario.goals:
        value = ours.get(goal.metric)
        if goal.metric not in ours:
            status = "n/a"  # not measured in this scenario (no focus, no phases)
        elif value is None:
            status = "MISS"  # measured and never reached (e.g. never came back)
        elif goal.higher:
            status = "PASS" if value >= goal.limit else "MISS"
        else:
            status = "PASS" if value <= goal.limit else "MISS"
        goals.append(
            {
                "metric": goal.metric,
                "label": goal.label or goal.metric,
                "value": value,
                "comparison": ">=" if goal.higher else "<=",
                "limit": goal.limit,
                "status": status,
            }
        )
    return Report(scenario, results, goals)


def simulate_all(
    scenarios: Sequence[Scenario], make_state: StateFactory, seed: int = 1
) -> list[Report]:
    async def go() -> list[Report]:
        return [await simulate(s, make_state, seed) for s in scenarios]

    return asyncio.run(go())


# ---- output ------------------------------------------------------------------------------

COLUMNS = (
    ("mean_ms", "mean ms", "{:.1f}"),
    ("p95_ms", "p95 ms", "{:.1f}"),
    ("cost", "cost $", "{:.3f}"),
    ("failed", "failed", "{:.0f}"),
    ("leave_s", "leave s", "{:.2f}"),
    ("back_s", "back s", "{:.2f}"),
    ("degraded_share", "to degraded", "{:.1%}"),
    ("max_share", "max share", "{:.1%}"),
)


def _cell(value: float | None, fmt: str, present: bool) -> str:
    if not present:
        return "-"
    return "never" if value is None else fmt.format(value)


def render(reports: Sequence[Report]) -> str:
    lines: list[str] = []
    for report in reports:
        scenario = report.scenario
        lines.append(f"## {scenario.name} ({scenario.strategy}): {scenario.description}")
        header = ["policy", *[label for _, label, _ in COLUMNS]]
        rows = [header]
        for policy, result in report.results.items():
            rows.append(
                [
                    policy,
                    *[
                        _cell(result.metrics.get(key), fmt, key in result.metrics)
                        for key, _, fmt in COLUMNS
                    ],
                ]
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        for row in rows:
            cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            lines.append("  ".join(cells).rstrip())
        for goal in report.goals:
            value = goal["value"]
            shown = (
                ("never" if goal["status"] == "MISS" else "n/a")
                if value is None
                else f"{value:.3g}"
            )
            bound = f"{goal['comparison']} {goal['limit']:g}"
            lines.append(f"  {goal['status']:<4} {goal['label']}: {shown} {bound}")
        lines.append("")
    return "\n".join(lines)


def report_json(reports: Sequence[Report]) -> list[dict[str, Any]]:
    return [
        {
            "scenario": r.scenario.name,
            "strategy": r.scenario.strategy,
            "policies": {p: res.metrics for p, res in r.results.items()},
            "goals": r.goals,
        }
        for r in reports
    ]
