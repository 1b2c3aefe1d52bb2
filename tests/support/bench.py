"""Running a benchmark in bench/ from a smoke test: `--quick --json`, decoded.

A missing tool the benchmark drives skips the test locally and fails it under CI (CI=true),
like the Redis fixtures: CI never passes by not running.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support import ci

REPO = Path(__file__).resolve().parents[2]


def run_quick(
    script: str, *, tools: tuple[str, ...] = (), timeout_s: float = 240
) -> dict[str, Any]:
    """Run `bench/<script> --quick --json`; a redis-server (or valkey-server) is always needed."""
    absent = [tool for tool in tools if shutil.which(tool) is None]
    if shutil.which("redis-server") is None and shutil.which("valkey-server") is None:
        absent.append("redis-server")
    if absent:
        ci.missing(", ".join(absent), install=f"needed by bench/{script}; see .ci/run")
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--quick", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert result.returncode == 0, f"bench/{script} failed:\n{result.stderr[-4000:]}"
    data: dict[str, Any] = json.loads(result.stdout)
    return data
