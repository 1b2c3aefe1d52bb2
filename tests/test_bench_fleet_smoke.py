"""Smoke test of bench/fleet.py: `--quick --json` runs three real replicas end to end.

The figures themselves are measurements (a noisy machine), but two are guarantees the
fleet makes, so they are checked: no client request fails, neither while a provider starts
failing nor while Redis is SIGKILLed; and with no more clients than failure_threshold, the
failing provider receives exactly failure_threshold requests from the whole fleet.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.bench import run_quick


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    return run_quick("fleet.py", timeout_s=300)


@pytest.mark.slow
def test_a_failing_provider_costs_no_client_request(report: dict[str, Any]) -> None:
    rows = report["failing_provider"]
    assert rows and all(row["client_errors"] == 0 and row["requests"] > 0 for row in rows)
    few = next(row for row in rows if row["clients"] <= row["failure_threshold"])
    # Exact only while Redis answers in time: a call past state.timeout_ms (a loaded machine)
    # is decided on the replica's local state, which is the documented degraded mode, not
    # the fleet-wide guarantee; the bench counts those calls so the two are told apart.
    if few["state_errors"] == 0:
        assert few["sent_to_failing"] == few["failure_threshold"]
    assert all(row["sent_to_failing"] >= row["failure_threshold"] for row in rows)


@pytest.mark.slow
def test_redis_killed_mid_run_costs_no_client_request(report: dict[str, Any]) -> None:
    killed = report["redis_killed"]
    assert killed["requests"] > 0 and killed["failed_requests"] == 0, killed["errors"]
    assert killed["after_kill"]["requests"] > 0  # traffic went on after the kill
    assert set(killed["shared_state_after"]) == {"degraded"}
