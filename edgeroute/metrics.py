"""Prometheus metrics, all prefixed `edgeroute_`, on a registry owned by one app.

Label children are cached per (route, target): `.labels()` costs more than the increment,
and the children a request updates every time are bound once to plain functions that update
them without prometheus-client's per-call checks and locks (see `observer`).

Under `edgeroute serve --workers N` every worker runs with `PROMETHEUS_MULTIPROC_DIR` set
(a private directory the supervisor creates and removes): prometheus-client then keeps each
value in a per-process file, and whichever worker answers `/metrics` reads all of them
(`MultiProcessCollector`). Counters and histograms sum over every worker that ever ran (a
restarted worker's requests still count); each gauge names how workers combine, and the
`live*` modes drop a worker's value as soon as the supervisor marks it dead.
"""

from __future__ import annotations

import os
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.values import MutexValue

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
WORKER_INDEX_ENV = "EDGEROUTE_WORKER_INDEX"
# How often a worker copies its scrape-time gauges into its file (multiprocess mode only).
_LIVE_GAUGE_REFRESH_S = 1.0

# Process-wide: the access-log writer (edgeroute.accesslog) outlives any one app.
ACCESS_LOG_DROPPED = Counter(
    "edgeroute_access_log_dropped",
    "Access lines dropped because the access-log writer's bounded queue was full.",
    registry=None,
)

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
_M = TypeVar("_M", bound=MetricWrapperBase)
BREAKER_CODES = {"closed": 0, "open": 1, "half_open": 2}


Observe = Callable[[float], None]
Add = Callable[[float], None]


def observer(child: Histogram) -> Observe:
    """`child.observe`, bound once for the event loop's thread.

    prometheus-client's observe checks the child, takes a lock for the sum and walks the
    buckets to take another: 0.5 us, four times per request. A single-process value is a
    float behind a lock that only guards against other writers, and these children are
    written only from the loop's thread (and read there, by /metrics), so the observation
    adds to the same two floats directly, its bucket found by bisection (the first upper
    bound >= amount, as observe's walk finds it). Multiprocess values live in a per-process
    file: those keep the library's own observe.
    """
    total, buckets = child._sum, child._buckets
    if type(total) is not MutexValue or any(type(b) is not MutexValue for b in buckets):
        return child.observe
    bounds = child._upper_bounds

    def observe(amount: float) -> None:
        total._value += amount
        buckets[bisect_left(bounds, amount)]._value += 1.0

    return observe


def adder(child: Counter) -> Add:
    """`child.inc`, bound once for the event loop's thread, as `observer` binds observe."""
    value = child._value
    if type(value) is not MutexValue:
        return child.inc

    def add(amount: float) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        value._value += amount

    return add


@dataclass(slots=True)
class TargetMetrics:
    """Pre-bound updates of one target of one route (see `observer`)."""

    success: Add
    attempt_ok: Add
    request_duration: Observe
    upstream_duration: Observe
    ttft: Observe
    prompt_tokens: Add
    completion_tokens: Add
    cost: Add


class _ScrapeTimeGauge(Gauge):
    """A gauge whose value a function gives (`set_function`), in either mode.

    Single process: read at scrape time, as prometheus-client does. Multiprocess: the worker
    answering a scrape cannot call its siblings' functions, so each worker copies its value
    into its own file every second from a daemon thread (a figure at most 1 s old), and the
    answering worker its own at the scrape.
    """

    _function: Callable[[], float] | None = None

    def set_function(self, f: Callable[[], float]) -> None:
        if os.environ.get(MULTIPROC_DIR_ENV) is None:
            super().set_function(f)
            return
        self._function = f

        def refresh_forever() -> None:
            while True:
                time.sleep(_LIVE_GAUGE_REFRESH_S)
                self.refresh()

        self.refresh()
        threading.Thread(target=refresh_forever, name="edgeroute-metrics", daemon=True).start()

    def refresh(self) -> None:
        if self._function is not None:
            self.set(self._function())


class Metrics:
    def __init__(self) -> None:
        self.multiprocess_dir = os.environ.get(MULTIPROC_DIR_ENV) or None
        # Breaker gauges and transition counts come from polling the shared state, which
        # every worker sees alike: with several workers only worker 0 polls, else the
        # transitions would be counted once per worker.
        self.polls_breakers = os.environ.get(WORKER_INDEX_ENV, "0") == "0"
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        r.register(ACCESS_LOG_DROPPED)
        self.requests = Counter(
            "edgeroute_requests",
            "Client requests by route, chosen target and outcome.",
            ["route", "provider", "model", "outcome"],
            registry=r,
        )
        self.request_duration = Histogram(
            "edgeroute_request_duration_seconds",
            "Whole client request, first byte in to last byte out.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "edgeroute_upstream_duration_seconds",
            "One upstream attempt until its response head (streams: first token).",
            ["provider", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "edgeroute_time_to_first_token_seconds",
            "Streams: time until the first token.",
            ["provider", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "edgeroute_gateway_overhead_seconds",
            "Time the gateway itself added to a request (request minus upstream time).",
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )
        self.attempts = Counter(
            "edgeroute_upstream_attempts",
            "Upstream attempts by result (ok or error class).",
            ["provider", "model", "result"],
            registry=r,
        )
        self.failovers = Counter(
            "edgeroute_failovers",
            "Requests moved to another target after a failure.",
            ["route", "from_provider", "error"],
            registry=r,
        )
        # cause: exhausted (every target excluded or failed), context_window, content_policy.
        self.fallbacks = Counter(
            "edgeroute_fallbacks",
            "Requests handed on from a route to one of its fallback routes, by cause.",
            ["route", "to_route", "cause"],
            registry=r,
        )
        # Labels are the route and the target the pin left: never the session key.
        self.affinity_moves = Counter(
            "edgeroute_affinity_moves",
            "Session pins moved off their target because it was excluded or failed.",
            ["route", "target"],
            registry=r,
        )
        self.tokens = Counter(
            "edgeroute_tokens",
            "Tokens reported by upstreams.",
            ["route", "provider", "model", "kind"],
            registry=r,
        )
        self.cost = Counter(
            "edgeroute_cost_usd",
            "Spend in US dollars from configured token prices.",
            ["route", "provider", "model"],
            registry=r,
        )
        # Per client `name` (server.clients[]): bounded by the config, never the key.
        self.client_requests = Counter(
            "edgeroute_client_requests",
            "Requests of limited clients: served, unserved, or refused (rpm, tpm, "
            "concurrency, budget, model_not_found).",
            ["client", "outcome"],
            registry=r,
        )
        self.state_loss_policy = Gauge(
            "edgeroute_state_loss_policy",
            "1 for each on_state_loss policy some limit of this replica follows while Redis "
            "is away (fail_open, fail_closed, local_share).",
            ["policy"],
            registry=r,
        )
        self.client_spend = Counter(
            "edgeroute_client_spend_usd",
            "Spend of limited clients in US dollars (usage x the serving target's prices).",
            ["client"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "edgeroute_breaker_state",
            "Breaker state per target: 0 closed, 1 open, 2 half-open.",
            ["route", "target"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.breaker_transitions = Counter(
            "edgeroute_breaker_transitions",
            "Breaker transitions seen (generation changes), by the state reached.",
            ["route", "target", "to"],
            registry=r,
        )
        self.state_errors = Counter(
            "edgeroute_state_errors",
            "Shared-state calls that failed or timed out.",
            ["op"],
            registry=r,
        )
        self.state_latency = Histogram(
            "edgeroute_state_call_seconds",
            "Successful shared-state calls (decide, record batch), queueing included.",
            ["op"],
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )
        self.state_repairs = Counter(
            "edgeroute_state_repairs",
            "Shared-state keys of the wrong type that a script replaced (tampering, stray keys).",
            registry=r,
        )
        self.state_degraded = Gauge(
            "edgeroute_state_degraded",
            "1 while this replica routes on local state because shared state is unreachable.",
            registry=r,
            # Workers fall back on their own; 1 while any live worker does.
            multiprocess_mode="livemax",
        )
        self.records_dropped = Counter(
            "edgeroute_records_dropped",
            "Outcome records dropped because the bounded record queue was full.",
            registry=r,
        )
        self.in_flight = _ScrapeTimeGauge(
            "edgeroute_in_flight_requests",
            "Client requests being served now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self._targets: dict[tuple[str, str, str], TargetMetrics] = {}
        self._state_calls: dict[str, Observe] = {}
        self.observe_overhead = observer(self.overhead)
        self._children: dict[tuple[object, ...], Any] = {}
        self.ops = OpsMetrics(r)

    def target(self, route: str, provider: str, model: str) -> TargetMetrics:
        key = (route, provider, model)
        bound = self._targets.get(key)
        if bound is None:
            bound = self._targets[key] = TargetMetrics(
                success=adder(self.requests.labels(route, provider, model, "success")),
                attempt_ok=adder(self.attempts.labels(provider, model, "ok")),
                request_duration=observer(self.request_duration.labels(route)),
                upstream_duration=observer(self.upstream_duration.labels(provider, model)),
                ttft=observer(self.ttft.labels(provider, model)),
                prompt_tokens=adder(self.tokens.labels(route, provider, model, "prompt")),
                completion_tokens=adder(self.tokens.labels(route, provider, model, "completion")),
                cost=adder(self.cost.labels(route, provider, model)),
            )
        return bound

    def child(self, family: _M, *labels: str) -> _M:
        """`family.labels(*labels)`, cached: the lookup costs more than the update. For the
        label sets that are not per (route, target) success: failures, failovers, refusals
        (bounded: routes and targets from the config, outcomes and error classes fixed)."""
        key = (family, *labels)
        bound = self._children.get(key)
        if bound is None:
            bound = self._children[key] = family.labels(*labels)
        return bound

    def observe_state_call(self, op: str, seconds: float) -> None:
        observe = self._state_calls.get(op)
        if observe is None:
            observe = self._state_calls[op] = observer(self.state_latency.labels(op))
        observe(seconds)

    def exposition(self) -> bytes:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        self.in_flight.refresh()
        # Read at every scrape: workers come and go. A fresh registry, so the values this
        # process also holds in `self.registry` are not exported twice.
        registry = CollectorRegistry()
        registry.register(_WithoutStaleConfigs(self.multiprocess_dir))
        return generate_latest(registry)


class _WithoutStaleConfigs(Collector):
    """The workers' files, less `edgeroute_config_info` series no live worker serves (0)."""

    def __init__(self, path: str) -> None:
        self._files = MultiProcessCollector(None, path=path)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Metric]:
        for family in self._files.collect():  # type: ignore[no-untyped-call]
            if family.name == "edgeroute_config_info":
                family.samples = [s for s in family.samples if s.value]
            yield family


class OpsMetrics:
    """Live operations: config reloads, the running config, the fleet seen through Redis."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.config_reloads = Counter(
            "edgeroute_config_reloads",
            "Config reloads by result: success, unchanged, or failure (refused; old config kept).",
            ["result"],
            registry=r,
        )
        self.config_info = Gauge(
            "edgeroute_config_info",
            "1 for the hash of the config this replica serves (sha256 of the file as written).",
            ["hash"],
            registry=r,
            # Workers: 1 for each hash some live worker serves; a dead one's hash leaves.
            multiprocess_mode="livemax",
        )
        self.fleet_replicas = Gauge(
            "edgeroute_fleet_replicas",
            "Live replicas with a heartbeat in shared state, as this replica last read them.",
            registry=r,
            # Workers read the same fleet: one series, and none left by a dead worker.
            multiprocess_mode="livemax",
        )
        self.fleet_config_hashes = Gauge(
            "edgeroute_fleet_config_hashes",
            "Distinct config hashes among live replicas (more than 1: the fleet disagrees).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self._hash: str | None = None

    def serving(self, digest: str) -> None:
        """Exactly one `edgeroute_config_info` child: the config served now."""
        if self._hash is not None and self._hash != digest:
            if os.environ.get(MULTIPROC_DIR_ENV) is None:
                self.config_info.remove(self._hash)
            else:  # a worker's file cannot drop a series: 0, which the exposition leaves out
                self.config_info.labels(self._hash).set(0)
        self._hash = digest
        self.config_info.labels(digest).set(1)
