"""Hostile and broken upstreams (issue 9, items 1-4): every bad answer is a classified attempt
failure, fails over while nothing was sent, and counts against that target's breaker.

A scripted upstream answers by scenario (the provider's base_url names it); each scenario runs
through a real gateway on loopback twice:

- route `alone` has only the scripted target: the client gets the gateway's 502 whose
  `attempts[0].error` is the class the adapter gave the failure;
- route `failover` has the scripted target first (cheapest) and a healthy mock second: the
  client gets the healthy answer on attempt 2.

Afterwards the scripted target has one breaker failure per route and no lease left behind.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import resource
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from edgeroute.mock_provider import MockSettings
from tests.support.gateway import (
    gateway_config,
    get_json,
    mock_upstreams,
    running_app,
    running_gateway,
    wait_until,
)

Script = Callable[[web.Request], Awaitable[web.StreamResponse]]
Tail = Callable[[web.StreamResponse], Awaitable[None]]
MESSAGES = [{"role": "user", "content": "hello"}]
SSE = "text/event-stream"


def json_reply(body: Any, content_type: str = "application/json") -> Script:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()

    async def script(request: web.Request) -> web.StreamResponse:
        return web.Response(body=raw, content_type=content_type)

    return script


def sse_reply(*events: bytes, then: Tail | None = None, gap_s: float = 0.0) -> Script:
    """Send `events` (raw bytes each), then hand the open response to `then`, then end."""

    async def script(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": SSE})
        await response.prepare(request)
        for event in events:
            await response.write(event)
            if gap_s:
                await asyncio.sleep(gap_s)
        if then is not None:
            await then(response)
        await response.write_eof()
        return response

    return script


def trickle(data: bytes, every_s: float) -> Tail:
    """Write `data` one byte at a time: never silent for long, rarely a whole event."""

    async def tail(response: web.StreamResponse) -> None:
        for byte in data:
            await response.write(bytes([byte]))
            await asyncio.sleep(every_s)

    return tail


def deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


ANTHROPIC_OK = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "content": [{"type": "text", "text": "hi"}],
    "stop_reason": "end_turn",
    "usage": {"input_tokens": 3, "output_tokens": 1},
}
OPENAI_CHUNK = (
    b'data: {"id":"c","object":"chat.completion.chunk","created":0,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}\n\n'
)
OPENAI_OK = {
    "id": "c",
    "object": "chat.completion",
    "created": 0,
    "model": "m",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


def anthropic_event(name: str, data: Any) -> bytes:
    payload = data if isinstance(data, bytes) else json.dumps(data).encode()
    return b"event: " + name.encode() + b"\ndata: " + payload + b"\n\n"


MESSAGE_START = anthropic_event(
    "message_start",
    {"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 2}}},
)


class Upstream:
    """One aiohttp server; `/{scenario}/v1/...` runs that scenario's script."""

    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {}
        self.url = ""

    def base_url(self, scenario: str, script: Script) -> str:
        self.scripts[scenario] = script
        return f"{self.url}/{scenario}/v1"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        return await self.scripts[request.match_info["scenario"]](request)


@asynccontextmanager
async def scripted_upstream() -> AsyncIterator[Upstream]:
    upstream = Upstream()
    app = web.Application()
    app.router.add_post("/{scenario}/v1/{tail:.*}", upstream.handle)
    async with running_app(app, handler_cancellation=True) as url:
        upstream.url = url
        yield upstream


@dataclass
class Case:
    kind: str  # the scripted provider's kind
    script: Script
    error: str  # the class the adapter must give the failure
    stream: bool = False
    provider: dict[str, Any] = field(default_factory=dict)


CASES: dict[str, Case] = {
    # -- anthropic, non-streamed --------------------------------------------------------
    "anthropic-array": Case("anthropic", json_reply([1, 2]), "bad_response"),
    "anthropic-string-blocks": Case(
        "anthropic", json_reply({**ANTHROPIC_OK, "content": ["hi", "there"]}), "bad_response"
    ),
    "anthropic-usage-not-a-number": Case(
        "anthropic",
        json_reply({**ANTHROPIC_OK, "usage": {"input_tokens": 1, "output_tokens": "many"}}),
        "bad_response",
    ),
    "anthropic-usage-negative": Case(
        "anthropic",
        json_reply({**ANTHROPIC_OK, "usage": {"input_tokens": -5, "output_tokens": 1}}),
        "bad_response",
    ),
    "anthropic-text-not-a-string": Case(
        "anthropic",
        json_reply({**ANTHROPIC_OK, "content": [{"type": "text", "text": {"a": 1}}]}),
        "bad_response",
    ),
    "anthropic-nested-deep": Case("anthropic", json_reply(deep(5000)), "bad_response"),
    "anthropic-error-object-with-200": Case(
        "anthropic",
        json_reply({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}),
        "bad_response",
    ),
    "anthropic-empty-object": Case("anthropic", json_reply({}), "bad_response"),
    "anthropic-body-too-large": Case(
        "anthropic",
        json_reply({**ANTHROPIC_OK, "pad": "x" * 300_000}),
        "response_too_large",
        provider={"max_response_bytes": 100_000},
    ),
    # -- anthropic, streamed ------------------------------------------------------------
    "anthropic-sse-array": Case(
        "anthropic", sse_reply(anthropic_event("message_start", [1, 2])), "bad_response", True
    ),
    "anthropic-sse-usage-not-a-number": Case(
        "anthropic",
        sse_reply(
            anthropic_event(
                "message_start",
                {"type": "message_start", "message": {"usage": {"input_tokens": "x"}}},
            )
        ),
        "bad_response",
        True,
    ),
    "anthropic-sse-bad-index": Case(
        "anthropic",
        sse_reply(
            MESSAGE_START,
            anthropic_event(
                "content_block_start",
                {"index": [0], "content_block": {"type": "tool_use", "id": "t", "name": "f"}},
            ),
        ),
        "bad_response",
        True,
    ),
    "anthropic-stream-answered-json": Case(
        "anthropic", json_reply(ANTHROPIC_OK), "bad_response", True
    ),
    # -- openai, non-streamed -----------------------------------------------------------
    "openai-array": Case("openai", json_reply([1, 2]), "bad_response"),
    "openai-string": Case("openai", json_reply(b'"hello"'), "bad_response"),
    "openai-html": Case("openai", json_reply(b"<html>oops</html>", "text/html"), "bad_response"),
    "openai-usage-not-a-number": Case(
        "openai",
        json_reply({**OPENAI_OK, "usage": {"prompt_tokens": "5", "completion_tokens": 1}}),
        "bad_response",
    ),
    "openai-usage-negative": Case(
        "openai",
        json_reply({**OPENAI_OK, "usage": {"prompt_tokens": 1, "completion_tokens": -7}}),
        "bad_response",
    ),
    "openai-nested-deep": Case("openai", json_reply(deep(5000)), "bad_response"),
    "openai-body-too-large": Case(
        "openai",
        json_reply({**OPENAI_OK, "pad": "x" * 300_000}),
        "response_too_large",
        provider={"max_response_bytes": 100_000},
    ),
    "openai-gzip-too-large": Case(
        "openai",
        # 4 MB of JSON compressed to a few KB: the bound is on what it inflates to.
        lambda request: _gzipped({**OPENAI_OK, "pad": "x" * 4_000_000}),
        "response_too_large",
        provider={"max_response_bytes": 100_000},
    ),
    # -- openai, streamed ---------------------------------------------------------------
    "openai-stream-answered-json": Case("openai", json_reply(OPENAI_OK), "bad_response", True),
    "openai-stream-answered-html": Case(
        "openai", json_reply(b"<html><body>hi</body></html>", "text/html"), "bad_response", True
    ),
    "openai-stream-html-labelled-sse": Case(
        "openai",
        json_reply(b"<html><body>maintenance</body></html>\n", SSE),
        "bad_response",
        True,
    ),
    "openai-sse-array": Case("openai", sse_reply(b"data: [1,2]\n\n"), "bad_response", True),
    "openai-sse-usage-not-a-number": Case(
        "openai",
        sse_reply(
            OPENAI_CHUNK.replace(b'"choices"', b'"usage":{"prompt_tokens":"x"},"choices"'),
        ),
        "bad_response",
        True,
    ),
    "openai-sse-event-too-large": Case(
        "openai",
        sse_reply(b"data: " + b"x" * 300_000),  # no blank line, ever
        "response_too_large",
        True,
        provider={"max_event_bytes": 64 * 1024},
    ),
    "openai-sse-trickled-first-event": Case(
        "openai",
        sse_reply(then=trickle(OPENAI_CHUNK, 0.1)),
        "timeout",
        True,
        provider={"stream_idle_timeout_s": 0.5},
    ),
}


async def _gzipped(body: dict[str, Any]) -> web.Response:
    return web.Response(
        body=gzip.compress(json.dumps(body).encode()),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )


@asynccontextmanager
async def gateway_with(case_name: str, case: Case) -> AsyncIterator[str]:
    async with scripted_upstream() as upstream, mock_upstreams(good=MockSettings()) as mocks:
        document = gateway_config(
            mocks,
            [
                {
                    "model": "alone",
                    "strategy": "cost",
                    "targets": [{"provider": "bad", "model": "bad-model", "id": "bad"}],
                },
                {
                    "model": "failover",
                    "strategy": "cost",
                    "targets": [
                        {
                            "provider": "bad",
                            "model": "bad-model",
                            "id": "bad",
                            "input_cost_per_mtok": 1.0,
                        },
                        {
                            "provider": "good",
                            "model": "good-model",
                            "id": "good",
                            "input_cost_per_mtok": 2.0,
                        },
                    ],
                },
            ],
            breaker={"failure_threshold": 10},
        )
        document["providers"].append(
            {
                "name": "bad",
                "kind": case.kind,
                "base_url": upstream.base_url(case_name, case.script),
                "api_key": "sk-bad-secret",
                **case.provider,
            }
        )
        async with running_gateway(document) as (url, _app):
            yield url


async def post_chat(url: str, model: str, *, stream: bool) -> tuple[int, str, Any, str]:
    body: dict[str, Any] = {"model": model, "messages": MESSAGES, "stream": stream}
    timeout = aiohttp.ClientTimeout(total=20)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(f"{url}/v1/chat/completions", json=body) as response,
    ):
        text = await response.text()
        return response.status, response.content_type, response.headers, text


async def target(url: str, route: str, target_id: str) -> dict[str, Any]:
    status, body = await get_json(f"{url}/v1/routes/{route}/explain")
    assert status == 200, body
    found: dict[str, Any] = next(t for t in body["targets"] if t["target"] == target_id)
    return found


@pytest.mark.parametrize("name", list(CASES))
async def test_bad_upstream_answer_is_a_classified_failure_that_fails_over(name: str) -> None:
    case = CASES[name]
    async with gateway_with(name, case) as url:
        status, content_type, headers, text = await post_chat(url, "alone", stream=case.stream)
        assert (status, content_type) == (502, "application/json"), text[:500]
        error = json.loads(text)["error"]
        assert error["code"] == "all_providers_failed"
        tried = [a["error"] for a in error["attempts"]]  # the lone target, once per round
        assert tried and set(tried) == {case.error}
        assert "sk-bad-secret" not in text

        status, content_type, headers, text = await post_chat(url, "failover", stream=case.stream)
        assert status == 200, text[:500]
        assert headers["x-edgeroute-provider"] == "good"
        assert headers["x-edgeroute-attempts"] == "2"
        if case.stream:
            assert content_type == SSE
            assert text.startswith("data: {")  # the healthy stream, nothing of the bad one
            assert text.rstrip().endswith("data: [DONE]")
        else:
            assert json.loads(text)["choices"][0]["message"]["content"]

        async def counted() -> bool:
            alone = await target(url, "alone", "bad")
            failover = await target(url, "failover", "bad")
            return bool(
                alone["window"]["failures"] == len(tried)
                and failover["window"]["failures"] == 1
                and failover["consecutive_failures"] == 1
            )

        await wait_until(counted, 5.0)
        for route in ("alone", "failover"):
            assert (await target(url, route, "bad"))["in_flight"] == 0


# ---- mid-stream: after the first event there is no failover, only an error event ---------


MID_STREAM: dict[str, Case] = {
    "idle-defaults-to-timeout_s": Case(
        "openai",
        sse_reply(OPENAI_CHUNK, then=trickle(OPENAI_CHUNK * 100, 0.1)),
        "timeout",
        True,
        provider={"timeout_s": 0.5},  # bytes every 0.1 s: only an event-level timer stops it
    ),
    "idle-after-first-event": Case(
        "openai",
        sse_reply(OPENAI_CHUNK, then=trickle(OPENAI_CHUNK * 100, 0.1)),
        "timeout",
        True,
        provider={"stream_idle_timeout_s": 0.5, "timeout_s": 3},
    ),
    "total-deadline": Case(
        "openai",
        sse_reply(*[OPENAI_CHUNK] * 200, gap_s=0.05),
        "timeout",
        True,
        provider={"stream_timeout_s": 1.0},
    ),
    "event-too-large-mid-stream": Case(
        "openai",
        sse_reply(OPENAI_CHUNK, b"data: " + b"y" * 300_000),
        "response_too_large",
        True,
        provider={"max_event_bytes": 64 * 1024},
    ),
    "anthropic-usage-not-a-number-at-the-end": Case(
        "anthropic",
        sse_reply(
            MESSAGE_START,
            anthropic_event(
                "content_block_delta",
                {"index": 0, "delta": {"type": "text_delta", "text": "hi"}},
            ),
            anthropic_event(
                "message_delta",
                {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": "lots"}},
            ),
            anthropic_event("message_stop", {"type": "message_stop"}),
            gap_s=0.1,  # apart, so the first events reach the client before the bad one
        ),
        "bad_response",
        True,
    ),
}


@pytest.mark.parametrize("name", list(MID_STREAM))
async def test_broken_stream_ends_with_an_error_event_and_a_breaker_failure(name: str) -> None:
    case = MID_STREAM[name]
    async with gateway_with(name, case) as url:
        started = time.monotonic()
        status, content_type, headers, text = await post_chat(url, "failover", stream=True)
        assert (status, content_type) == (200, SSE), text[:500]
        assert headers["x-edgeroute-provider"] == "bad"
        events = [e for e in text.split("\n\n") if e.strip()]
        assert events[0].startswith("data: {")
        last = json.loads(events[-1].removeprefix("data: "))
        assert last["error"]["type"] == "upstream_error"
        assert last["error"]["code"] == case.error
        assert "[DONE]" not in text
        assert time.monotonic() - started < 15  # bounded: the stall did not hold the client

        async def counted() -> bool:
            bad = await target(url, "failover", "bad")
            return bool(bad["window"]["failures"] == 1 and bad["in_flight"] == 0)

        await wait_until(counted, 5.0)


async def test_sdk_client_sees_a_stalled_stream_as_an_error() -> None:
    case = MID_STREAM["idle-after-first-event"]
    async with gateway_with("sdk-idle", case) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        async with client:
            stream = await client.chat.completions.create(
                model="failover",
                messages=[{"role": "user", "content": "hello"}],
                stream=True,
                timeout=15,
            )
            with pytest.raises(openai.APIError, match="failed mid-stream"):
                async for _chunk in stream:
                    pass


# ---- a gzip bomb is cut while inflating ---------------------------------------------------


def _bomb(inflated: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip framing
    zeros = b"0" * (1 << 20)
    parts = [compressor.compress(b'{"pad":"')]
    parts += [compressor.compress(zeros) for _ in range(inflated >> 20)]
    parts.append(compressor.compress(b'"}') + compressor.flush())
    return b"".join(parts)


async def test_gzip_bomb_is_cut_while_inflating_and_healthz_stays_responsive() -> None:
    bomb = _bomb(512 << 20)  # 512 MiB of JSON in about half a megabyte

    async def script(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=bomb,
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )

    case = Case("openai", script, "response_too_large")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    async with gateway_with("bomb", case) as url:
        request = asyncio.create_task(post_chat(url, "alone", stream=False))
        slowest = 0.0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            while not request.done():
                started = time.monotonic()
                async with session.get(f"{url}/healthz") as response:
                    assert response.status == 200
                slowest = max(slowest, time.monotonic() - started)
                await asyncio.sleep(0.01)
        status, _content_type, _headers, text = await request
        assert status == 502, text[:300]
        assert json.loads(text)["error"]["attempts"][0]["error"] == "response_too_large"
        assert slowest < 2.0  # a liveness probe would have been answered throughout
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 160, f"peak RSS grew {grown_mib:.0f} MiB for a 32 MiB bound"
