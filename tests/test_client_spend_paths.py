"""A client's spend and lease on every way a served request can end: a stream cut by the
upstream before its usage, a client that leaves mid-stream, an upstream that never reports
usage. In-process gateways over a real loopback upstream, on memory and on a real Redis
(lua/client.lua); the client is the official OpenAI SDK or raw aiohttp where it must leave
mid-stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletionMessageParam

from edgeroute.request import estimate_usage
from tests.support.backends import GATEWAY_KINDS, gateway_state, table
from tests.support.gateway import running_app, running_gateway, wait_until

KEY = "sk-team-secret-key"
PRICE = 1000.0  # USD per million tokens, both ways: a token costs $0.001
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "tell me everything"}]


def _chunk(content: str) -> bytes:
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


@asynccontextmanager
async def upstream(mode: str) -> AsyncIterator[str]:
    """`cut`: one chunk, then the connection closes (no usage, no [DONE]); `hang`: one chunk,
    then nothing until the gateway lets go; `no_usage`: a whole reply without `usage`."""

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if mode == "no_usage":
            return web.json_response(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "ok"},
                            "finish_reason": "stop",
                        }
                    ],
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_chunk("partial answer"))
        if mode == "cut":
            assert request.transport is not None
            request.transport.close()
            return response
        await asyncio.sleep(30)
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    async with running_app(app, handler_cancellation=True) as url:
        yield f"{url}/v1"


@pytest.fixture(params=table(GATEWAY_KINDS))
def state_section(request: pytest.FixtureRequest) -> dict[str, Any]:
    return gateway_state(request, "spend")


def _document(base_url: str, state: dict[str, Any]) -> dict[str, Any]:
    return {
        "providers": [{"name": "up", "base_url": base_url, "api_key": "k", "timeout_s": 5}],
        "routes": [
            {
                "model": "chat",
                "targets": [
                    {
                        "provider": "up",
                        "model": "m",
                        "input_cost_per_mtok": PRICE,
                        "output_cost_per_mtok": PRICE,
                    }
                ],
            }
        ],
        "server": {
            "admin_token": "admin",
            "clients": [
                {
                    "name": "team",
                    "key": KEY,
                    "max_concurrency": 1,
                    "budget": {"usd": 100, "period": "day"},
                }
            ],
        },
        **state,
    }


async def _standing(url: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/admin/clients", headers={"Authorization": "Bearer admin"}) as r,
    ):
        listed: dict[str, Any] = await r.json()
    standing: dict[str, Any] = listed["clients"][0]
    return standing


def _estimated_usd(body: dict[str, Any]) -> float:
    """The request's estimate, as the gateway makes it from the compact JSON sent."""
    fields = msgspec.json.decode(msgspec.json.encode(body), type=dict[str, msgspec.Raw])
    usage = estimate_usage(fields)
    return (usage.prompt_tokens + usage.completion_tokens) * PRICE / 1e6


async def _settled(url: str, usd: float) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def check() -> bool:
        seen.update(await _standing(url))
        return bool(
            abs(seen["budget"]["spent_usd"] - usd) < 1e-9 and seen["concurrency"]["in_flight"] == 0
        )

    try:
        await wait_until(check, timeout=10)
    except AssertionError:
        raise AssertionError(f"spend/lease not settled as {usd}: {seen}") from None
    return seen


async def test_a_stream_cut_before_its_usage_is_charged_its_estimate(
    state_section: dict[str, Any],
) -> None:
    body = {"model": "chat", "messages": MESSAGES, "stream": True, "max_tokens": 100}
    async with (
        upstream("cut") as base,
        running_gateway(_document(base, state_section)) as (url, _),
    ):
        sdk = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        stream = await sdk.chat.completions.create(
            model="chat", messages=MESSAGES, stream=True, max_tokens=100
        )
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
        await _settled(url, _estimated_usd(body))


async def test_a_client_leaving_mid_stream_pays_the_estimate_and_frees_its_lease(
    state_section: dict[str, Any],
) -> None:
    body = {"model": "chat", "messages": MESSAGES, "stream": True, "max_tokens": 100}
    async with (
        upstream("hang") as base,
        running_gateway(_document(base, state_section)) as (url, _),
    ):
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{url}/v1/chat/completions",
                data=msgspec.json.encode(body),
                headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
            ) as response,
        ):
            assert response.status == 200
            assert b"partial answer" in await response.content.readuntil(b"\n\n")
        await _settled(url, _estimated_usd(body))


async def test_a_reply_without_usage_is_charged_its_estimate(
    state_section: dict[str, Any],
) -> None:
    body = {"model": "chat", "messages": MESSAGES, "max_tokens": 10}
    async with (
        upstream("no_usage") as base,
        running_gateway(_document(base, state_section)) as (url, _),
    ):
        sdk = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        await sdk.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=10)
        await _settled(url, _estimated_usd(body))
