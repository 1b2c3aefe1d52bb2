"""`latency: {per_output_token: true}`: a non-streamed success counts as upstream time per
output token, so a provider that gives long answers is not ranked slower than one giving
short answers at the same speed per token. Real gateways over loopback, on memory and on a
real Redis, with two upstreams whose reply time is proportional to the tokens they return."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.support.gateway import running_app, running_gateway

MS_PER_TOKEN = 0.5
LONG, SHORT = 400, 8  # output tokens per answer: 200 ms and 4 ms of "generation"


def token_upstream(tokens: int) -> web.Application:
    """An OpenAI-compatible upstream that takes MS_PER_TOKEN per output token."""

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        await asyncio.sleep(tokens * MS_PER_TOKEN / 1000)
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "word " * tokens},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": 5,
                    "completion_tokens": tokens,
                    "total_tokens": 5 + tokens,
                },
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


@asynccontextmanager
async def upstreams() -> AsyncIterator[tuple[str, str]]:
    async with (
        running_app(token_upstream(LONG)) as long_url,
        running_app(token_upstream(SHORT)) as short_url,
    ):
        yield long_url, short_url


def document(
    long_url: str, short_url: str, latency: dict[str, Any], state: dict[str, Any]
) -> dict[str, Any]:
    return {
        "providers": [
            {"name": "long", "base_url": f"{long_url}/v1", "api_key": "sk-long"},
            {"name": "short", "base_url": f"{short_url}/v1", "api_key": "sk-short"},
        ],
        "routes": [
            {
                "model": "chat",
                "strategy": "latency",
                # Every request may explore: both targets are measured within a few requests.
                "latency": {"explore_share": 1.0, "explore_after_s": 60, **latency},
                "targets": [
                    {"provider": "long", "model": "m-long"},
                    {"provider": "short", "model": "m-short"},
                ],
            }
        ],
        "state": state,
    }


async def estimates(url: str, session: aiohttp.ClientSession) -> dict[str, float | None]:
    """Send requests until both targets have an estimate; each provider's estimate."""
    body = {"model": "chat", "messages": [{"role": "user", "content": "tell me"}]}
    for _ in range(30):
        async with session.post(f"{url}/v1/chat/completions", json=body) as response:
            assert response.status == 200, await response.text()
            await response.read()
        async with session.get(f"{url}/v1/routes/chat/explain") as response:
            explained = await response.json()
        found = {t["provider"]: t["estimate"]["latency_ms"] for t in explained["targets"]}
        if None not in found.values():
            return found
    raise AssertionError(f"both targets were never measured: {found}")


@pytest.fixture(params=["memory", "redis"])
def state(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "memory":
        return {}
    server = request.getfixturevalue("redis_server")
    return {"redis_url": server.url, "timeout_ms": 2000}


async def test_long_answers_are_not_ranked_slower_per_output_token(state: dict[str, Any]) -> None:
    async with upstreams() as (long_url, short_url):
        config = document(long_url, short_url, {"per_output_token": True}, state)
        async with running_gateway(config) as (url, _), aiohttp.ClientSession() as session:
            found = await estimates(url, session)
    # ms per output token: the long answers' ~0.5, the short ones' at least that (the fixed
    # cost of a request weighs on 8 tokens, not on 400).
    assert found["long"] is not None and found["short"] is not None
    assert found["long"] <= found["short"], found
    assert found["long"] < 5  # per token, not the 200 ms the answer took


async def test_without_it_long_answers_look_slow(state: dict[str, Any]) -> None:
    async with upstreams() as (long_url, short_url):
        config = document(long_url, short_url, {}, state)
        async with running_gateway(config) as (url, _), aiohttp.ClientSession() as session:
            found = await estimates(url, session)
    assert found["long"] is not None and found["short"] is not None
    assert found["long"] > found["short"], found  # the whole answer's time: 200 ms vs 4 ms
