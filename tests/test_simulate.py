"""The simulator drives the real state code in virtual time: its oracle-relative targets are
deterministic for a seed, so they are asserted here (no wall-clock timing involved)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from edgeroute import simulate as sim
from edgeroute.cli import main


@pytest.fixture(scope="module")
def memory_reports() -> list[sim.Report]:
    return sim.simulate_all(sim.builtin_scenarios(), sim.memory_state, seed=1)


def test_every_builtin_target_passes_on_memory_state(memory_reports: list[sim.Report]) -> None:
    goals = {
        (r.scenario.name, g["metric"]): (g["status"], g["value"])
        for r in memory_reports
        for g in r.goals
    }
    assert set(goals) == {
        ("latency-shift", "mean_vs_oracle"),
        ("latency-shift", "leave_s"),
        ("latency-shift", "back_s"),
        ("latency-shift", "degraded_share"),
        ("outage", "failed"),
        ("outage", "per_opening"),
        ("near-equal", "max_share"),
        ("capacity", "p95_vs_oracle"),
        ("cost-vs-latency", "follows_formula"),
    }
    assert all(status == "PASS" for status, _ in goals.values()), goals


def test_the_baselines_are_what_they_should_be(memory_reports: list[sim.Report]) -> None:
    by_name = {r.scenario.name: r for r in memory_reports}
    shift = by_name["latency-shift"].results
    # Round-robin never leaves the degraded target; the oracle leaves at once.
    assert shift["round_robin"].metrics["leave_s"] is None
    assert shift["oracle"].metrics["leave_s"] == 0.0
    assert shift["oracle"].metrics["degraded_share"] == 0.0
    # Every policy saw the same arrivals.
    counts = {p: len(r.firsts) + r.failed for p, r in shift.items()}
    assert len(set(counts.values())) == 1
    outage = by_name["outage"].results["edgeroute"]
    assert outage.openings == 1 and outage.failed == 0


def test_redis_state_makes_the_very_same_decisions(redis_url: str) -> None:
    """RedisState through its injected clock: the Lua makes the decisions MemoryState does."""
    scenario = next(s for s in sim.builtin_scenarios() if s.name == "latency-shift")
    scenario = msgspec.structs.replace(scenario, duration_s=20.0)
    memory = sim.simulate_all([scenario], sim.memory_state)[0].results["edgeroute"]
    redis = sim.simulate_all([scenario], sim.redis_state_factory(redis_url))[0].results["edgeroute"]
    assert redis.attempts == memory.attempts
    assert redis.latencies_ms == memory.latencies_ms


def test_scenarios_from_a_yaml_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "scenarios.yaml"
    path.write_text(
        """
scenarios:
  - name: x-slows-down
    strategy: latency
    rate: 20
    duration_s: 20
    upstreams:
      - {name: x, latency_ms: 50}
      - {name: y, latency_ms: 80}
    events:
      - {at_s: 5, target: x, latency_ms: 500}
    focus: x
    degraded: [5, 20]
    latency: {half_life_s: 1.0}
    goals:
      - {metric: leave_s, limit: 2, label: off x}
"""
    )
    assert main(["simulate", "--file", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "## x-slows-down (latency)" in out
    assert "PASS off x:" in out
    for policy in ("edgeroute", "oracle", "round_robin"):
        assert f"\n{policy} " in out


def test_a_bad_scenario_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("scenarios:\n  - name: x\n    upstreams: []\n    typo: 1\n")
    assert main(["simulate", "--file", str(path)]) == 2
    assert "typo" in capsys.readouterr().err


def _policy_scenarios() -> list[sim.Scenario]:
    return [
        sim.Scenario(
            name="priority-failover",
            strategy="priority",
            rate=20,
            duration_s=20,
            upstreams=[
                sim.Upstream(name="primary", latency_ms=50, priority=0),
                sim.Upstream(name="backup-a", latency_ms=80, priority=1),
                sim.Upstream(name="backup-b", latency_ms=80, priority=1),
            ],
            events=[sim.Event(at_s=5, target="primary", error_rate=1.0)],
            breaker={"failure_threshold": 3, "open_timeout_s": 60},
        ),
        sim.Scenario(
            name="weighted-canary",
            strategy="weighted",
            rate=20,
            duration_s=20,
            upstreams=[
                sim.Upstream(name="stable", latency_ms=50, weight=95),
                sim.Upstream(name="canary", latency_ms=50, weight=5),
            ],
        ),
    ]


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_the_simulator_runs_priority_and_weighted(
    backend: str, request: pytest.FixtureRequest
) -> None:
    make = (
        sim.memory_state
        if backend == "memory"
        else sim.redis_state_factory(request.getfixturevalue("redis_url"))
    )
    priority, weighted = (
        r.results["edgeroute"] for r in sim.simulate_all(_policy_scenarios(), make)
    )
    before = {name for t, name in priority.firsts if t < 5}
    assert before == {"primary"}
    after = [name for t, name in priority.firsts if t >= 6]
    assert set(after) == {"backup-a", "backup-b"}  # the group takes turns
    assert abs(after.count("backup-a") - after.count("backup-b")) <= 1
    firsts = [name for _, name in weighted.firsts]
    for start in range(0, len(firsts) - 99):
        assert abs(firsts[start : start + 100].count("canary") - 5) <= 1
