"""OpenTelemetry tracing, end to end: a real gateway process exports to a real OTLP/HTTP
receiver running inside the test, which decodes the protobuf with opentelemetry-proto.

The gateway is a child process (`edgeroute serve`) configured only by OTEL_* variables, as
an operator would run it; the upstreams are mock providers that record request headers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from edgeroute import tracing
from edgeroute.mock_provider import MockSettings
from tests.support.gateway import (
    GatewayProcess,
    gateway_config,
    mock_upstreams,
    running_app,
    running_gateway,
    wait_until,
)
from tests.support.redis_servers import free_port

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hello there"}]}
BAD_THEN_GOOD = {
    "model": "chat",
    "strategy": "cost",  # the cheap target first: when it fails, one failover
    "targets": [
        {"provider": "bad", "model": "m-bad", "input_cost_per_mtok": 0.1},
        {"provider": "good", "model": "m-good", "input_cost_per_mtok": 1.0},
    ],
}


class Receiver:
    """An OTLP/HTTP trace receiver: POST /v1/traces with an ExportTraceServiceRequest."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.resources: list[dict[str, Any]] = []

    async def traces(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        for resource_spans in message.resource_spans:
            self.resources.append(attributes(resource_spans.resource.attributes))
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def named(self, prefix: str) -> list[Span]:
        return [s for s in self.spans if s.name.startswith(prefix)]


@asynccontextmanager
async def otlp_receiver() -> AsyncIterator[tuple[str, Receiver]]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", receiver.traces)
    async with running_app(app) as url:
        yield url, receiver


def attributes(items: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for item in items:
        assert isinstance(item, KeyValue)
        kind = item.value.WhichOneof("value")
        found[item.key] = getattr(item.value, kind) if kind else None
    return found


async def test_a_failed_over_request_is_one_trace_continued_from_the_client(
    tmp_path: Path,
) -> None:
    async with (
        mock_upstreams(bad=MockSettings(error_rate=1.0), good=MockSettings()) as mocks,
        otlp_receiver() as (otlp_url, receiver),
    ):
        document = gateway_config(mocks, [BAD_THEN_GOOD])
        gateway = GatewayProcess(
            document,
            tmp_path,
            port=free_port(),
            env={
                "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_url,  # the one variable an operator sets
                "OTEL_SERVICE_NAME": "edgeroute-test",
                "OTEL_BSP_SCHEDULE_DELAY": "50",
                "EDGEROUTE_CONFIG_WATCH_S": "0",
            },
        )
        try:
            await asyncio.to_thread(gateway.wait_ready)
            client_trace = secrets.token_hex(16)
            client_span = secrets.token_hex(8)
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    f"{gateway.url}/v1/chat/completions",
                    json=CHAT,
                    headers={"traceparent": f"00-{client_trace}-{client_span}-01"},
                ) as response,
            ):
                assert response.status == 200, await response.text()
                assert response.headers["x-edgeroute-attempts"] == "2"
            await wait_until(lambda: receiver.named("POST "), timeout=15)
            await wait_until(lambda: len(receiver.named("chat ")) == 2, timeout=15)
            good_stats = await mocks["good"].stats()
        finally:
            await asyncio.to_thread(gateway.terminate)

    assert receiver.resources[0]["service.name"] == "edgeroute-test"
    (server,) = receiver.named("POST ")
    assert server.trace_id.hex() == client_trace
    assert server.parent_span_id.hex() == client_span
    assert server.kind == Span.SPAN_KIND_SERVER
    attrs = attributes(server.attributes)
    assert attrs["edgeroute.route"] == "chat"
    assert attrs["edgeroute.strategy"] == "cost"
    assert attrs["http.response.status_code"] == 200
    assert attrs["edgeroute.attempts"] == 2
    (failover,) = [e for e in server.events if e.name == "edgeroute.failover"]
    moved = attributes(failover.attributes)
    assert moved["error.type"] == "server_error"  # the cause
    assert moved["edgeroute.from_provider"] == "bad"
    assert moved["edgeroute.to_provider"] == "good"
    assert moved["edgeroute.from_target"] != moved["edgeroute.to_target"]
    # One failure of three (the default threshold) moves no breaker.
    assert not [e for e in server.events if e.name == "edgeroute.breaker"]

    decides = sorted(receiver.named("edgeroute.decide"), key=lambda s: s.start_time_unix_nano)
    assert len(decides) == 2
    first = attributes(decides[0].attributes)
    assert first["edgeroute.decision.provider"] == "bad"
    assert first["edgeroute.decision.candidates"] == 2
    assert first["edgeroute.shared_state"] == "local"
    assert first["edgeroute.decision.reason"]
    assert isinstance(first["edgeroute.decision.score"], float)
    assert attributes(decides[1].attributes)["edgeroute.decision.provider"] == "good"

    attempts = sorted(receiver.named("chat "), key=lambda s: s.start_time_unix_nano)
    failed, served = (attributes(s.attributes) for s in attempts)
    for span in [*decides, *attempts]:
        assert span.trace_id.hex() == client_trace
        assert span.parent_span_id == server.span_id
    assert all(s.kind == Span.SPAN_KIND_CLIENT for s in attempts)
    assert failed["gen_ai.system"] == "openai"
    assert failed["gen_ai.request.model"] == "m-bad"
    assert failed["error.type"] == "server_error"
    assert attempts[0].status.code == attempts[0].status.STATUS_CODE_ERROR
    assert served["gen_ai.operation.name"] == "chat"
    assert served["gen_ai.request.model"] == served["gen_ai.response.model"] == "m-good"
    assert served["gen_ai.usage.input_tokens"] > 0
    assert served["gen_ai.usage.output_tokens"] > 0
    assert "error.type" not in served

    # The upstream got the attempt span's context, not the client's or the server span's.
    traceparent = good_stats["last_headers"]["traceparent"]
    assert traceparent == f"00-{client_trace}-{attempts[1].span_id.hex()}-01"

    # The access line carries the trace id; no key ever reaches a span.
    lines = [json.loads(line) for line in gateway.log().splitlines() if '"request_id"' in line]
    assert [line["trace_id"] for line in lines] == [client_trace]
    for span in receiver.spans:
        text = str(attributes(span.attributes)) + str(list(span.events))
        assert "sk-" not in text


async def test_a_fallback_shows_as_an_event_and_the_serving_route(tmp_path: Path) -> None:
    async with (
        mock_upstreams(bad=MockSettings(error_rate=1.0), good=MockSettings()) as mocks,
        otlp_receiver() as (otlp_url, receiver),
    ):
        document = gateway_config(
            mocks,
            [
                {
                    "model": "chat",
                    "targets": [{"provider": "bad", "model": "m"}],
                    "fallbacks": ["backup"],
                },
                {"model": "backup", "targets": [{"provider": "good", "model": "m"}]},
            ],
        )
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_url, "OTEL_BSP_SCHEDULE_DELAY": "50"}
        gateway = GatewayProcess(document, tmp_path, port=free_port(), env=env)
        try:
            await asyncio.to_thread(gateway.wait_ready)
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"{gateway.url}/v1/chat/completions", json=CHAT) as response,
            ):
                assert response.status == 200, await response.text()
                assert response.headers["x-edgeroute-route"] == "backup"
            await wait_until(lambda: receiver.named("POST "), timeout=15)
            await wait_until(lambda: len(receiver.named("chat ")) == 2, timeout=15)
        finally:
            await asyncio.to_thread(gateway.terminate)

    (server,) = receiver.named("POST ")
    assert attributes(server.attributes)["edgeroute.route"] == "backup"
    (fallback,) = [e for e in server.events if e.name == "edgeroute.fallback"]
    assert attributes(fallback.attributes) == {
        "edgeroute.from_route": "chat",
        "edgeroute.to_route": "backup",
        "edgeroute.fallback.cause": "exhausted",
    }
    attempts = sorted(receiver.named("chat "), key=lambda s: s.start_time_unix_nano)
    routes = [attributes(s.attributes)["edgeroute.route"] for s in attempts]
    assert routes == ["chat", "backup"]
    decides = sorted(receiver.named("edgeroute.decide"), key=lambda s: s.start_time_unix_nano)
    assert [attributes(s.attributes)["edgeroute.route"] for s in decides] == [
        "chat",
        "chat",
        "backup",
    ]


async def post(url: str) -> str:
    """One chat completion; the provider that answered."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/chat/completions", json=CHAT) as response,
    ):
        assert response.status == 200, await response.text()
        return response.headers["x-edgeroute-provider"]


def breaker_events(span: Span) -> list[dict[str, Any]]:
    return [attributes(e.attributes) for e in span.events if e.name == "edgeroute.breaker"]


async def test_breakers_a_request_moved_are_events_on_its_span(tmp_path: Path) -> None:
    async with (
        mock_upstreams(bad=MockSettings(error_rate=1.0), good=MockSettings()) as mocks,
        otlp_receiver() as (otlp_url, receiver),
    ):
        document = gateway_config(
            mocks,
            [BAD_THEN_GOOD],
            breaker={"failure_threshold": 1, "open_timeout_s": 0.3, "success_threshold": 1},
        )
        gateway = GatewayProcess(
            document,
            tmp_path,
            port=free_port(),
            env={
                "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_url,
                "OTEL_BSP_SCHEDULE_DELAY": "50",
                "EDGEROUTE_CONFIG_WATCH_S": "0",
            },
        )
        try:
            await asyncio.to_thread(gateway.wait_ready)
            # 1. bad fails once: its breaker opens (reported by the failover's decide).
            assert await post(gateway.url) == "good"
            await wait_until(lambda: len(receiver.named("POST ")) == 1, timeout=15)
            # 2. While it is open, a request goes straight to good: it moved nothing.
            assert await post(gateway.url) == "good"
            await wait_until(lambda: len(receiver.named("POST ")) == 2, timeout=15)
            # 3. bad recovers; after the open timeout its probe succeeds and closes it (the
            #    request's last outcome, written by the recorder after the response).
            await mocks["bad"].configure(error_rate=0.0)
            await asyncio.sleep(0.5)
            assert await post(gateway.url) == "bad"
            await wait_until(lambda: len(receiver.named("POST ")) == 3, timeout=15)
        finally:
            await asyncio.to_thread(gateway.terminate)

    opened, untouched, closed = sorted(
        receiver.named("POST "), key=lambda s: s.start_time_unix_nano
    )
    (failover,) = [
        attributes(e.attributes) for e in opened.events if e.name == "edgeroute.failover"
    ]
    bad = failover["edgeroute.from_target"]
    (event,) = breaker_events(opened)
    assert event["edgeroute.route"] == "chat"
    assert event["edgeroute.target"] == bad
    assert (event["edgeroute.breaker.from"], event["edgeroute.breaker.to"]) == ("closed", "open")
    assert breaker_events(untouched) == []
    assert not [e for e in untouched.events if e.name == "edgeroute.failover"]
    (event,) = breaker_events(closed)
    assert event["edgeroute.target"] == bad
    assert (event["edgeroute.breaker.from"], event["edgeroute.breaker.to"]) == (
        "half_open",
        "closed",
    )


async def test_a_stream_attempt_span_has_ttft_and_tokens(tmp_path: Path) -> None:
    async with (
        mock_upstreams(good=MockSettings()) as mocks,
        otlp_receiver() as (otlp_url, receiver),
    ):
        document = gateway_config(
            mocks, [{"model": "chat", "targets": [{"provider": "good", "model": "m"}]}]
        )
        gateway = GatewayProcess(
            document,
            tmp_path,
            port=free_port(),
            env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_url, "OTEL_BSP_SCHEDULE_DELAY": "50"},
        )
        try:
            await asyncio.to_thread(gateway.wait_ready)
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    f"{gateway.url}/v1/chat/completions", json={**CHAT, "stream": True}
                ) as response,
            ):
                assert response.status == 200
                await response.read()
            await wait_until(lambda: receiver.named("chat "), timeout=15)
        finally:
            await asyncio.to_thread(gateway.terminate)
    (attempt,) = receiver.named("chat ")
    attrs = attributes(attempt.attributes)
    assert attrs["gen_ai.server.time_to_first_token"] > 0
    assert attrs["gen_ai.usage.output_tokens"] > 0
    assert [e.name for e in attempt.events] == ["gen_ai.first_token"]


async def test_tracing_off_sends_no_traceparent_and_logs_no_trace_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert tracing.TRACER is None  # nothing in this process configured it
    caplog.set_level(logging.INFO, logger="edgeroute.access")
    async with mock_upstreams(good=MockSettings()) as mocks:
        document = gateway_config(
            mocks, [{"model": "chat", "targets": [{"provider": "good", "model": "m"}]}]
        )
        async with (
            running_gateway(document) as (url, _),
            aiohttp.ClientSession() as session,
            session.post(
                f"{url}/v1/chat/completions",
                json=CHAT,
                headers={"traceparent": f"00-{'1' * 32}-{'2' * 16}-01"},
            ) as response,
        ):
            assert response.status == 200
        headers = (await mocks["good"].stats())["last_headers"]
    assert "traceparent" not in {k.lower() for k in headers}
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "edgeroute.access"]
    assert records and all("trace_id" not in r for r in records)


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "TRUE"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
    ],
)
def test_only_the_standard_otel_variables_turn_tracing_on(env: dict[str, str], on: bool) -> None:
    assert tracing.wanted(env) is on


def test_the_request_path_does_not_import_opentelemetry() -> None:
    # Tracing off must cost nothing: the span code is never imported (redis-py may import
    # the OpenTelemetry API for its own optional instrumentation; that is not ours).
    import subprocess
    import sys

    code = (
        "import sys, edgeroute.server, edgeroute.proxy, edgeroute.tracing; "
        "from edgeroute import tracing; tracing.configure(); "
        "print('edgeroute.tracing_otel' in sys.modules, tracing.TRACER)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
    )
    assert result.stdout.split() == ["False", "None"]
