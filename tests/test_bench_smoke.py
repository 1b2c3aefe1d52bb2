"""Smoke test of bench/decide.py: `--quick --json` runs end to end and reports every cell.

It spawns its own redis-server, so it is skipped when no redis-server binary is installed,
except under CI (CI=true), where a missing binary fails the test instead.
"""

from __future__ import annotations

import shutil
from typing import Any

import pytest

from tests.support.bench import run_quick

BACKENDS = ("memory", "redis")
ROWS = (("hybrid", 2), ("hybrid", 8), ("hybrid", 32), ("round_robin", 8))
CONCURRENCIES = (1, 64)
# Limits on (Redis only, hybrid 8 targets): target quotas, and target plus client limits.
QUOTA_ROWS = (("hybrid+quota", 8, 1), ("hybrid+q+client", 8, 2))


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    return run_quick("decide.py", timeout_s=180)


def test_every_cell_is_reported(report: dict[str, Any]) -> None:
    cells = {
        (c["backend"], c["strategy"], c["targets"], c["concurrency"]): c for c in report["cells"]
    }
    expected = {
        (backend, strategy, targets, concurrency)
        for backend in BACKENDS
        for strategy, targets in ROWS
        for concurrency in CONCURRENCIES
    } | {
        ("redis", strategy, targets, concurrency)
        for strategy, targets, _ in QUOTA_ROWS
        for concurrency in CONCURRENCIES
    }
    assert set(cells) == expected
    assert len(report["cells"]) == len(expected)
    for key, cell in cells.items():
        assert cell["decisions"] > 0, key
        assert cell["decisions_per_s"] > 0, key
        assert 0 < cell["p50_ms"] <= cell["p99_ms"], key
        assert cell["outcomes_recorded"] == cell["decisions"], key


def test_one_redis_command_per_decision(report: dict[str, Any]) -> None:
    # 64 concurrent decides of one route: batches, one script call each (at most one per decide).
    accounting = report["accounting"]
    assert 0 < accounting["evalsha_calls"] < accounting["decisions"]
    assert 0 < accounting["commands_per_decision"] < 1.0
    calls = {strategy: n for strategy, _, n in QUOTA_ROWS}
    for cell in report["cells"]:
        if cell["backend"] == "redis":
            # The client's limits are a second script, pipelined in the same round trip.
            expected = calls.get(cell["strategy"], 1.0)
            if cell["concurrency"] == 1:
                assert cell["commands_per_decision"] == expected, cell
            else:
                assert expected - 1 < cell["commands_per_decision"] <= expected, cell
            assert cell["round_trips_per_decision"] > 0, cell
        else:
            assert cell["commands_per_decision"] is None, cell


def test_memory_ceiling_and_goals_are_reported(report: dict[str, Any]) -> None:
    memory = {m["targets"]: m for m in report["memory"]}
    assert set(memory) == {8, 32}
    for figure in memory.values():
        assert figure["bytes_per_target"] > 0
        assert figure["leases"] == 2 * figure["targets"]
        assert figure["full_window_lua_us_per_decide"] > 0
    ceiling = report["ceiling"]
    assert ceiling["args"][0] == "EVALSHA"
    if shutil.which("redis-benchmark") is not None:
        assert ceiling["rps"] > 0, ceiling["note"]
        assert ceiling["ratio"] > 0
    statuses = {goal["name"]: goal["status"] for goal in report["goals"]}
    assert len(statuses) == 11
    assert set(statuses.values()) <= {"PASS", "MISS"}
    assert report["meta"]["loop"]


def test_client_cost_is_reported_at_low_and_high_client_concurrency(
    report: dict[str, Any],
) -> None:
    costs = {c["held"]: c for c in report["client_cost"]}
    assert set(costs) == {1, 500}
    for held, cost in costs.items():
        assert cost["lua_us_per_pair"] > 0
        # Every timed lease was settled: only the held ones are still in flight.
        assert cost["inflight"] == held
