"""Running a benchmark in bench/ from a smoke test: `--quick --json`, decoded.

A missing tool the benchmark drives skips the test locally and fails it under CI (CI=true),
like the Redis fixtures: CI never passes by not running.
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

REPO = Path(__file__).resolve().parents[2]


def run_quick(
    script: str, *, tools: tuple[str, ...] = (), timeout_s: float = 240
) -> dict[str, Any]:
    """Run `bench/<script> --quick --json`; a redis-server (or valkey-server) is always needed."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if shutil.which("redis-server") is None and shutil.which("valkey-server") is None:
        missing.append("redis-server")
    if missing:
        names = ", ".join(missing)
        if os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}:
            pytest.fail(f"CI=true but {names} missing: bench/{script} cannot run")
        pytest.skip(f"{names} not on PATH")
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
