"""Provider adapters end to end: Azure OpenAI and Anthropic behind the OpenAI interface.

Each upstream is a tiny fake written here that checks what the real API would check (URL,
query, auth header, version header, body shape) and answers like the real one; the client
is the official `openai` SDK talking to an in-process gateway over loopback.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest
from aiohttp import web

from edgeroute.mock_provider import MockSettings
from tests.support import sdk
from tests.support.gateway import Mock, mock_upstreams, running_app, running_gateway

Mode = sdk.Mode
MODES: list[Mode] = ["sync", "async"]

CLIENT_KEY = "client-key-providers-42"
AZURE_KEY = "azure-secret-key-123"
AZURE_API_VERSION = "2024-10-21"
ANTHROPIC_KEY = "sk-ant-secret-456"
ANTHROPIC_VERSION = "2023-06-01"
BACKUP_KEY = "sk-backup-secret"

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
MESSAGES: list[Any] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris?"},
]


def sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return (head + f"data: {json.dumps(data)}\n\n").encode()


# --- a fake Azure OpenAI resource -----------------------------------------------------------


@dataclass
class FakeAzure:
    deployments: tuple[str, ...] = ("gpt4o-deploy", "embed-deploy")
    seen: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/openai/deployments/{deployment}/{operation:.+}", self.handle)
        return app

    @staticmethod
    def _error(status: int, message: str) -> web.Response:
        body = {"error": {"code": str(status), "message": message}}
        return web.json_response(body, status=status)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append(
            {
                "path": request.path,
                "query": dict(request.query),
                "headers": dict(request.headers),
                "body": body,
            }
        )
        if request.query.get("api-version") != AZURE_API_VERSION:
            return self._error(404, "Resource not found (api-version)")
        if request.headers.get("api-key") != AZURE_KEY:
            return self._error(401, "Access denied due to invalid subscription key")
        deployment = request.match_info["deployment"]
        if deployment not in self.deployments:
            return self._error(404, "The API deployment for this resource does not exist.")
        operation = request.match_info["operation"]
        if operation == "embeddings":
            return web.json_response(
                {
                    "object": "list",
                    "data": [
                        {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
                        for i, _ in enumerate(body["input"])
                    ],
                    "model": "text-embedding-3-small",
                    "usage": {"prompt_tokens": 4, "total_tokens": 4},
                }
            )
        if operation != "chat/completions":
            return self._error(404, f"unknown operation {operation}")
        if body.get("stream"):
            return await self._stream(request, body)
        return web.json_response(
            {
                "id": "chatcmpl-az1",
                "object": "chat.completion",
                "created": 1700000000,
                "model": "gpt-4o-2024-08-06",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "Bonjour from Azure."},
                        "finish_reason": "stop",
                        "content_filter_results": {},
                    }
                ],
                "prompt_filter_results": [],
                "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15},
            }
        )

    async def _stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        # Azure sends a prompt-filter chunk with no choices before the content.
        await response.write(
            sse(
                {
                    "id": "",
                    "object": "",
                    "created": 0,
                    "model": "",
                    "choices": [],
                    "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}],
                }
            )
        )
        base = {
            "id": "chatcmpl-az2",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "gpt-4o-2024-08-06",
        }
        for i, piece in enumerate(["Bonjour", " from", " Azure."]):
            delta: dict[str, Any] = {"content": piece}
            if i == 0:
                delta["role"] = "assistant"
            await response.write(
                sse({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
            )
            await asyncio.sleep(0.005)
        await response.write(
            sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        )
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
            await response.write(sse({**base, "choices": [], "usage": usage}))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


# --- a fake Anthropic Messages API ----------------------------------------------------------

MESSAGE_RESPONSE: dict[str, Any] = {
    "id": "msg_01XYZ",
    "type": "message",
    "role": "assistant",
    "model": "claude-test",
    "content": [
        {"type": "text", "text": "Let me check the weather."},
        {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris"}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 25, "output_tokens": 42},
}


def anthropic_events(*, fail_after_text: bool = False) -> list[bytes]:
    """A realistic Messages stream: text block, tool_use block, usage, stop (with pings)."""
    events = [
        sse(
            {
                "type": "message_start",
                "message": {
                    "id": "msg_01XYZ",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-test",
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": 25, "output_tokens": 1},
                },
            },
            "message_start",
        ),
        sse(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
            "content_block_start",
        ),
        sse({"type": "ping"}, "ping"),
        sse(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "Let me check"},
            },
            "content_block_delta",
        ),
        sse(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": " the weather."},
            },
            "content_block_delta",
        ),
        sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
    ]
    if fail_after_text:
        error = {"type": "overloaded_error", "message": "Overloaded"}
        return [*events, sse({"type": "error", "error": error}, "error")]
    events += [
        sse(
            {
                "type": "content_block_start",
                "index": 1,
                "content_block": {
                    "type": "tool_use",
                    "id": "toolu_01A",
                    "name": "get_weather",
                    "input": {},
                },
            },
            "content_block_start",
        ),
        sse(
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": ""},
            },
            "content_block_delta",
        ),
        sse(
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": '{"city": "Par'},
            },
            "content_block_delta",
        ),
        sse(
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": 'is"}'},
            },
            "content_block_delta",
        ),
        sse({"type": "content_block_stop", "index": 1}, "content_block_stop"),
        sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": {"output_tokens": 42},
            },
            "message_delta",
        ),
        sse({"type": "message_stop"}, "message_stop"),
    ]
    return events


@dataclass
class FakeAnthropic:
    """Answers /v1/messages; `fail_with` scripts error statuses for the next requests."""

    fail_with: list[int] = field(default_factory=list)
    stream_error: bool = False
    seen: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/messages", self.handle)
        return app

    @staticmethod
    def _error(status: int, type_: str, message: str) -> web.Response:
        body = {"type": "error", "error": {"type": type_, "message": message}}
        return web.json_response(body, status=status)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append({"headers": dict(request.headers), "body": body})
        if request.headers.get("x-api-key") != ANTHROPIC_KEY:
            return self._error(401, "authentication_error", "invalid x-api-key")
        if request.headers.get("anthropic-version") != ANTHROPIC_VERSION:
            return self._error(400, "invalid_request_error", "anthropic-version missing")
        if "authorization" in {k.lower() for k in request.headers}:
            return self._error(400, "invalid_request_error", "unexpected Authorization header")
        if not isinstance(body.get("max_tokens"), int) or body.get("messages") is None:
            return self._error(400, "invalid_request_error", "max_tokens: Field required")
        if self.fail_with:
            status = self.fail_with.pop(0)
            if status == 400:
                return self._error(400, "invalid_request_error", "messages: roles must alternate")
            if status == 529:
                return self._error(529, "overloaded_error", "Overloaded")
            return self._error(status, "api_error", "Internal server error")
        if not body.get("stream"):
            return web.json_response({**MESSAGE_RESPONSE, "model": body["model"]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in anthropic_events(fail_after_text=self.stream_error):
            await response.write(event)
            await asyncio.sleep(0.002)
        await response.write_eof()
        return response


# --- the gateway in front of them -----------------------------------------------------------


@dataclass
class Env:
    url: str
    azure: FakeAzure
    anthropic: FakeAnthropic
    backup: Mock

    def sync_client(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=15
        )

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=15
        )


@asynccontextmanager
async def gateway() -> AsyncIterator[Env]:
    azure, anthropic = FakeAzure(), FakeAnthropic()
    async with (
        running_app(azure.app()) as azure_url,
        running_app(anthropic.app()) as anthropic_url,
        mock_upstreams(backup=MockSettings()) as mocks,
    ):
        document = {
            "server": {"api_keys": [CLIENT_KEY]},
            "breaker": {"failure_threshold": 100},
            "providers": [
                {
                    "name": "az",
                    "kind": "azure",
                    "base_url": azure_url,
                    "api_key": AZURE_KEY,
                    "api_version": AZURE_API_VERSION,
                },
                {
                    "name": "claude",
                    "kind": "anthropic",
                    "base_url": f"{anthropic_url}/v1",
                    "api_key": ANTHROPIC_KEY,
                },
                {"name": "backup", "base_url": mocks["backup"].base_url, "api_key": BACKUP_KEY},
            ],
            "routes": [
                {"model": "azure-chat", "targets": [{"provider": "az", "model": "gpt4o-deploy"}]},
                {"model": "azure-embed", "targets": [{"provider": "az", "model": "embed-deploy"}]},
                {
                    "model": "claude",
                    "strategy": "cost",
                    "targets": [
                        {"provider": "claude", "model": "claude-test", "input_cost_per_mtok": 1},
                        {"provider": "backup", "model": "backup-model", "input_cost_per_mtok": 5},
                    ],
                },
            ],
        }
        async with running_gateway(document) as (url, _app):
            yield Env(url, azure, anthropic, mocks["backup"])


async def chat(env: Env, mode: Mode, **kwargs: Any) -> tuple[Any, dict[str, str]]:
    kwargs.setdefault("messages", MESSAGES)
    return await sdk.chat(env, mode, **kwargs)


async def stream(env: Env, mode: Mode, **kwargs: Any) -> tuple[list[Any], dict[str, str]]:
    kwargs.setdefault("messages", MESSAGES)
    return await sdk.stream(env, mode, **kwargs)


@dataclass
class Assembled:
    content: str
    tool_calls: dict[int, dict[str, str]]
    finish_reason: str | None
    usage_chunks: list[Any]


def assemble(chunks: list[Any]) -> Assembled:
    """Fold stream chunks the way OpenAI clients do."""
    content = ""
    calls: dict[int, dict[str, str]] = {}
    finish: str | None = None
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for call in delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += call.id or ""
                if call.function is not None:
                    entry["name"] += call.function.name or ""
                    entry["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    usage = [c for c in chunks if c.usage is not None]
    return Assembled(content, calls, finish, usage)


# --- Azure ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_azure_chat_uses_deployment_url_version_and_api_key(mode: Mode) -> None:
    async with gateway() as env:
        completion, headers = await chat(env, mode, model="azure-chat", temperature=0.1)
        assert completion.choices[0].message.content == "Bonjour from Azure."
        assert completion.usage.total_tokens == 15
        assert headers["x-edgeroute-provider"] == "az"
        assert headers["x-edgeroute-model"] == "gpt4o-deploy"

        (seen,) = env.azure.seen
        assert seen["path"] == "/openai/deployments/gpt4o-deploy/chat/completions"
        assert seen["query"] == {"api-version": AZURE_API_VERSION}
        sent = {k.lower(): v for k, v in seen["headers"].items()}
        assert sent["api-key"] == AZURE_KEY
        assert "authorization" not in sent
        assert CLIENT_KEY not in json.dumps(seen["headers"])
        assert seen["body"]["messages"] == MESSAGES
        assert seen["body"]["temperature"] == 0.1


@pytest.mark.parametrize("include_usage", [False, True], ids=["no-usage", "usage"])
@pytest.mark.parametrize("mode", MODES)
async def test_azure_stream(mode: Mode, include_usage: bool) -> None:
    async with gateway() as env:
        extra = {"stream_options": {"include_usage": True}} if include_usage else {}
        chunks, headers = await stream(env, mode, model="azure-chat", **extra)
        result = assemble(chunks)
        assert result.content == "Bonjour from Azure."
        assert result.finish_reason == "stop"
        assert headers["x-edgeroute-provider"] == "az"
        if include_usage:
            assert len(result.usage_chunks) == 1
            assert result.usage_chunks[0].usage.completion_tokens == 3
        else:
            assert result.usage_chunks == []
        (seen,) = env.azure.seen
        assert seen["path"] == "/openai/deployments/gpt4o-deploy/chat/completions"
        assert seen["body"]["stream_options"] == {"include_usage": True}


async def test_azure_embeddings() -> None:
    async with gateway() as env, env.async_client() as client:
        result = await client.embeddings.create(model="azure-embed", input=["a", "b"])
        assert [d.embedding for d in result.data] == [[0.1, 0.2, 0.3]] * 2
        (seen,) = env.azure.seen
        assert seen["path"] == "/openai/deployments/embed-deploy/embeddings"
        assert seen["query"] == {"api-version": AZURE_API_VERSION}


# --- Anthropic ------------------------------------------------------------------------------


def assert_translated_request(seen: dict[str, Any], *, stream: bool) -> None:
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers["x-api-key"] == ANTHROPIC_KEY
    assert headers["anthropic-version"] == ANTHROPIC_VERSION
    assert "authorization" not in headers
    assert CLIENT_KEY not in json.dumps(seen["headers"])
    body = seen["body"]
    assert body["model"] == "claude-test"
    assert body["system"] == "You are terse."
    assert body["messages"] == [{"role": "user", "content": "Weather in Paris?"}]
    assert body["max_tokens"] == 300
    assert body["temperature"] == 0.5
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "Current weather for a city",
            "input_schema": WEATHER_TOOL["function"]["parameters"],
        }
    ]
    assert body["tool_choice"] == {"type": "auto"}
    assert body.get("stream", False) is stream
    assert "stream_options" not in body


REQUEST: dict[str, Any] = {
    "model": "claude",
    "max_tokens": 300,
    "temperature": 0.5,
    "tools": [WEATHER_TOOL],
    "tool_choice": "auto",
}


@pytest.mark.parametrize("mode", MODES)
async def test_anthropic_non_streaming_with_tool_use(mode: Mode) -> None:
    async with gateway() as env:
        completion, headers = await chat(env, mode, **REQUEST)
        assert headers["x-edgeroute-provider"] == "claude"
        assert completion.object == "chat.completion"
        assert completion.model == "claude-test"
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.role == "assistant"
        assert choice.message.content == "Let me check the weather."
        (call,) = choice.message.tool_calls
        assert call.id == "toolu_01A" and call.type == "function"
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        assert completion.usage.prompt_tokens == 25
        assert completion.usage.completion_tokens == 42
        assert completion.usage.total_tokens == 67
        (seen,) = env.anthropic.seen
        assert_translated_request(seen, stream=False)


@pytest.mark.parametrize("include_usage", [False, True], ids=["no-usage", "usage"])
@pytest.mark.parametrize("mode", MODES)
async def test_anthropic_stream_with_tool_use(mode: Mode, include_usage: bool) -> None:
    async with gateway() as env:
        extra = {"stream_options": {"include_usage": True}} if include_usage else {}
        chunks, headers = await stream(env, mode, **REQUEST, **extra)
        assert headers["content-type"].startswith("text/event-stream")
        assert headers["x-edgeroute-provider"] == "claude"
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        result = assemble(chunks)
        assert result.content == "Let me check the weather."
        assert result.finish_reason == "tool_calls"
        assert list(result.tool_calls) == [0]
        call = result.tool_calls[0]
        assert (call["id"], call["name"]) == ("toolu_01A", "get_weather")
        assert json.loads(call["arguments"]) == {"city": "Paris"}
        if include_usage:
            (last,) = result.usage_chunks
            assert last is chunks[-1] and last.choices == []
            assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (25, 42)
            assert last.usage.total_tokens == 67
        else:
            assert result.usage_chunks == []
        (seen,) = env.anthropic.seen
        assert_translated_request(seen, stream=True)


async def test_anthropic_tool_result_round_trip() -> None:
    async with gateway() as env:
        messages = [
            *MESSAGES,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "toolu_01A",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_01A", "content": "18C and sunny"},
        ]
        await chat(env, "async", model="claude", messages=messages, tools=[WEATHER_TOOL])
        body = env.anthropic.seen[0]["body"]
        assert body["messages"][1:] == [
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "tool_use",
                        "id": "toolu_01A",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    }
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "18C and sunny"}
                ],
            },
        ]


@pytest.mark.parametrize("mode", MODES)
async def test_anthropic_400_passes_through_as_openai_error(mode: Mode) -> None:
    async with gateway() as env:
        env.anthropic.fail_with = [400]
        with pytest.raises(openai.BadRequestError) as caught:
            await chat(env, mode, model="claude")
        error = caught.value
        assert error.status_code == 400
        assert "roles must alternate" in error.message
        document = error.response.json()
        assert set(document) == {"error"}
        assert document["error"]["type"] == "invalid_request_error"
        assert {"message", "type", "param", "code"} <= set(document["error"])
        assert error.response.headers["x-edgeroute-provider"] == "claude"
        assert await env.backup.requests() == 0  # the client's mistake: no failover


async def test_request_anthropic_cannot_express_is_a_400_naming_the_param() -> None:
    async with gateway() as env:
        with pytest.raises(openai.BadRequestError) as caught:
            await chat(env, "async", model="claude", n=3)
        assert caught.value.param == "n"
        assert env.anthropic.seen == []
        assert await env.backup.requests() == 0


@pytest.mark.parametrize("status", [529, 500])
@pytest.mark.parametrize("streaming", [False, True], ids=["plain", "stream"])
async def test_anthropic_overload_and_server_errors_fail_over(status: int, streaming: bool) -> None:
    async with gateway() as env:
        env.anthropic.fail_with = [status]
        if streaming:
            chunks, headers = await stream(env, "async", model="claude")
            content = assemble(chunks).content
        else:
            completion, headers = await chat(env, "async", model="claude")
            content = completion.choices[0].message.content
        assert content == "Hello from backup (backup-model). This is a mock reply."
        assert headers["x-edgeroute-provider"] == "backup"
        assert headers["x-edgeroute-attempts"] == "2"
        assert len(env.anthropic.seen) == 1
        backup = await env.backup.stats()
        assert backup["last_authorization"] == f"Bearer {BACKUP_KEY}"
        assert backup["last_body"]["model"] == "backup-model"
        assert backup["last_body"]["messages"] == MESSAGES  # the original OpenAI body


async def test_anthropic_error_event_mid_stream_reaches_the_sdk() -> None:
    async with gateway() as env, env.async_client() as client:
        env.anthropic.stream_error = True
        received: list[Any] = []
        response = await client.chat.completions.create(
            model="claude", messages=MESSAGES, stream=True
        )
        with pytest.raises(openai.APIError, match="Overloaded"):
            async for chunk in response:
                received.append(chunk)
        assert assemble(received).content == "Let me check the weather."
        assert await env.backup.requests() == 0


async def test_anthropic_target_refuses_embeddings() -> None:
    anthropic = FakeAnthropic()
    async with running_app(anthropic.app()) as anthropic_url:
        document = {
            "providers": [
                {"name": "claude", "kind": "anthropic", "base_url": f"{anthropic_url}/v1"}
            ],
            "routes": [{"model": "emb", "targets": [{"provider": "claude", "model": "c"}]}],
        }
        async with (
            running_gateway(document) as (url, _app),
            openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client,
        ):
            with pytest.raises(openai.BadRequestError, match="chat/completions"):
                await client.embeddings.create(model="emb", input="hi")
    assert anthropic.seen == []


# --- an OpenAI-compatible upstream that compresses, as real HTTP servers do -----------------


async def test_compressing_openai_upstream_is_understood() -> None:
    """An upstream (or a CDN in front of it) may compress even when nobody asked for it."""
    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        seen.append(request.headers.get("Accept-Encoding"))
        response = web.json_response(
            {
                "id": "chatcmpl-gz",
                "object": "chat.completion",
                "created": 1,
                "model": "gz-model",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "squeezed " * 50},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 2, "completion_tokens": 50, "total_tokens": 52},
            }
        )
        # Compress whatever was asked for, like a misbehaving CDN would.
        response.enable_compression(force=web.ContentCoding.gzip)
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    async with running_app(app) as upstream:
        document = {
            "providers": [{"name": "gz", "base_url": f"{upstream}/v1", "api_key": "k-gz"}],
            "routes": [{"model": "gz", "targets": [{"provider": "gz", "model": "gz-model"}]}],
        }
        async with (
            running_gateway(document) as (url, _app),
            openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client,
        ):
            completion = await client.chat.completions.create(
                model="gz", messages=[{"role": "user", "content": "hi"}]
            )
            # The gateway asks for plain bodies (they pass through byte for byte) ...
            assert seen == [None]
            # ... and still understands an upstream that compresses anyway.
            assert completion.choices[0].message.content == "squeezed " * 50


# --- what goes upstream: the provider's headers, complete, built once ------------------------


async def test_upstream_request_headers_are_exactly_the_providers() -> None:
    """Headers are built per provider at startup (no per-attempt merging by aiohttp): the
    upstream sees content type, auth, Accept and the configured extras, and nothing aiohttp
    would add by itself (User-Agent, Accept-Encoding)."""
    seen: list[dict[str, str]] = []
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}],
    }

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append({k.lower(): v for k, v in request.headers.items()})
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "c",
                    "object": "chat.completion",
                    "created": 1,
                    "model": "m",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "hi"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    async with running_app(app) as upstream:
        document = {
            "providers": [
                {
                    "name": "up",
                    "base_url": f"{upstream}/v1",
                    "api_key": "k-up",
                    "headers": {"OpenAI-Organization": "org-1"},
                    "stream_usage": False,
                }
            ],
            "routes": [{"model": "m", "targets": [{"provider": "up", "model": "m"}]}],
        }
        async with (
            running_gateway(document) as (url, _app),
            openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client,
        ):
            messages: Any = [{"role": "user", "content": "hi"}]
            await client.chat.completions.create(model="m", messages=messages)
            created = await client.chat.completions.create(
                model="m", messages=messages, stream=True
            )
            async for _ in created:
                pass
    plain, streamed = seen
    common = {
        "content-type": "application/json",
        "authorization": "Bearer k-up",
        "openai-organization": "org-1",
    }
    for headers, accept in ((plain, "*/*"), (streamed, "text/event-stream")):
        assert set(headers) == {*common, "accept", "host", "content-length"}
        assert {k: headers[k] for k in common} == common
        assert headers["accept"] == accept
