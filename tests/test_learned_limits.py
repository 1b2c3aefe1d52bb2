"""Learned provider limits: rate-limit headers read by the adapters, and a target whose
provider says it has 0 left kept out fleet-wide (two real replicas on one real Redis) until
the provider's reset."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from edgeroute.providers.base import parse_limit_reset, parse_reset
from tests.support.gateway import GatewayProcess, get_json, running_app
from tests.support.redis_servers import RedisServer, free_port

# 2027-01-15T08:00:00Z, the "now" of the RFC 3339 cases.
NOW = datetime.fromisoformat("2027-01-15T08:00:00+00:00").timestamp()


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("6m0s", 360.0),
        ("1s", 1.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("2.5", 2.5),
        ("2027-01-15T08:00:10Z", 10.0),
        ("2027-01-15T08:00:10+00:00", 10.0),
        ("2027-01-15T07:59:00Z", 0.0),
        ("nonsense", 0.0),
        ("5x", 0.0),
    ],
)
def test_reset_values_in_every_provider_format(value: str, seconds: float) -> None:
    assert parse_reset(value, NOW) == pytest.approx(seconds)


def test_only_a_spent_limit_counts_and_the_latest_reset_wins() -> None:
    openai = {
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    assert parse_limit_reset(openai) == 360.0
    assert parse_limit_reset({**openai, "x-ratelimit-remaining-tokens": "17"}) == 1.0
    assert parse_limit_reset({"x-ratelimit-remaining-requests": "3"}) == 0.0
    assert parse_limit_reset({}) == 0.0
    anthropic = {
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": "2027-01-15T08:00:30Z",
        "anthropic-ratelimit-tokens-remaining": "500",
        "anthropic-ratelimit-tokens-reset": "2027-01-15T08:05:00Z",
    }
    assert parse_limit_reset(anthropic, NOW) == pytest.approx(30.0)


def _completion(model: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "ok"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }


def _upstream(name: str, headers: Mapping[str, str], served: list[str]) -> web.Application:
    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        served.append(name)
        return web.json_response(_completion(body["model"]), headers=headers)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


@pytest.mark.slow
async def test_a_provider_saying_zero_remaining_is_out_fleet_wide_until_its_reset(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    served: list[str] = []
    spent = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "10s"}
    async with (
        running_app(_upstream("limited", spent, served)) as limited_url,
        running_app(_upstream("spare", {}, served)) as spare_url,
    ):
        document = {
            "providers": [
                {"name": "limited", "base_url": f"{limited_url}/v1", "api_key": "k"},
                {"name": "spare", "base_url": f"{spare_url}/v1", "api_key": "k"},
            ],
            "routes": [
                {
                    "model": "chat",
                    "strategy": "cost",
                    "targets": [
                        {"provider": "limited", "model": "m", "id": "limited"},
                        {
                            "provider": "spare",
                            "model": "m",
                            "id": "spare",
                            "input_cost_per_mtok": 1,
                        },
                    ],
                }
            ],
            "state": {
                "redis_url": redis_server.url,
                "key_prefix": f"learned-{free_port()}",
                # About shared state, never degraded mode: a loaded machine must not time out.
                "timeout_ms": 3000,
            },
        }
        gateways = [GatewayProcess(document, tmp_path, port=free_port()) for _ in range(2)]
        try:
            await asyncio.gather(*(asyncio.to_thread(g.wait_ready, 60.0) for g in gateways))
            body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
            async with aiohttp.ClientSession() as session:

                async def chat(gateway: GatewayProcess) -> str:
                    async with session.post(
                        f"{gateway.url}/v1/chat/completions", json=body
                    ) as response:
                        assert response.status == 200, await response.text()
                        return response.headers["x-edgeroute-provider"]

                assert await chat(gateways[0]) == "limited"

                async def learned() -> dict[str, Any]:
                    status, explained = await get_json(f"{gateways[1].url}/v1/routes/chat/explain")
                    assert status == 200
                    rows: dict[str, dict[str, Any]] = {t["target"]: t for t in explained["targets"]}
                    return rows["limited"]

                # The outcome is recorded off the request path: wait for it to land.
                for _ in range(1000):
                    row = await learned()
                    if row["excluded"] == "learned_limit":
                        break
                    await asyncio.sleep(0.02)
                assert row["excluded"] == "learned_limit", row
                assert 0 < row["excluded_for_ms"] <= 10_000
                assert [await chat(gateways[1]), await chat(gateways[0])] == ["spare", "spare"]
                assert served == ["limited", "spare", "spare"]
                await asyncio.sleep(row["excluded_for_ms"] / 1000 + 0.1)
                assert (await learned())["excluded"] is None
        finally:
            for gateway in gateways:
                gateway.kill()
