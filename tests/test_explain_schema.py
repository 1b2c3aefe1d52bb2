"""One explanation, one JSON schema: the gateway's HTTP explain and `/admin/state` say exactly
what `edgeroute explain --json` and `edgeroute state --json` say, read from the same Redis."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.support.gateway import gateway_config, get_json, mock_upstreams, running_gateway

# What ticks with the clock between two reads; everything else must be identical.
_TICKING = ("open_remaining_ms", "cooldown_remaining_ms", "excluded_for_ms")


def _steady(explanation: dict[str, Any]) -> dict[str, Any]:
    targets = []
    for item in explanation["targets"]:
        item = {k: v for k, v in item.items() if k not in _TICKING}
        # The estimate's age (and so its staleness) ticks between the two reads too.
        item["estimate"] = {
            k: v for k, v in item["estimate"].items() if k not in ("age_ms", "stale", "waiting_ms")
        }
        if item["excluded_because"] is not None:
            item["excluded_because"] = item["excluded_because"].split(" for ")[0]
        targets.append(item)
    return {**explanation, "targets": targets}


async def _cli(config: Path, *argv: str) -> Any:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edgeroute.cli",
        *argv,
        "--config",
        str(config),
        "--json",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return json.loads(out)


async def test_http_and_cli_give_the_same_json(redis_url: str, tmp_path: Path) -> None:
    from edgeroute.mock_provider import MockSettings

    async with mock_upstreams(good=MockSettings(), sick=MockSettings(error_rate=1.0)) as mocks:
        document = gateway_config(
            mocks,
            [
                {
                    "model": "chat",
                    "strategy": "cost",
                    "targets": [
                        {"provider": "sick", "model": "m", "input_cost_per_mtok": 1.0},
                        {"provider": "good", "model": "m", "input_cost_per_mtok": 2.0},
                    ],
                },
                {
                    "model": "rr",
                    "strategy": "round_robin",
                    "targets": [
                        {"provider": "good", "model": "a"},
                        {"provider": "good", "model": "b"},
                    ],
                },
            ],
            server={"admin_token": "admin-secret"},
            breaker={"failure_threshold": 2, "open_timeout_s": 120},
            state={"redis_url": redis_url, "key_prefix": f"schema-{uuid.uuid4().hex[:8]}"},
        )
        path = tmp_path / "edgeroute.yaml"
        path.write_text(yaml.safe_dump(document))
        async with running_gateway(document) as (url, _app), aiohttp.ClientSession() as http:
            body = {"messages": [{"role": "user", "content": "hi"}]}
            for model in ("chat", "chat", "chat", "rr", "rr", "rr"):
                async with http.post(
                    f"{url}/v1/chat/completions", json={"model": model, **body}
                ) as response:
                    assert response.status == 200, await response.text()

            async def settled() -> dict[str, Any]:
                for _ in range(100):  # outcomes are recorded off the request path
                    _, state = await get_json(
                        f"{url}/admin/state", headers={"Authorization": "Bearer admin-secret"}
                    )
                    if all(
                        t["in_flight"] == 0
                        for route in state["routes"].values()
                        for t in route["targets"]
                    ):
                        return dict(state)
                    await asyncio.sleep(0.05)
                raise AssertionError("in-flight leases never settled")

            admin_state = await settled()
            _, http_explain = await get_json(f"{url}/v1/routes/chat/explain")
            cli_explain = await _cli(path, "explain", "chat")
            cli_state = await _cli(path, "state")

    assert _steady(http_explain) == _steady(cli_explain)
    assert cli_state.keys() == admin_state.keys() == {"state_backend", "shared_state", "routes"}
    assert (cli_state["state_backend"], admin_state["state_backend"]) == ("redis", "redis")
    assert list(cli_state["routes"]) == list(admin_state["routes"]) == ["chat", "rr"]
    for name in ("chat", "rr"):
        assert _steady(cli_state["routes"][name]) == _steady(admin_state["routes"][name])
    chat = {t["target"]: t for t in http_explain["targets"]}
    assert chat["sick:m"]["excluded"] == "breaker_open"
    assert chat["sick:m"]["rank"] is None and chat["good:m"]["rank"] == 1
    rr = admin_state["routes"]["rr"]
    # Three requests took cursors 1..3: the next takes 4, and its reason says so.
    assert rr["rr_cursor"] == 4
    assert rr["reason"].startswith("round_robin: cursor 4 ")
    assert "admin-secret" not in json.dumps(cli_state) + json.dumps(admin_state)
