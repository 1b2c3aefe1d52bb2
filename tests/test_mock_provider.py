"""The mock upstream, exercised through the official OpenAI SDK like a real provider would be."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from edgeroute.mock_provider import (
    FAULTS,
    MOCK_PROVIDER,
    MockSettings,
    build_arg_parser,
    create_mock_app,
    run_mock_provider,
)
from tests.support.gateway import running_gateway

REPO_ROOT = Path(__file__).resolve().parents[1]
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello to the routing gateway!"}]


class Mock:
    """A running mock: its base URL plus helpers for the control plane."""

    def __init__(self, url: str, app: web.Application) -> None:
        self.url = url
        self.app = app

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def client(self, **kwargs: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.v1, api_key="test", max_retries=0, **kwargs)

    async def request(
        self, method: str, path: str, *, data: bytes | None = None, json: Any = None
    ) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, f"{self.url}{path}", data=data, json=json) as resp,
        ):
            return resp.status, await resp.json()

    async def stats(self) -> dict[str, Any]:
        status, body = await self.request("GET", "/_mock/stats")
        assert status == 200
        return dict(body)

    async def configure(self, **changes: Any) -> dict[str, Any]:
        status, body = await self.request("POST", "/_mock/config", json=changes)
        assert status == 200, body
        return dict(body)


@asynccontextmanager
async def serve(
    settings: MockSettings | None = None,
    *,
    name: str = "mock",
    handler_cancellation: bool = True,
) -> AsyncIterator[Mock]:
    app = create_mock_app(settings or MockSettings(), name=name)
    runner = web.AppRunner(
        app, access_log=None, handler_cancellation=handler_cancellation, shutdown_timeout=0.2
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Mock(f"http://127.0.0.1:{port}", app)
    finally:
        await runner.cleanup()


@pytest.fixture
async def mock() -> AsyncIterator[Mock]:
    async with serve(name="mock-a") as running:
        yield running


@pytest.fixture
async def client(mock: Mock) -> AsyncIterator[openai.AsyncOpenAI]:
    async with mock.client() as c:
        yield c


async def wait_for(predicate: Callable[[], Awaitable[bool]]) -> None:
    """Poll `predicate` until it holds; the mock's state changes asynchronously to the client.

    Polling is the point: the state lives behind HTTP, there is no event to wait on.
    """
    async with asyncio.timeout(3):
        while not await predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


# --- happy paths ----------------------------------------------------------------------------


async def test_chat_completion(mock: Mock, client: openai.AsyncOpenAI) -> None:
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES
    )
    assert raw.headers["x-mock-name"] == "mock-a"
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o-mini"
    content = completion.choices[0].message.content
    assert content is not None
    assert "Hello from mock-a (gpt-4o-mini)" in content
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == len(MESSAGES[0]["content"]) // 4
    assert completion.usage.completion_tokens == len(content.split())
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    second = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert second.id != completion.id


async def test_chat_stream_with_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 5
    assert content[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text.startswith("Hello from mock-a (gpt-4o)")
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finish] == ["stop"]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == len(text.split())
    assert len({c.id for c in chunks}) == 1


async def test_stream_chunk_count_and_model_override() -> None:
    async with (
        serve(MockSettings(stream_chunks=20, model_name="fixed-model"), name="m") as mock,
        mock.client() as client,
    ):
        stream = await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True
        )
        chunks = [chunk async for chunk in stream]
        assert all(c.usage is None for c in chunks)  # no usage chunk unless asked for
        content = [c for c in chunks if c.choices[0].delta.content]
        assert len(content) == 20
        assert {c.model for c in chunks} == {"fixed-model"}
        models = await client.models.list()
        assert [m.id for m in models.data] == ["fixed-model"]


async def test_completions(client: openai.AsyncOpenAI) -> None:
    completion = await client.completions.create(model="gpt-3.5-turbo-instruct", prompt="abcd" * 10)
    assert completion.object == "text_completion"
    assert "Hello from mock-a (gpt-3.5-turbo-instruct)" in completion.choices[0].text
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 10

    stream = await client.completions.create(
        model="gpt-3.5-turbo-instruct",
        prompt=["one", "two"],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text.startswith("Hello from mock-a")
    assert chunks[-1].usage is not None


async def test_embeddings(mock: Mock, client: openai.AsyncOpenAI) -> None:
    # The SDK asks for base64 by default and decodes it; explicit "float" takes the JSON path.
    one = await client.embeddings.create(model="text-embedding-3-small", input="hello")
    again = await client.embeddings.create(
        model="text-embedding-3-small", input="hello", encoding_format="float"
    )
    assert len(one.data) == 1
    vector = one.data[0].embedding
    assert len(vector) == 8
    assert vector == again.data[0].embedding
    assert abs(sum(v * v for v in vector) - 1) < 1e-5

    many = await client.embeddings.create(model="text-embedding-3-small", input=["hello", "bye"])
    assert [d.index for d in many.data] == [0, 1]
    assert many.data[0].embedding == vector
    assert many.data[1].embedding != vector
    assert many.usage.prompt_tokens >= 2

    wide = await client.embeddings.create(model="e", input="hello", dimensions=40)
    assert len(wide.data[0].embedding) == 40


async def test_models_and_health(mock: Mock, client: openai.AsyncOpenAI) -> None:
    models = await client.models.list()
    assert "gpt-4o-mini" in [m.id for m in models.data]
    status, body = await mock.request("GET", "/healthz")
    assert (status, body) == (200, {"status": "ok", "name": "mock-a"})


# --- bad requests ---------------------------------------------------------------------------


async def test_bad_requests(mock: Mock, client: openai.AsyncOpenAI) -> None:
    status, body = await mock.request("POST", "/v1/chat/completions", data=b"{not json")
    assert status == 400
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"

    status, body = await mock.request("POST", "/v1/chat/completions", json={"messages": []})
    assert (status, body["error"]["param"]) == (400, "model")
    status, body = await mock.request("POST", "/v1/chat/completions", json={"model": "x"})
    assert (status, body["error"]["param"]) == (400, "messages")
    status, body = await mock.request(
        "POST", "/v1/chat/completions", json={"model": "x", "messages": "hi"}
    )
    assert (status, body["error"]["param"]) == (400, "messages")
    status, body = await mock.request("POST", "/v1/embeddings", json={"model": "x"})
    assert (status, body["error"]["param"]) == (400, "input")

    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="gpt-4o", messages=[])
    assert info.value.param == "messages"
    # Rejected requests are counted but never consume a fault.
    stats = await mock.stats()
    assert stats["by_path"]["/v1/chat/completions"] == 5
    assert stats["faults_served"] == 0


# --- faults ---------------------------------------------------------------------------------


async def test_error_rate_gives_500() -> None:
    async with serve(MockSettings(error_rate=1), name="m") as mock, mock.client() as client:
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert info.value.status_code == 500
        assert info.value.response.headers["x-mock-name"] == "m"
        assert (await mock.stats())["faults_served"] == 1


async def test_rate_limit_fault(mock: Mock, client: openai.AsyncOpenAI) -> None:
    await mock.configure(fault="rate_limit", retry_after_s=2)
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"] == "2"
    assert info.value.code == "rate_limit_exceeded"
    await mock.configure(retry_after_s=0.25)
    with pytest.raises(openai.RateLimitError) as info:
        await client.embeddings.create(model="e", input="x")
    assert info.value.response.headers["retry-after"] == "0.25"
    assert info.value.response.headers["retry-after-ms"] == "250"


async def test_azure_deployment_paths_answer_and_refuse_in_azures_shape(mock: Mock) -> None:
    async with openai.AsyncAzureOpenAI(
        azure_endpoint=mock.url, api_key="k", api_version="2024-10-21", max_retries=0
    ) as azure:
        reply = await azure.chat.completions.create(model="gpt-4o-dep", messages=MESSAGES)
        assert reply.model == "gpt-4o-dep"
        await mock.configure(fault="content_policy", fault_count=1)
        with pytest.raises(openai.BadRequestError) as info:
            await azure.chat.completions.create(model="gpt-4o-dep", messages=MESSAGES)
    assert info.value.code == "content_filter"
    body = info.value.body
    assert isinstance(body, dict)
    assert body["innererror"]["code"] == "ResponsibleAIPolicyViolation"
    assert (await mock.stats())["by_path"]["/openai/deployments/chat/completions"] == 2


@pytest.mark.parametrize(
    ("fault", "code", "words"),
    [
        ("context_window", "context_length_exceeded", "maximum context length is"),
        ("content_policy", "content_policy_violation", "safety system"),
    ],
)
async def test_refusal_faults_in_openais_shape(
    mock: Mock, client: openai.AsyncOpenAI, fault: str, code: str, words: str
) -> None:
    await mock.configure(fault=fault, fault_count=1)
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert info.value.code == code
    assert words in info.value.message


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("context_window", "prompt is too long: 210000 tokens > 200000 maximum"),
        ("content_policy", "Output blocked by content filtering policy"),
    ],
)
async def test_refusal_faults_in_anthropics_shape(mock: Mock, fault: str, message: str) -> None:
    await mock.configure(fault=fault, fault_count=1)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{mock.v1}/messages",
            json={
                "model": "claude",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "x"}],
            },
            headers={"anthropic-version": "2023-06-01"},
        ) as response,
    ):
        assert response.status == 400
        body = await response.json()
    assert body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": message},
    }


async def test_fault_count_counts_down(mock: Mock, client: openai.AsyncOpenAI) -> None:
    settings = await mock.configure(fault="status", status=503, fault_count=2)
    assert (settings["fault"], settings["fault_count"]) == ("status", 2)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert info.value.status_code == 503
        assert info.value.type == "server_error"
    await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    _, settings = await mock.request("GET", "/_mock/config")
    assert (settings["fault"], settings["fault_count"]) == ("none", 0)
    assert (await mock.stats())["faults_served"] == 2


async def test_status_fault_without_count_persists(mock: Mock, client: openai.AsyncOpenAI) -> None:
    await mock.configure(fault="status", status=401)
    for _ in range(3):
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    # Health checks and model listing stay truthful while inference is broken.
    assert len((await client.models.list()).data) > 0


async def test_reset_fault(mock: Mock, client: openai.AsyncOpenAI) -> None:
    await mock.configure(fault="reset")
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIConnectionError):
        _ = [chunk async for chunk in stream]
    await wait_for(lambda: _in_flight_is(mock, 0))


async def test_cut_stream_fault(mock: Mock, client: openai.AsyncOpenAI) -> None:
    await mock.configure(fault="cut_stream", cut_after_chunks=2, fault_count=1)
    # Non-streaming requests are not affected and do not consume the fault.
    await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    received: list[str] = []
    stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert len(received) == 2
    # The fault was used up: the next stream completes.
    stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    assert len([chunk async for chunk in stream]) == 6


async def test_slow_first_token(mock: Mock, client: openai.AsyncOpenAI) -> None:
    await mock.configure(fault="slow_first_token", first_token_delay_ms=300)
    started = time.monotonic()
    stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    headers_after = time.monotonic() - started
    async for _ in stream:
        first_token_after = time.monotonic() - started
        break
    await stream.close()
    assert headers_after < 0.2  # the stream opens at once...
    assert first_token_after >= 0.29  # ...the first token is what is slow


async def test_latency(mock: Mock, client: openai.AsyncOpenAI) -> None:
    await mock.configure(latency_ms=150, latency_jitter_ms=20, seed=1)
    started = time.monotonic()
    await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert time.monotonic() - started >= 0.125


async def _in_flight_is(mock: Mock, value: int) -> bool:
    return bool((await mock.stats())["in_flight"] == value)


@pytest.mark.parametrize("handler_cancellation", [True, False])
async def test_hang_times_out_and_does_not_leak(handler_cancellation: bool) -> None:
    settings = MockSettings(fault="hang")
    async with (
        serve(settings, handler_cancellation=handler_cancellation) as mock,
        mock.client(timeout=0.3) as client,
    ):
        tasks_before = len(asyncio.all_tasks())
        call = asyncio.create_task(
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        )
        await wait_for(lambda: _in_flight_is(mock, 1))  # the mock holds the request...
        with pytest.raises(openai.APITimeoutError):
            await call
        await wait_for(lambda: _in_flight_is(mock, 0))  # ...until the client's socket closes
        assert (await mock.stats())["faults_served"] == 1

        async def no_extra_tasks() -> bool:
            return len(asyncio.all_tasks()) <= tasks_before

        await wait_for(no_extra_tasks)


# --- control plane --------------------------------------------------------------------------


async def test_config_validation(mock: Mock) -> None:
    for body, param in [
        ({"no_such_field": 1}, "no_such_field"),
        ({"latency_ms": "slow"}, "latency_ms"),
        ({"error_rate": 1.5}, "error_rate"),
        ({"fault": "explode"}, "fault"),
        ({"status": 200}, "status"),
    ]:
        status, reply = await mock.request("POST", "/_mock/config", json=body)
        assert status == 400, body
        assert reply["error"]["type"] == "invalid_request_error"
        assert reply["error"]["param"] == param
    status, reply = await mock.request("POST", "/_mock/config", data=b"[1, 2]")
    assert status == 400
    status, reply = await mock.request("POST", "/_mock/config", data=b"{oops")
    assert status == 400
    # Nothing above changed anything; a valid update changes only the given fields.
    settings = await mock.configure(latency_ms=5, error_rate=0.5)
    assert settings["latency_ms"] == 5
    assert settings["error_rate"] == 0.5
    assert settings["stream_chunks"] == 5
    assert mock.app[MOCK_PROVIDER].settings.latency_ms == 5


async def test_settings_are_copied() -> None:
    settings = MockSettings(fault="status", fault_count=1)
    async with serve(settings) as mock, mock.client() as client:
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert (settings.fault, settings.fault_count) == ("status", 1)


async def test_stats_record_requests(mock: Mock) -> None:
    async with openai.AsyncOpenAI(
        base_url=mock.v1, api_key="sk-provider-key", max_retries=0
    ) as client:
        await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_headers={"X-Trace": "abc"}
        )
        headers = {k.lower(): v for k, v in (await mock.stats())["last_headers"].items()}
        assert headers["x-trace"] == "abc"
        await client.models.list()
    stats = await mock.stats()
    assert stats["requests"] == 2
    assert stats["by_path"] == {"/v1/chat/completions": 1, "/v1/models": 1}
    assert stats["in_flight"] == 0
    assert stats["last_authorization"] == "Bearer sk-provider-key"
    assert stats["last_body"]["model"] == "gpt-4o"
    assert stats["last_body"]["messages"] == MESSAGES  # a GET does not replace the last body

    status, _ = await mock.request("POST", "/_mock/reset_stats")
    assert status == 200
    stats = await mock.stats()
    assert stats["requests"] == 0
    assert stats["by_path"] == {}
    assert stats["last_authorization"] is None
    assert stats["last_body"] is None


def test_settings_validate_on_construction() -> None:
    with pytest.raises(ValueError, match="error_rate"):
        MockSettings(error_rate=2)
    with pytest.raises(ValueError, match="fault"):
        MockSettings(fault="nope")


# --- process entry points -------------------------------------------------------------------


async def test_run_mock_provider_reports_port_and_stops_on_cancel() -> None:
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run_mock_provider(
            "127.0.0.1",
            0,
            MockSettings(),
            name="r",
            on_ready=lambda host, port: ready.set_result(port),
        )
    )
    port = await asyncio.wait_for(ready, 5)
    async with openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0
    ) as client:
        models = await client.models.list()
        assert models.data
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_bad_flag_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_arg_parser()
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--port", "1", "--fault", "explode"])
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "--fault" in err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _run_module(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edgeroute.mock_provider",
        *args,
        cwd=REPO_ROOT,  # `-m` puts the working directory on sys.path
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_module_entry_point_serves_and_exits_cleanly() -> None:
    port = _free_port()
    proc = await _run_module("--port", str(port), "--name", "cli")
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        assert line.strip() == f"mock-provider cli listening on http://127.0.0.1:{port}/v1"
        async with openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0
        ) as client:
            completion = await client.chat.completions.create(model="m", messages=MESSAGES)
        assert "Hello from cli (m)" in (completion.choices[0].message.content or "")
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0, stderr.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_module_entry_point_rejects_bad_values() -> None:
    proc = await _run_module("--port", "1", "--error-rate", "3")
    _, stderr = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode != 0
    message = stderr.decode().strip()
    assert "\n" not in message
    assert "error_rate" in message


# --- Anthropic Messages mode ----------------------------------------------------------------

ANTHROPIC_HEADERS = {"x-api-key": "any", "anthropic-version": "2023-06-01"}
ANTHROPIC_BODY: dict[str, Any] = {
    "model": "claude-3-5-haiku-latest",
    "max_tokens": 64,
    "system": "Be brief.",
    "messages": MESSAGES,
}


async def anthropic_post(
    mock: Mock, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{mock.v1}/messages",
            json=body,
            headers=ANTHROPIC_HEADERS if headers is None else headers,
        ) as resp,
    ):
        data = b""
        # A cut stream ends without its final chunk: keep what arrived.
        with contextlib.suppress(aiohttp.ClientPayloadError):
            async for piece in resp.content.iter_any():
                data += piece
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, data


def sse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) pairs of an Anthropic event stream."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


async def test_anthropic_message(mock: Mock) -> None:
    status, headers, raw = await anthropic_post(mock, ANTHROPIC_BODY)
    assert status == 200 and headers["content-type"] == "application/json"
    message = json.loads(raw)
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["id"].startswith("msg_")
    assert message["model"] == "claude-3-5-haiku-latest"
    (block,) = message["content"]
    assert block["type"] == "text"
    assert block["text"].startswith("Hello from mock-a (claude-3-5-haiku-latest)")
    assert message["stop_reason"] == "end_turn"
    chars = len("Be brief.") + len(MESSAGES[0]["content"])
    assert message["usage"] == {
        "input_tokens": chars // 4,
        "output_tokens": len(block["text"].split()),
    }
    assert (await mock.stats())["by_path"] == {"/v1/messages": 1}


async def test_anthropic_stream(mock: Mock) -> None:
    await mock.configure(stream_chunks=3)
    status, headers, raw = await anthropic_post(mock, {**ANTHROPIC_BODY, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_events(raw)
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in events)
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text.startswith("Hello from mock-a (claude-3-5-haiku-latest)")
    assert events[-2][1]["usage"]["output_tokens"] == len(text.split())


async def test_anthropic_bad_requests_use_anthropic_error_shape(mock: Mock) -> None:
    status, _, raw = await anthropic_post(mock, ANTHROPIC_BODY, headers={"x-api-key": "k"})
    assert status == 400
    assert json.loads(raw) == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "anthropic-version: header is required",
        },
    }
    body = {k: v for k, v in ANTHROPIC_BODY.items() if k != "max_tokens"}
    status, _, raw = await anthropic_post(mock, body)
    assert status == 400
    assert json.loads(raw)["error"]["message"] == "max_tokens: Field required"
    assert (await mock.stats())["faults_served"] == 0


@pytest.mark.parametrize(
    ("changes", "status", "error_type"),
    [
        ({"fault": "status", "status": 529}, 529, "overloaded_error"),
        ({"fault": "status", "status": 401}, 401, "authentication_error"),
        ({"error_rate": 1.0}, 500, "api_error"),
        ({"fault": "rate_limit", "retry_after_s": 7}, 429, "rate_limit_error"),
    ],
)
async def test_anthropic_faults(
    mock: Mock, changes: dict[str, Any], status: int, error_type: str
) -> None:
    await mock.configure(**changes)
    got, headers, raw = await anthropic_post(mock, ANTHROPIC_BODY)
    assert got == status
    body = json.loads(raw)
    assert body["type"] == "error" and body["error"]["type"] == error_type
    if status == 429:
        assert headers["retry-after"] == "7"


async def test_anthropic_cut_stream(mock: Mock) -> None:
    await mock.configure(fault="cut_stream", cut_after_chunks=2, fault_count=1)
    _, _, raw = await anthropic_post(mock, {**ANTHROPIC_BODY, "stream": True})
    names = [name for name, _ in sse_events(raw)]
    assert names.count("content_block_delta") == 2
    assert "message_stop" not in names


async def test_gateway_kind_anthropic_against_the_mock(mock: Mock) -> None:
    # What a user does to try `kind: anthropic` without a key: the mock is the upstream.
    document = {
        "providers": [{"name": "claude", "kind": "anthropic", "base_url": mock.v1}],
        "routes": [{"model": "chat", "targets": [{"provider": "claude", "model": "claude-x"}]}],
    }
    async with (
        running_gateway(document) as (url, _),
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as sdk,
    ):
        reply = await sdk.chat.completions.create(model="chat", messages=MESSAGES)
        assert reply.choices[0].message.content is not None
        assert reply.choices[0].message.content.startswith("Hello from mock-a (claude-x)")
        assert reply.usage is not None and reply.usage.completion_tokens > 0
        stream = await sdk.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text.startswith("Hello from mock-a (claude-x)")
    assert (await mock.stats())["by_path"] == {"/v1/messages": 2}


def test_help_documents_every_runtime_setting() -> None:
    help_text = build_arg_parser().format_help()
    for field in MockSettings.__struct_fields__:
        assert re.search(rf"^  (\w+, )?{field}[ ,]", help_text, re.M), field
    for fault in FAULTS:
        assert fault in help_text
    assert "/_mock/config" in help_text and "/v1/messages" in help_text
