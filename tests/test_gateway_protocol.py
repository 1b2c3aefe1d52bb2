"""The gateway's OpenAI protocol, end to end over real loopback HTTP.

Clients are the official `openai` SDK (sync in a worker thread, and async) or raw aiohttp
where the SDK would hide what is under test; upstreams are `edgeroute.mock_provider` apps
(plus a small slow-streaming upstream defined here) on loopback.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from edgeroute.config import parse_config
from edgeroute.errors import ConfigError
from edgeroute.mock_provider import MockSettings
from edgeroute.server import PROXY
from tests.support import sdk
from tests.support.ci import missing
from tests.support.gateway import (
    Mock,
    gateway_config,
    get_json,
    mock_upstreams,
    running_app,
    running_gateway,
    wait_until,
)

Mode = sdk.Mode
MODES: list[Mode] = ["sync", "async"]

CLIENT_KEY = "client-key-0123456789"
HASHED_CLIENT_KEY = "hashed-client-key-abcdef"
ADMIN_TOKEN = "admin-token-0123456789"
MESSAGES: list[Any] = [{"role": "user", "content": "Route me through the gateway, please."}]
A_PRICES = (1.5, 6.0)  # input / output USD per million tokens
B_PRICES = (3.0, 12.0)


def chat_routes(*, failure_threshold: int = 100) -> list[dict[str, Any]]:
    """`chat` prefers a (cheaper) over b; `text` and `embed` live on a only."""
    return [
        {
            "model": "chat",
            "strategy": "cost",
            "breaker": {"failure_threshold": failure_threshold},
            "targets": [
                {
                    "provider": "a",
                    "model": "a-chat",
                    "input_cost_per_mtok": A_PRICES[0],
                    "output_cost_per_mtok": A_PRICES[1],
                },
                {
                    "provider": "b",
                    "model": "b-chat",
                    "input_cost_per_mtok": B_PRICES[0],
                    "output_cost_per_mtok": B_PRICES[1],
                },
            ],
        },
        {
            "model": "text",
            "strategy": "cost",
            "targets": [{"provider": "a", "model": "a-instruct"}],
        },
        {"model": "embed", "strategy": "cost", "targets": [{"provider": "a", "model": "a-embed"}]},
    ]


@dataclass
class Env:
    url: str
    app: web.Application
    mocks: dict[str, Mock]
    key: str | None = CLIENT_KEY

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def sync_client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.v1, api_key=key or self.key or "unused", max_retries=0, timeout=15
        )

    def async_client(self, key: str | None = None) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=self.v1, api_key=key or self.key or "unused", max_retries=0, timeout=15
        )

    async def explain(self, route: str = "chat") -> dict[str, Any]:
        status, body = await get_json(f"{self.v1}/routes/{route}/explain", headers=self.auth)
        assert status == 200, body
        return dict(body)

    async def target(self, target_id: str, route: str = "chat") -> dict[str, Any]:
        explanation = await self.explain(route)
        return next(t for t in explanation["targets"] if t["target"] == target_id)

    async def metrics_text(self) -> str:
        async with aiohttp.ClientSession() as session, session.get(f"{self.url}/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain")
            return await r.text()

    async def post(
        self, path: str, *, data: Any = None, json_body: Any = None, headers: Any = None
    ) -> tuple[int, CIMultiDict[str], bytes]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{self.url}{path}",
                data=data,
                json=json_body,
                headers={**self.auth, **(headers or {})},
            ) as response,
        ):
            return response.status, CIMultiDict(response.headers), await response.read()


@asynccontextmanager
async def gateway(
    a: MockSettings | None = None,
    b: MockSettings | None = None,
    *,
    routes: list[dict[str, Any]] | None = None,
    server: dict[str, Any] | None = None,
    extra_providers: list[dict[str, Any]] | None = None,
    **sections: Any,
) -> AsyncIterator[Env]:
    server_section = {"api_keys": [CLIENT_KEY], "admin_token": ADMIN_TOKEN, **(server or {})}
    async with mock_upstreams(a=a or MockSettings(), b=b or MockSettings()) as mocks:
        document = gateway_config(mocks, routes or chat_routes(), server=server_section, **sections)
        document["providers"].extend(extra_providers or [])
        async with running_gateway(document) as (url, app):
            keys = server_section["api_keys"]
            yield Env(url, app, mocks, CLIENT_KEY if CLIENT_KEY in keys else None)


# --- SDK helpers: one code path per mode, the sync client always in a worker thread ---------


async def sdk_chat(env: Env, mode: Mode, **kwargs: Any) -> tuple[Any, dict[str, str]]:
    """A non-streaming chat completion; returns (parsed ChatCompletion, response headers)."""
    kwargs.setdefault("model", "chat")
    kwargs.setdefault("messages", MESSAGES)
    return await sdk.chat(env, mode, **kwargs)


async def sdk_stream(env: Env, mode: Mode, **kwargs: Any) -> tuple[list[Any], dict[str, str]]:
    """A streamed chat completion, fully consumed; returns (chunks, response headers)."""
    kwargs.setdefault("model", "chat")
    kwargs.setdefault("messages", MESSAGES)
    return await sdk.stream(env, mode, **kwargs)


def streamed_text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def expected_body(sent: dict[str, Any], model: str, **overrides: Any) -> dict[str, Any]:
    return {**sent, "model": model, **overrides}


# --- chat, completions, embeddings ----------------------------------------------------------


TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    }
]


@pytest.mark.parametrize("mode", MODES)
async def test_chat_non_streaming_reaches_target_with_body_intact(mode: Mode) -> None:
    async with gateway() as env:
        completion, headers = await sdk_chat(
            env,
            mode,
            temperature=0.3,
            tools=TOOLS,
            tool_choice="auto",
            metadata={"team": "routing", "ticket": "ER-1"},
            max_tokens=77,
            extra_body={"vendor_extension": {"nested": [1, 2.5, None, "ü"]}},
        )
        assert completion.model == "a-chat"
        assert (
            completion.choices[0].message.content == "Hello from a (a-chat). This is a mock reply."
        )
        assert completion.choices[0].finish_reason == "stop"
        assert completion.usage is not None and completion.usage.completion_tokens > 0
        assert headers["x-edgeroute-provider"] == "a"
        assert headers["x-edgeroute-model"] == "a-chat"
        assert headers["x-edgeroute-attempts"] == "1"
        assert headers["x-request-id"]

        stats = await env.mocks["a"].stats()
        assert stats["by_path"] == {"/v1/chat/completions": 1}
        sent = {
            "model": "chat",
            "messages": MESSAGES,
            "temperature": 0.3,
            "tools": TOOLS,
            "tool_choice": "auto",
            "metadata": {"team": "routing", "ticket": "ER-1"},
            "max_tokens": 77,
            "vendor_extension": {"nested": [1, 2.5, None, "ü"]},
        }
        assert stats["last_body"] == expected_body(sent, "a-chat")
        assert await env.mocks["b"].requests() == 0


@pytest.mark.parametrize("include_usage", [False, True], ids=["no-usage", "usage"])
@pytest.mark.parametrize("mode", MODES)
async def test_chat_streaming_usage_only_when_asked(mode: Mode, include_usage: bool) -> None:
    async with gateway() as env:
        kwargs: dict[str, Any] = {"temperature": 0.2, "metadata": {"k": "v"}}
        if include_usage:
            kwargs["stream_options"] = {"include_usage": True}
        chunks, headers = await sdk_stream(env, mode, **kwargs)

        assert headers["content-type"].startswith("text/event-stream")
        assert headers["x-edgeroute-provider"] == "a"
        assert streamed_text(chunks) == "Hello from a (a-chat). This is a mock reply."
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        with_usage = [c for c in chunks if c.usage is not None]
        if include_usage:
            assert len(with_usage) == 1 and with_usage[0] is chunks[-1]
            assert chunks[-1].choices == []
            assert chunks[-1].usage.completion_tokens > 0
        else:
            assert with_usage == []
            assert all(c.choices for c in chunks), "a usage-only chunk leaked to the client"

        # Upstream always gets include_usage (edgeroute needs the counts), the rest untouched.
        body = (await env.mocks["a"].stats())["last_body"]
        sent = {"model": "chat", "messages": MESSAGES, "stream": True, **kwargs}
        assert body == expected_body(sent, "a-chat", stream_options={"include_usage": True})

        # ...and the gateway counted the tokens either way.
        families = parse_metrics(await env.metrics_text())
        labels = {"route": "chat", "provider": "a", "model": "a-chat"}
        assert sample(families, "edgeroute_tokens_total", kind="completion", **labels) > 0


@pytest.mark.parametrize("mode", MODES)
async def test_completions_and_embeddings(mode: Mode) -> None:
    async with gateway() as env:

        def sync_calls() -> tuple[Any, list[Any], Any]:
            with env.sync_client() as client:
                completion = client.completions.create(model="text", prompt="Hi", max_tokens=5)
                stream = list(client.completions.create(model="text", prompt="Hi", stream=True))
                embedding = client.embeddings.create(model="embed", input=["one", "two"])
                return completion, stream, embedding

        if mode == "sync":
            completion, stream, embedding = await asyncio.to_thread(sync_calls)
        else:
            async with env.async_client() as client:
                completion = await client.completions.create(
                    model="text", prompt="Hi", max_tokens=5
                )
                stream = [
                    c
                    async for c in await client.completions.create(
                        model="text", prompt="Hi", stream=True
                    )
                ]
                embedding = await client.embeddings.create(model="embed", input=["one", "two"])

        assert completion.model == "a-instruct"
        assert completion.choices[0].text == "Hello from a (a-instruct). This is a mock reply."
        assert "".join(c.choices[0].text for c in stream if c.choices) == completion.choices[0].text
        assert all(c.usage is None and c.choices for c in stream)
        assert embedding.model == "a-embed"
        assert [d.index for d in embedding.data] == [0, 1]
        assert len(embedding.data[0].embedding) == 8

        stats = await env.mocks["a"].stats()
        assert stats["by_path"] == {"/v1/completions": 2, "/v1/embeddings": 1}
        assert stats["last_body"]["model"] == "a-embed"
        assert stats["last_body"]["input"] == ["one", "two"]


async def test_raw_body_bytes_other_than_model_are_forwarded_verbatim() -> None:
    """Numbers, key order and unicode survive: only `model` is re-encoded."""
    raw = (
        b'{"messages":[{"role":"user","content":"caf\\u00e9 \xe2\x9c\x93"}],'
        b'"model":"chat","temperature":0.30000000000000004,"seed":12345678901234567890,'
        b'"logit_bias":{"50256":-100},"user":"u-1"}'
    )
    async with gateway() as env:
        status, _, _ = await env.post(
            "/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"}
        )
        assert status == 200
        provider = env.mocks["a"].provider
        assert provider.last_body is not None
        forwarded = bytes(provider.last_body)
        assert b'"model":"a-chat"' in forwarded
        for piece in (
            b'"messages":[{"role":"user","content":"caf\\u00e9 \xe2\x9c\x93"}]',
            b'"temperature":0.30000000000000004',
            b'"seed":12345678901234567890',
            b'"logit_bias":{"50256":-100}',
            b'"user":"u-1"',
        ):
            assert piece in forwarded, (piece, forwarded)


# --- streaming failure modes ----------------------------------------------------------------


class SlowStreamUpstream:
    """An OpenAI-compatible upstream that streams one chunk every `interval_s`."""

    def __init__(self, chunks: int = 200, interval_s: float = 0.02) -> None:
        self.chunks = chunks
        self.interval_s = interval_s
        self.in_flight = 0
        self.sent = 0
        self.completed = 0
        self.stopped_early = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.in_flight += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        try:
            await response.prepare(request)
            for i in range(self.chunks):
                chunk = {
                    "id": "chatcmpl-slow",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}
                    ],
                }
                await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.sent += 1
                await asyncio.sleep(self.interval_s)
            await response.write(b"data: [DONE]\n\n")
            self.completed += 1
        except (asyncio.CancelledError, ConnectionResetError):
            self.stopped_early += 1
            raise
        finally:
            self.in_flight -= 1
        return response


async def test_client_disconnect_mid_stream_cancels_upstream_and_charges_nobody() -> None:
    upstream = SlowStreamUpstream()
    async with running_app(upstream.app(), handler_cancellation=True) as slow_url:
        slow = {"name": "slow", "base_url": f"{slow_url}/v1", "api_key": "sk-slow-secret"}
        routes = [{"model": "slow", "targets": [{"provider": "slow", "model": "slow-1"}]}]
        async with gateway(routes=routes, extra_providers=[slow]) as env:
            async with aiohttp.ClientSession() as session:
                response = await session.post(
                    f"{env.v1}/chat/completions",
                    json={"model": "slow", "messages": MESSAGES, "stream": True},
                    headers=env.auth,
                )
                assert response.status == 200
                received = b""
                while received.count(b"data: ") < 3:
                    received += await response.content.readany()
                assert upstream.in_flight == 1
                response.close()  # the client goes away mid-stream

            await wait_until(lambda: upstream.in_flight == 0, timeout=3)
            assert upstream.completed == 0 and upstream.stopped_early == 1
            assert upstream.sent < upstream.chunks
            await wait_until(lambda: env.app[PROXY].in_flight == 0, timeout=3)

            async def released() -> bool:
                status, state = await get_json(
                    f"{env.url}/admin/state", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
                )
                assert status == 200, state
                return bool(state["routes"]["slow"]["targets"][0]["in_flight"] == 0)

            await wait_until(released, timeout=3)
            target = await env.target("slow:slow-1", route="slow")
            assert target["breaker"] == "closed"
            assert target["consecutive_failures"] == 0
            assert target["window"]["failures"] == 0
            families = parse_metrics(await env.metrics_text())
            assert sample(families, "edgeroute_in_flight_requests") == 0


async def test_client_disconnect_before_first_byte_cancels_upstream() -> None:
    async with gateway(a=MockSettings(fault="hang")) as env:
        async with env.async_client() as client:
            task = asyncio.create_task(
                client.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
            )
            mock = env.mocks["a"]
            await wait_until(lambda: mock.provider.in_flight == 1, timeout=3)
            assert env.app[PROXY].in_flight == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await wait_until(lambda: mock.provider.in_flight == 0, timeout=3)
        await wait_until(lambda: env.app[PROXY].in_flight == 0, timeout=3)

        async def released() -> bool:
            return bool((await env.target("a:a-chat"))["in_flight"] == 0)

        await wait_until(released, timeout=3)
        target = await env.target("a:a-chat")
        assert target["consecutive_failures"] == 0 and target["window"]["failures"] == 0
        assert await env.mocks["b"].requests() == 0


async def test_mid_stream_upstream_drop_ends_with_sse_error_and_blames_provider() -> None:
    async with gateway(a=MockSettings(stream_chunks=6)) as env:
        await env.mocks["a"].configure(fault="cut_stream", cut_after_chunks=3, fault_count=1)
        status, headers, body = await env.post(
            "/v1/chat/completions",
            json_body={"model": "chat", "messages": MESSAGES, "stream": True},
        )
        assert status == 200
        assert headers["x-edgeroute-provider"] == "a"
        events = [e for e in body.decode().split("\n\n") if e.strip()]
        assert all(e.startswith("data: ") for e in events)
        payloads = [json.loads(e[6:]) for e in events]
        assert payloads[0]["choices"][0]["delta"]["content"]  # real content reached the client
        error = payloads[-1]["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "stream_error" and "mid-stream" in error["message"]
        assert b"[DONE]" not in body

        async def charged() -> bool:
            return bool((await env.target("a:a-chat"))["window"]["failures"] == 1)

        await wait_until(charged, timeout=3)
        target = await env.target("a:a-chat")
        assert target["consecutive_failures"] == 1
        assert target["in_flight"] == 0
        assert await env.mocks["b"].requests() == 0  # no failover after the first byte


async def test_mid_stream_drop_raises_api_error_in_sdk() -> None:
    async with gateway(a=MockSettings(stream_chunks=6)) as env:
        await env.mocks["a"].configure(fault="cut_stream", cut_after_chunks=3, fault_count=1)
        received: list[Any] = []
        async with env.async_client() as client:
            stream = await client.chat.completions.create(
                model="chat", messages=MESSAGES, stream=True
            )
            with pytest.raises(openai.APIError, match="mid-stream"):
                async for chunk in stream:
                    received.append(chunk)
        assert streamed_text(received)


@pytest.mark.parametrize(
    "fault",
    [
        {"fault": "cut_stream", "cut_after_chunks": 0},
        {"fault": "status", "status": 503},
        {"fault": "reset"},
    ],
    ids=["cut-before-first-event", "503", "reset"],
)
@pytest.mark.parametrize("mode", MODES)
async def test_stream_failing_before_first_byte_fails_over(
    mode: Mode, fault: dict[str, Any]
) -> None:
    async with gateway() as env:
        await env.mocks["a"].configure(fault_count=1, **fault)
        chunks, headers = await sdk_stream(env, mode)
        assert streamed_text(chunks) == "Hello from b (b-chat). This is a mock reply."
        assert headers["x-edgeroute-provider"] == "b"
        assert headers["x-edgeroute-attempts"] == "2"
        assert (await env.mocks["a"].stats())["faults_served"] == 1

        async def charged() -> bool:
            return bool((await env.target("a:a-chat"))["consecutive_failures"] == 1)

        await wait_until(charged, timeout=3)


async def test_non_streaming_failover_is_transparent() -> None:
    async with gateway() as env:
        await env.mocks["a"].configure(fault="status", status=500, fault_count=1)
        completion, headers = await sdk_chat(env, "async")
        assert completion.model == "b-chat"
        assert headers["x-edgeroute-attempts"] == "2"
        body_a = (await env.mocks["a"].stats())["last_body"]
        body_b = (await env.mocks["b"].stats())["last_body"]
        assert body_a["model"] == "a-chat" and body_b["model"] == "b-chat"
        assert body_a["messages"] == body_b["messages"] == MESSAGES


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_upstream_rejecting_our_key_or_deployment_fails_over(status: int) -> None:
    """The client's key never travels upstream: a 401/403/404 there is the provider's fault."""
    async with gateway() as env:
        await env.mocks["a"].configure(fault="status", status=status, fault_count=1)
        completion, headers = await sdk_chat(env, "async")
        assert headers["x-edgeroute-provider"] == "b"
        assert completion.model == "b-chat"

        async def charged() -> bool:
            return bool((await env.target("a:a-chat"))["consecutive_failures"] == 1)

        await wait_until(charged, timeout=3)


# --- auth -----------------------------------------------------------------------------------


def _auth_server() -> dict[str, Any]:
    digest = hashlib.sha256(HASHED_CLIENT_KEY.encode()).hexdigest()
    return {"api_keys": [CLIENT_KEY, f"sha256:{digest}"]}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("key", [CLIENT_KEY, HASHED_CLIENT_KEY], ids=["plain", "sha256"])
async def test_bearer_keys_plain_and_hashed(mode: Mode, key: str) -> None:
    async with gateway(server=_auth_server()) as env:
        env.key = key
        completion, _ = await sdk_chat(env, mode)
        assert completion.model == "a-chat"
        stats = await env.mocks["a"].stats()
        assert stats["last_authorization"] == "Bearer sk-a-secret"
        assert key not in json.dumps(stats["last_headers"])


@pytest.mark.parametrize("key", [CLIENT_KEY, HASHED_CLIENT_KEY], ids=["plain", "sha256"])
async def test_x_api_key_header_accepted(key: str) -> None:
    async with gateway(server=_auth_server()) as env:
        env.key = None
        status, _, _ = await env.post(
            "/v1/chat/completions",
            json_body={"model": "chat", "messages": MESSAGES},
            headers={"x-api-key": key},
        )
        assert status == 200
        stats = await env.mocks["a"].stats()
        assert stats["last_authorization"] == "Bearer sk-a-secret"
        headers = {k.lower(): v for k, v in stats["last_headers"].items()}
        assert "x-api-key" not in headers
        assert key not in json.dumps(stats["last_headers"])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("key", [None, "wrong-key", CLIENT_KEY + "x"], ids=["none", "wrong", "ext"])
async def test_missing_or_wrong_key_is_401(mode: Mode, key: str | None) -> None:
    async with gateway(server=_auth_server()) as env:
        if key is None:
            status, _, body = await env.post(
                "/v1/chat/completions",
                json_body={"model": "chat", "messages": MESSAGES},
                headers={"Authorization": ""},
            )
            assert status == 401
            assert_openai_error(body, code="invalid_api_key")
        else:
            env.key = key
            with pytest.raises(openai.AuthenticationError) as caught:
                await sdk_chat(env, mode)
            assert caught.value.status_code == 401
            assert caught.value.code == "invalid_api_key"
        assert await env.mocks["a"].requests() == 0


async def test_401_carries_request_id() -> None:
    async with gateway() as env:
        env.key = "wrong-key"
        status, headers, _ = await env.post(
            "/v1/chat/completions", json_body={"model": "chat", "messages": MESSAGES}
        )
        assert status == 401
        assert headers.get("x-request-id")


async def test_hop_by_hop_and_client_headers_are_not_forwarded() -> None:
    async with gateway() as env:
        status, _, _ = await env.post(
            "/v1/chat/completions",
            json_body={"model": "chat", "messages": MESSAGES},
            headers={
                "Connection": "keep-alive, X-Drop-Me",
                "Keep-Alive": "timeout=5",
                "TE": "trailers",
                "Proxy-Authorization": "Basic c2VjcmV0OnNlY3JldA==",
                "Proxy-Connection": "keep-alive",
                "X-Drop-Me": "1",
            },
        )
        assert status == 200
        forwarded = {
            k.lower(): v for k, v in (await env.mocks["a"].stats())["last_headers"].items()
        }
        for name in ("keep-alive", "te", "proxy-authorization", "proxy-connection", "x-drop-me"):
            assert name not in forwarded, name
        assert "x-drop-me" not in forwarded.get("connection", "").lower()
        assert forwarded["authorization"] == "Bearer sk-a-secret"


async def test_no_client_keys_configured_means_open_access() -> None:
    async with gateway(server={"api_keys": []}) as env:
        assert env.key is None
        status, _, _ = await env.post(
            "/v1/chat/completions", json_body={"model": "chat", "messages": MESSAGES}
        )
        assert status == 200


# --- bad input ------------------------------------------------------------------------------


def assert_openai_error(
    body: bytes, *, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    document = json.loads(body)
    assert set(document) == {"error"}
    error = document["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return dict(error)


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        (b"{not json", 400, "invalid_json", None),
        (b"", 400, "invalid_json", None),
        (b'[{"model": "chat"}]', 400, "invalid_json", None),
        (b'{"messages": []}', 400, None, "model"),
        (b'{"model": "chat"}', 400, None, "messages"),
        (b'{"model": 5, "messages": []}', 400, None, None),
        (b'{"model": "chat", "messages": [], "stream": "yes"}', 400, None, None),
        (b'{"model": "chat", "messages": [], "stream_options": 3}', 400, None, None),
        (b'{"model": "no-such-route", "messages": []}', 404, "model_not_found", "model"),
    ],
    ids=[
        "invalid-json",
        "empty",
        "array",
        "no-model",
        "no-messages",
        "model-int",
        "stream-str",
        "stream-options-int",
        "unknown-model",
    ],
)
async def test_bad_input(body: bytes, status: int, code: str | None, param: str | None) -> None:
    async with gateway() as env:
        got, headers, payload = await env.post(
            "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        assert got == status, payload
        assert headers.get("x-request-id")
        error = assert_openai_error(payload, code=code, param=param)
        assert error["type"] == "invalid_request_error"
        assert await env.mocks["a"].requests() == 0
        assert await env.mocks["b"].requests() == 0


async def test_bad_input_through_sdk() -> None:
    async with gateway() as env, env.async_client() as client:
        with pytest.raises(openai.NotFoundError) as not_found:
            await client.chat.completions.create(model="gpt-nope", messages=MESSAGES)
        assert not_found.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(
                model="chat", messages=MESSAGES, extra_body={"stream": "yes"}
            )
        assert bad.value.status_code == 400


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_over_limit_is_413(chunked: bool) -> None:
    limit = 2048
    async with gateway(server={"max_body_bytes": limit}) as env:
        payload = json.dumps(
            {"model": "chat", "messages": [{"role": "user", "content": "x" * (limit * 2)}]}
        ).encode()

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(payload), 512):
                yield payload[start : start + 512]

        data: Any = chunks() if chunked else payload
        status, headers, body = await env.post(
            "/v1/chat/completions", data=data, headers={"Content-Type": "application/json"}
        )
        assert status == 413
        assert headers.get("x-request-id")
        assert_openai_error(body, code="request_too_large")
        assert await env.mocks["a"].requests() == 0

        # Right at the limit is fine.
        small = json.dumps({"model": "chat", "messages": MESSAGES}).encode()
        small = small[:-1] + b" " * (limit - len(small)) + b"}"
        assert len(small) == limit
        status, _, _ = await env.post(
            "/v1/chat/completions", data=small, headers={"Content-Type": "application/json"}
        )
        assert status == 200


async def test_upstream_client_error_passes_through() -> None:
    async with gateway() as env:
        await env.mocks["a"].configure(fault="status", status=400, fault_count=1)
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk_chat(env, "async")
        assert caught.value.response.headers["x-edgeroute-provider"] == "a"
        assert caught.value.response.headers["x-request-id"]
        assert_openai_error(caught.value.response.content)
        assert await env.mocks["b"].requests() == 0  # the client's mistake: no failover


# --- metrics --------------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(families: dict[str, Any], name: str, **labels: str) -> float:
    """The value of the sample `name` with exactly `labels`; 0.0 when it does not exist."""
    for family in families.values():
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return 0.0


def samples(families: dict[str, Any], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    family = families.get(name.removesuffix("_total"))
    if family is None:
        return {}
    return {
        tuple(sorted(s.labels.items())): float(s.value) for s in family.samples if s.name == name
    }


def promtool_check(exposition: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        missing("promtool", install="Debian package prometheus")
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=exposition.encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    output = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, output


async def _metrics_traffic(env: Env) -> dict[str, tuple[int, int]]:
    """Two successes on a, failover to b, a passthrough 400, and a 502; returns token counts."""
    tokens: dict[str, tuple[int, int]] = {}
    completion, _ = await sdk_chat(env, "async")
    chunks, _ = await sdk_stream(env, "sync", stream_options={"include_usage": True})
    usage_1, usage_2 = completion.usage, chunks[-1].usage
    tokens["a1"] = (usage_1.prompt_tokens, usage_1.completion_tokens)
    tokens["a2"] = (usage_2.prompt_tokens, usage_2.completion_tokens)

    await env.mocks["a"].configure(fault="status", status=500, fault_count=1)
    completion, headers = await sdk_chat(env, "sync")
    assert headers["x-edgeroute-provider"] == "b"
    tokens["b"] = (completion.usage.prompt_tokens, completion.usage.completion_tokens)

    await env.mocks["a"].configure(fault="status", status=400, fault_count=1)
    with pytest.raises(openai.BadRequestError):
        await sdk_chat(env, "async")

    await env.mocks["a"].configure(error_rate=1)
    await env.mocks["b"].configure(error_rate=1)
    with pytest.raises(openai.APIStatusError) as caught:
        await sdk_chat(env, "async")
    assert caught.value.status_code == 502
    assert caught.value.code == "all_providers_failed"
    await env.mocks["a"].configure(error_rate=0)
    await env.mocks["b"].configure(error_rate=0)
    return tokens


async def test_metrics_after_mixed_traffic() -> None:
    async with gateway(server={"max_attempts": 2}) as env:
        tokens = await _metrics_traffic(env)
        text = await env.metrics_text()
        families = parse_metrics(text)

        assert families
        assert all(name.startswith("edgeroute_") for name in families), sorted(families)
        for secret in (CLIENT_KEY, ADMIN_TOKEN, "sk-a-secret", "sk-b-secret"):
            assert secret not in text

        a = {"route": "chat", "provider": "a", "model": "a-chat"}
        b = {"route": "chat", "provider": "b", "model": "b-chat"}
        requests = samples(families, "edgeroute_requests_total")
        assert requests == {
            tuple(sorted({**a, "outcome": "success"}.items())): 2.0,
            tuple(sorted({**b, "outcome": "success"}.items())): 1.0,
            tuple(sorted({**a, "outcome": "client_error"}.items())): 1.0,
            tuple(sorted({**b, "outcome": "all_providers_failed"}.items())): 1.0,
        }

        prompt_a = tokens["a1"][0] + tokens["a2"][0]
        completion_a = tokens["a1"][1] + tokens["a2"][1]
        assert sample(families, "edgeroute_tokens_total", kind="prompt", **a) == prompt_a
        assert sample(families, "edgeroute_tokens_total", kind="completion", **a) == completion_a
        assert sample(families, "edgeroute_tokens_total", kind="prompt", **b) == tokens["b"][0]
        assert sample(families, "edgeroute_tokens_total", kind="completion", **b) == tokens["b"][1]

        # Same float operations in the same order as the gateway: exact equality.
        cost_a = 0.0
        for prompt, completion in (tokens["a1"], tokens["a2"]):
            cost_a += (prompt * A_PRICES[0] + completion * A_PRICES[1]) / 1_000_000
        cost_b = 0.0 + (tokens["b"][0] * B_PRICES[0] + tokens["b"][1] * B_PRICES[1]) / 1_000_000
        assert cost_a > 0 and cost_b > 0
        assert sample(families, "edgeroute_cost_usd_total", **a) == cost_a
        assert sample(families, "edgeroute_cost_usd_total", **b) == cost_b

        attempts = {"provider": "a", "model": "a-chat"}
        assert sample(families, "edgeroute_upstream_attempts_total", result="ok", **attempts) == 2
        assert (
            sample(families, "edgeroute_upstream_attempts_total", result="server_error", **attempts)
            == 2
        )
        assert (
            sample(families, "edgeroute_upstream_attempts_total", result="client_error", **attempts)
            == 1
        )
        failovers_a = sample(
            families,
            "edgeroute_failovers_total",
            route="chat",
            from_provider="a",
            error="server_error",
        )
        assert failovers_a == 2
        assert sample(families, "edgeroute_in_flight_requests") == 0

        promtool_check(text)


async def test_failovers_metric_counts_only_real_moves() -> None:
    async with gateway(
        a=MockSettings(error_rate=1), b=MockSettings(error_rate=1), server={"max_attempts": 2}
    ) as env:
        with pytest.raises(openai.APIStatusError):
            await sdk_chat(env, "async")
        families = parse_metrics(await env.metrics_text())
        moved = samples(families, "edgeroute_failovers_total")
        assert sum(moved.values()) == 1, moved  # a -> b; b's failure moved nothing


async def test_mid_stream_failure_is_counted_in_requests_metric() -> None:
    async with gateway(a=MockSettings(stream_chunks=6)) as env:
        await env.mocks["a"].configure(fault="cut_stream", cut_after_chunks=3, fault_count=1)
        status, _, body = await env.post(
            "/v1/chat/completions",
            json_body={"model": "chat", "messages": MESSAGES, "stream": True},
        )
        assert status == 200 and b'"error"' in body
        families = parse_metrics(await env.metrics_text())
        counted = samples(families, "edgeroute_requests_total")
        assert sum(counted.values()) == 1, counted


# --- access log -----------------------------------------------------------------------------


def access_records(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "edgeroute.access"]


async def test_access_log_one_json_line_per_request(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with gateway(server={"max_attempts": 2}) as env:
        caplog.clear()
        request_ids: list[str] = []
        _, headers = await sdk_chat(env, "async", extra_headers={"x-request-id": "req-fixed-1"})
        assert headers["x-request-id"] == "req-fixed-1"
        request_ids.append("req-fixed-1")
        _, headers = await sdk_stream(env, "sync")
        request_ids.append(headers["x-request-id"])
        await env.mocks["a"].configure(fault="status", status=500, fault_count=1)
        _, headers = await sdk_chat(env, "async")  # failover
        request_ids.append(headers["x-request-id"])
        status, raw_headers, _ = await env.post("/v1/chat/completions", data=b"{nope")
        assert status == 400
        request_ids.append(raw_headers["x-request-id"])
        await env.mocks["a"].configure(fault="status", status=400, fault_count=1)
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk_chat(env, "async")
        request_ids.append(caught.value.response.headers["x-request-id"])

        records = access_records(caplog)
        assert [r["request_id"] for r in records] == request_ids
        for record in records[:3]:
            assert {
                "route",
                "provider",
                "model",
                "target",
                "attempts",
                "status",
                "duration_ms",
            } <= set(record)
            assert record["route"] == "chat" and record["status"] == 200
            assert isinstance(record["duration_ms"], float | int) and record["duration_ms"] >= 0
        assert (records[0]["provider"], records[0]["model"], records[0]["target"]) == (
            "a",
            "a-chat",
            "a:a-chat",
        )
        assert records[0]["attempts"] == 1 and "ttft_ms" not in records[0]
        assert "ttft_ms" in records[1]
        assert (records[2]["provider"], records[2]["attempts"]) == ("b", 2)
        assert records[3]["status"] == 400 and records[3]["route"] is None
        assert records[4]["status"] == 400 and records[4]["provider"] == "a"

        everything = "\n".join(
            f"{r.getMessage()} {r.args!r} {r.__dict__!r}" for r in caplog.records
        )
        for secret in (CLIENT_KEY, ADMIN_TOKEN, "sk-a-secret", "sk-b-secret"):
            assert secret not in everything


async def test_access_log_records_rejected_auth(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgeroute.access")
    async with gateway() as env:
        caplog.clear()
        env.key = "wrong-key"
        status, _, _ = await env.post(
            "/v1/chat/completions", json_body={"model": "chat", "messages": MESSAGES}
        )
        assert status == 401
        records = access_records(caplog)
        assert len(records) == 1 and records[0]["status"] == 401
        assert "wrong-key" not in caplog.text


# --- health ---------------------------------------------------------------------------------


async def test_healthz_and_readyz_on_memory_state() -> None:
    async with gateway() as env:
        assert await get_json(f"{env.url}/healthz") == (200, {"status": "ok"})
        status, body = await get_json(f"{env.url}/readyz")
        assert status == 200
        assert body["status"] == "ready"
        assert body["shared_state"] == "local"
        assert body["state_backend"] == "memory"


async def test_readyz_live_on_redis_state(redis_url: str) -> None:
    state = {
        "redis_url": redis_url,
        "key_prefix": f"gwproto-{uuid.uuid4().hex[:10]}",
        "timeout_ms": 2000,
    }
    async with gateway(state=state) as env:
        completion, _ = await sdk_chat(env, "async")  # decide + record through Redis
        assert completion.model == "a-chat"

        async def recorded() -> bool:
            return bool((await env.target("a:a-chat"))["window"]["successes"] == 1)

        await wait_until(recorded, timeout=5)
        status, body = await get_json(f"{env.url}/readyz")
        assert status == 200
        assert body["status"] == "ready"
        assert body["shared_state"] == "live"
        assert body["state_backend"] == "redis"


@pytest.mark.parametrize("header", ["x-api-key", "Authorization"])
async def test_an_empty_presented_key_never_authenticates(header: str) -> None:
    """`${X}` with X="" is refused at load; an empty header never matches anything."""
    with pytest.raises(ConfigError, match=r"\$\.server\.api_keys\[0\]"):
        parse_config({"server": {"api_keys": ["${EMPTY}"]}}, env={"EMPTY": ""})
    with pytest.raises(ConfigError, match=r"\$\.server\.admin_token"):
        parse_config({"server": {"admin_token": ""}}, env={})
    async with mock_upstreams(a=MockSettings()) as mocks:
        document = gateway_config(
            mocks,
            [{"model": "m", "targets": [{"provider": "a", "model": "x"}]}],
            server={"api_keys": ["k-123456"], "admin_token": "admin-123456"},
        )
        async with running_gateway(document) as (url, _app), aiohttp.ClientSession() as http:
            value = "" if header == "x-api-key" else "Bearer "
            for path in ("/v1/models", "/admin/state"):
                async with http.get(f"{url}{path}", headers={header: value}) as response:
                    assert response.status == 401
