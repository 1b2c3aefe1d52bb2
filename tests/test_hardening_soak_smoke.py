"""Smoke test of bench/soak.py: `--quick --json` survives hostile upstreams and clients.

A few seconds of mixed load is no soak, but it proves the bench runs end to end and already
holds the soak's promises: no failed well-behaved request, every hostile request answered in
JSON or closed, in-flight and leases back to zero, descriptors and memory where they started.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.bench import run_quick


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    return run_quick("soak.py", timeout_s=180)


def test_well_behaved_clients_never_fail(report: dict[str, Any]) -> None:
    requests = report["requests"]
    assert requests["ok"] > 0
    assert requests["failed"] == 0, requests["failures"]
    assert report["gateway_alive"]


def test_the_hostile_upstream_was_met_and_survived(report: dict[str, Any]) -> None:
    failures = report["hostile_upstream_failures"]
    assert sum(failures.values()) > 0, failures
    assert set(failures) <= {
        "bad_response",
        "response_too_large",
        "server_error",
        "timeout",
        "stream_error",
        "connect_error",
    }


def test_hostile_clients_get_json_or_are_closed(report: dict[str, Any]) -> None:
    hostile = report["hostile"]
    assert not {k: v for k, v in hostile.items() if k.endswith("_not_json")}, hostile
    assert hostile.get("slowloris_closed_by_gateway", 0) > 0
    assert hostile.get("idle_closed_by_gateway", 0) > 0


def test_resources_return_to_where_they_started(report: dict[str, Any]) -> None:
    start, end = report["start"], report["end"]
    assert end["in_flight"] == 0 and end["leases"] == 0
    assert end["fds"] <= start["fds"] + 50
    assert end["rss_mib"] <= start["rss_mib"] + 100
