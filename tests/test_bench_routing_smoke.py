"""Smoke test of bench/routing.py: `--quick --json` runs every scenario end to end through a
real gateway on Redis state and mock upstreams, and reports every policy and target.

The figures of a quick run on a shared machine are not judged here (the timelines are a
quarter of the real ones): only that each is measured and each target has a status.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.bench import run_quick

SCENARIOS = ("latency-shift", "outage", "near-equal", "cost-vs-latency")


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    return run_quick("routing.py", timeout_s=240)


def test_every_scenario_and_policy_is_reported(report: dict[str, Any]) -> None:
    assert [s["scenario"] for s in report["scenarios"]] == list(SCENARIOS)
    for scenario in report["scenarios"]:
        assert set(scenario["policies"]) == {"edgeroute", "oracle", "round_robin"}
        for policy, metrics in scenario["policies"].items():
            assert metrics["mean_ms"] is not None and metrics["mean_ms"] > 0, policy
            assert metrics["p95_ms"] >= metrics["mean_ms"] * 0.5, policy
        assert scenario["goals"], scenario["scenario"]
        for goal in scenario["goals"]:
            assert goal["status"] in {"PASS", "MISS"}, goal


def test_round_robin_never_leaves_and_the_oracle_does(report: dict[str, Any]) -> None:
    shift = next(s for s in report["scenarios"] if s["scenario"] == "latency-shift")
    assert shift["policies"]["oracle"]["degraded_share"] == 0.0
    assert shift["policies"]["round_robin"]["degraded_share"] > 0.2
    outage = next(s for s in report["scenarios"] if s["scenario"] == "outage")
    assert outage["policies"]["edgeroute"]["failed"] == 0
