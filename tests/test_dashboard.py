"""The Grafana dashboard: well-formed, shipped unchanged by the chart, and every metric its
queries use exists on a live gateway's /metrics (on Redis state, after real traffic)."""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import Any

import aiohttp

from edgeroute.mock_provider import MockSettings
from tests.support.gateway import gateway_config, mock_upstreams, running_gateway

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "edgeroute.json"
CHART_COPY = ROOT / "helm" / "edgeroute" / "dashboards" / "edgeroute.json"
METRIC = re.compile(r"\bedgeroute_[a-z0-9_]+\b")


def _queries(node: Any) -> list[str]:
    """Every PromQL string: panel targets' `expr` and the template variables' queries."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition", "query") and isinstance(value, str):
                found.append(value)
            else:
                found.extend(_queries(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_queries(item))
    return found


def _used_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {m for q in _queries(dashboard) for m in METRIC.findall(q)}


def _exposed(text: str) -> set[str]:
    """Series names on /metrics, and the names of families that have no child yet."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
            names |= {family + s for s in suffixes}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_the_dashboard_covers_what_operators_need() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["title"] == "edgeroute"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "route"} <= variables
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
    assert _used_metrics() >= {
        "edgeroute_requests_total",  # traffic and errors per route and target
        "edgeroute_upstream_attempts_total",
        "edgeroute_breaker_state",  # breaker states over time
        "edgeroute_breaker_transitions_total",
        "edgeroute_failovers_total",
        "edgeroute_request_duration_seconds_bucket",  # latency percentiles
        "edgeroute_upstream_duration_seconds_bucket",
        "edgeroute_time_to_first_token_seconds_bucket",
        "edgeroute_gateway_overhead_seconds_bucket",
        "edgeroute_state_call_seconds_bucket",  # shared-state latency and degraded time
        "edgeroute_state_degraded",
        "edgeroute_tokens_total",  # tokens and cost
        "edgeroute_cost_usd_total",
        "edgeroute_config_info",  # the fleet's configs
    }


def test_the_chart_ships_the_same_dashboard() -> None:
    assert CHART_COPY.read_bytes() == DASHBOARD.read_bytes(), (
        "copy deploy/grafana/edgeroute.json to helm/edgeroute/dashboards/ (Helm reads files "
        "only from inside the chart)"
    )


async def test_every_metric_the_dashboard_queries_exists_on_a_live_gateway(
    redis_url: str,
) -> None:
    async with mock_upstreams(bad=MockSettings(error_rate=1.0), good=MockSettings()) as mocks:
        document = gateway_config(
            mocks,
            [
                {
                    "model": "chat",
                    "strategy": "cost",
                    "targets": [
                        {"provider": "bad", "model": "m", "input_cost_per_mtok": 0.1},
                        {
                            "provider": "good",
                            "model": "m",
                            "input_cost_per_mtok": 1.0,
                            "output_cost_per_mtok": 2.0,
                        },
                    ],
                }
            ],
            state={"redis_url": redis_url, "key_prefix": f"dash-{secrets.token_hex(4)}"},
        )
        body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
        async with running_gateway(document) as (url, _), aiohttp.ClientSession() as session:
            for stream in (False, True):
                async with session.post(
                    f"{url}/v1/chat/completions", json={**body, "stream": stream}
                ) as response:
                    assert response.status == 200
                    await response.read()
            async with session.get(f"{url}/metrics") as response:
                exposed = _exposed(await response.text())
    missing = _used_metrics() - exposed
    assert not missing, f"the dashboard queries metrics /metrics does not have: {missing}"
