"""Smoke test of bench/requestpath.py: `--quick --json` serves its requests through
Proxy.handle and reports a figure per round; `--base HEAD` runs a second tree beside it."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from tests.support.bench import REPO, run_quick


def test_reports_cpu_per_request_of_this_checkout() -> None:
    report = run_quick("requestpath.py", timeout_s=120)
    assert set(report["rounds"]) == {"B"}
    assert len(report["rounds"]["B"]) == 2
    assert all(us > 0 for us in report["rounds"]["B"])
    assert report["median_us_per_request"]["B"] > 0


def test_compares_with_a_base_revision_side_by_side() -> None:
    result = subprocess.run(
        [sys.executable, "bench/requestpath.py", "--base", "HEAD", "--quick", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report: dict[str, Any] = json.loads(result.stdout)
    assert set(report["rounds"]) == {"A", "B"}
    assert report["base"] == "HEAD" and report["cpu_ratio_b_over_a"] > 0
    worktrees = subprocess.run(
        ["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True, check=True
    ).stdout
    assert "edgeroute-requestpath-" not in worktrees  # removed on the way out
