"""Smoke test of bench/fleet.py: `--quick --json` runs three real replicas end to end.

The figures themselves are measurements (a noisy machine), but two are guarantees the
fleet makes, so they are checked: no client request fails, neither while a provider starts
failing nor while Redis is SIGKILLed; and with no more clients than failure_threshold, the
failing provider receives exactly failure_threshold requests from the whole fleet.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench" / "fleet.py"


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    if shutil.which("redis-server") is None and shutil.which("valkey-server") is None:
        if os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}:
            pytest.fail("CI=true but no redis-server binary: the fleet bench cannot run")
        pytest.skip("no redis-server binary on PATH")
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"bench failed:\n{result.stderr[-3000:]}"
    data: dict[str, Any] = json.loads(result.stdout)
    return data


@pytest.mark.slow
def test_a_failing_provider_costs_no_client_request(report: dict[str, Any]) -> None:
    rows = report["failing_provider"]
    assert rows and all(row["client_errors"] == 0 and row["requests"] > 0 for row in rows)
    few = next(row for row in rows if row["clients"] <= row["failure_threshold"])
    assert few["sent_to_failing"] == few["failure_threshold"]
    assert all(row["sent_to_failing"] >= row["failure_threshold"] for row in rows)


@pytest.mark.slow
def test_redis_killed_mid_run_costs_no_client_request(report: dict[str, Any]) -> None:
    killed = report["redis_killed"]
    assert killed["requests"] > 0 and killed["failed_requests"] == 0, killed["errors"]
    assert killed["after_kill"]["requests"] > 0  # traffic went on after the kill
    assert set(killed["shared_state_after"]) == {"degraded"}
