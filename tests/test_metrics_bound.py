"""The pre-bound metric updates (`metrics.observer`, `metrics.adder`) write exactly what
prometheus-client's own `observe` and `inc` write: the same /metrics text, bucket by
bucket, for amounts on, between and past the bounds; and in multiprocess mode they are the
library's own methods (the values live in per-process files there)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, values
from prometheus_client.exposition import generate_latest

from edgeroute import metrics
from edgeroute.metrics import adder, observer

BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
# Exactly on a bound (observe's `<=` puts it in that bucket), between bounds, below the
# first, past the last (+Inf only), zero, and a negative amount (the first bucket).
AMOUNTS = (0.0, 0.0001, 0.00010001, 0.0003, 0.001, 0.0049999, 0.1, 0.1000001, 7.5, -0.5, 1e-9)


def exposition(registry: CollectorRegistry) -> list[str]:
    # `_created` is the wall clock at creation: the only line two registries may differ in.
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


def histogram(registry: CollectorRegistry) -> Histogram:
    family = Histogram("t_seconds", "t", ["route"], buckets=BUCKETS, registry=registry)
    return family.labels("chat")


def counter(registry: CollectorRegistry) -> Counter:
    return Counter("t_tokens", "t", ["route"], registry=registry).labels("chat")


def test_observer_writes_what_observe_writes() -> None:
    library, bound = CollectorRegistry(), CollectorRegistry()
    child, observe = histogram(library), observer(histogram(bound))
    for amount in AMOUNTS:
        child.observe(amount)
        observe(amount)
    assert exposition(bound) == exposition(library)
    # 0, 1e-9, -0.5 and 0.0001 itself in the first bucket
    assert 't_seconds_bucket{le="0.0001",route="chat"} 4.0' in exposition(bound)


def test_adder_writes_what_inc_writes() -> None:
    library, bound = CollectorRegistry(), CollectorRegistry()
    child, add = counter(library), adder(counter(bound))
    for amount in (1, 16, 0, 0.25, 3):
        child.inc(amount)
        add(amount)
    assert exposition(bound) == exposition(library)
    assert 't_tokens_total{route="chat"} 20.25' in exposition(bound)


def test_adder_refuses_a_negative_amount_as_inc_does() -> None:
    add = adder(counter(CollectorRegistry()))
    with pytest.raises(ValueError, match="non-negative"):
        add(-1)


def test_the_gateways_bound_children_match_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through `Metrics` as the gateway uses it: a target's children and the state-call and
    overhead histograms, against the same updates made with the library's methods."""
    monkeypatch.delenv(metrics.MULTIPROC_DIR_ENV, raising=False)
    ours, theirs = metrics.Metrics(), metrics.Metrics()
    bound = ours.target("chat", "up-a", "gpt-4o-mini")
    for amount in AMOUNTS[:-2]:
        bound.success(1)
        bound.attempt_ok(1)
        bound.request_duration(amount)
        bound.upstream_duration(amount)
        bound.ttft(amount)
        bound.prompt_tokens(16)
        bound.completion_tokens(8)
        bound.cost(0.25)
        ours.observe_overhead(amount)
        ours.observe_state_call("decide", amount)
        theirs.requests.labels("chat", "up-a", "gpt-4o-mini", "success").inc()
        theirs.attempts.labels("up-a", "gpt-4o-mini", "ok").inc()
        theirs.request_duration.labels("chat").observe(amount)
        theirs.upstream_duration.labels("up-a", "gpt-4o-mini").observe(amount)
        theirs.ttft.labels("up-a", "gpt-4o-mini").observe(amount)
        theirs.tokens.labels("chat", "up-a", "gpt-4o-mini", "prompt").inc(16)
        theirs.tokens.labels("chat", "up-a", "gpt-4o-mini", "completion").inc(8)
        theirs.cost.labels("chat", "up-a", "gpt-4o-mini").inc(0.25)
        theirs.overhead.observe(amount)
        theirs.state_latency.labels("decide").observe(amount)
    assert exposition(ours.registry) == exposition(theirs.registry)


def test_multiprocess_values_keep_the_librarys_methods(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(metrics.MULTIPROC_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())
    try:
        registry = CollectorRegistry()
        child, count = histogram(registry), counter(registry)
        observe, add = observer(child), adder(count)
        assert observe == child.observe and add == count.inc
        observe(0.003)
        add(2)
        assert list(tmp_path.glob("*.db"))  # written to the worker's file, as before
    finally:
        values.close_all_multiprocess_files()
