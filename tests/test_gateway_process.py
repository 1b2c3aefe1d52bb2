"""`edgeroute serve` as a real process: start from a config file, drain on SIGTERM, exit codes.

Upstreams run in this test process (so the test can see and steer them); the gateway is a
child process started exactly as a user would start it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from edgeroute.mock_provider import MockSettings
from tests.support.gateway import (
    HOST,
    GatewayProcess,
    gateway_config,
    gateway_process,
    get_json,
    mock_upstreams,
    running_app,
    wait_until,
)

pytestmark = pytest.mark.slow

CLIENT_KEY = "process-client-key-987"
MESSAGES: list[Any] = [{"role": "user", "content": "hello from a real process"}]
SHUTDOWN_TIMEOUT_S = 8.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def routes() -> list[dict[str, Any]]:
    return [{"model": "chat", "strategy": "cost", "targets": [{"provider": "a", "model": "a-1"}]}]


def client(process: GatewayProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{process.url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=30
    )


async def wait_exit(process: GatewayProcess, limit_s: float) -> tuple[int, float]:
    """Wait (off the event loop, so in-process upstreams keep serving) for the exit code."""
    started = time.monotonic()
    code = await asyncio.to_thread(process.process.wait, limit_s)
    return code, time.monotonic() - started


async def wait_draining(process: GatewayProcess) -> float:
    """Seconds until /readyz answers 503 "draining"."""
    started = time.monotonic()

    async def draining() -> bool:
        status, body = await get_json(f"{process.url}/readyz")
        return status == 503 and body["status"] == "draining"

    await wait_until(draining, timeout=5, interval=0.02)
    return time.monotonic() - started


def access_lines(log: str) -> list[dict[str, Any]]:
    records = []
    for line in log.splitlines():
        if line.startswith("{") and '"request_id"' in line:
            records.append(json.loads(line))
    return records


async def test_serve_from_config_file(tmp_path: Path) -> None:
    async with mock_upstreams(a=MockSettings()) as mocks:
        document = gateway_config(mocks, routes(), server={"api_keys": [CLIENT_KEY]})
        async with gateway_process(document, tmp_path) as process:
            assert await get_json(f"{process.url}/healthz") == (200, {"status": "ok"})
            status, ready = await get_json(f"{process.url}/readyz")
            assert (status, ready["status"], ready["shared_state"]) == (200, "ready", "local")

            async with client(process) as sdk:
                completion = await sdk.chat.completions.create(model="chat", messages=MESSAGES)
                chunks = [
                    c
                    async for c in await sdk.chat.completions.create(
                        model="chat", messages=MESSAGES, stream=True
                    )
                ]
            assert (
                completion.choices[0].message.content == "Hello from a (a-1). This is a mock reply."
            )
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
                completion.choices[0].message.content
            )
            assert (await mocks["a"].stats())["last_authorization"] == "Bearer sk-a-secret"

            code = await asyncio.to_thread(process.terminate, 15)
            assert code == 0
            log = process.log()
            records = access_lines(log)
            assert [r["status"] for r in records] == [200, 200]
            assert {r["route"] for r in records} == {"chat"}
            for secret in (CLIENT_KEY, "sk-a-secret"):
                assert secret not in log


async def test_sigterm_drains_in_flight_request(tmp_path: Path) -> None:
    async with mock_upstreams(a=MockSettings(latency_ms=1500)) as mocks:
        document = gateway_config(
            mocks,
            routes(),
            server={"api_keys": [CLIENT_KEY], "shutdown_timeout_s": SHUTDOWN_TIMEOUT_S},
        )
        async with gateway_process(document, tmp_path) as process, client(process) as sdk:

            async def slow_request() -> Any:
                return await sdk.chat.completions.with_raw_response.create(
                    model="chat", messages=MESSAGES
                )

            request = asyncio.create_task(slow_request())
            await wait_until(lambda: mocks["a"].provider.in_flight == 1, timeout=5)
            process.process.send_signal(signal.SIGTERM)

            assert await wait_draining(process) < 1.0
            assert not request.done()  # still waiting on the slow upstream

            raw = await asyncio.wait_for(request, timeout=10)
            assert raw.status_code == 200
            assert raw.parse().choices[0].message.content.startswith("Hello from a")

            code, waited = await wait_exit(process, SHUTDOWN_TIMEOUT_S + 5)
            assert code == 0
            assert waited < SHUTDOWN_TIMEOUT_S
            assert [r["status"] for r in access_lines(process.log())] == [200]


class SlowStream:
    """Streams `chunks` chunks, one every `interval_s` seconds."""

    def __init__(self, chunks: int = 15, interval_s: float = 0.1) -> None:
        self.chunks = chunks
        self.interval_s = interval_s
        self.started = asyncio.Event()
        self.completed = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        self.started.set()
        base = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1}
        for i in range(self.chunks):
            delta = {"content": f"{i} "}
            chunk = {**base, "model": body["model"], "choices": [{"index": 0, "delta": delta}]}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await asyncio.sleep(self.interval_s)
        finish = {"index": 0, "delta": {}, "finish_reason": "stop"}
        usage = {"prompt_tokens": 3, "completion_tokens": self.chunks, "total_tokens": 18}
        for tail in ({**base, "choices": [finish]}, {**base, "choices": [], "usage": usage}):
            await response.write(b"data: " + json.dumps(tail).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        self.completed += 1
        return response


async def test_sigterm_drains_in_flight_stream(tmp_path: Path) -> None:
    upstream = SlowStream()
    async with running_app(upstream.app(), handler_cancellation=True) as upstream_url:
        document = {
            "server": {"api_keys": [CLIENT_KEY], "shutdown_timeout_s": SHUTDOWN_TIMEOUT_S},
            "providers": [{"name": "a", "base_url": f"{upstream_url}/v1", "api_key": "sk-a"}],
            "routes": routes(),
        }
        async with gateway_process(document, tmp_path) as process, client(process) as sdk:
            response = await sdk.chat.completions.create(
                model="chat", messages=MESSAGES, stream=True
            )
            chunks = []
            iterator = response.__aiter__()
            chunks.append(await iterator.__anext__())  # the stream is flowing
            process.process.send_signal(signal.SIGTERM)
            draining = asyncio.create_task(wait_draining(process))
            async for chunk in iterator:
                chunks.append(chunk)
            assert await draining < 1.0

            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == "".join(f"{i} " for i in range(upstream.chunks))
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
            assert all(c.usage is None for c in chunks)  # usage was edgeroute's, not ours
            assert upstream.completed == 1

            code, waited = await wait_exit(process, SHUTDOWN_TIMEOUT_S + 5)
            assert code == 0
            assert waited < SHUTDOWN_TIMEOUT_S
            (record,) = access_lines(process.log())
            assert record["status"] == 200 and "error" not in record


async def _sigterm_with_hung_request(tmp_path: Path, timeout_s: float) -> float:
    """SIGTERM while a request hangs upstream; returns seconds from the signal to the exit."""
    async with mock_upstreams(a=MockSettings(fault="hang")) as mocks:
        document = gateway_config(
            mocks, routes(), server={"api_keys": [CLIENT_KEY], "shutdown_timeout_s": timeout_s}
        )
        async with gateway_process(document, tmp_path) as process, client(process) as sdk:
            request = asyncio.create_task(
                sdk.chat.completions.create(model="chat", messages=MESSAGES)
            )
            await wait_until(lambda: mocks["a"].provider.in_flight == 1, timeout=5)
            signalled = time.monotonic()
            process.process.send_signal(signal.SIGTERM)
            assert await wait_draining(process) < 1.0
            code, _ = await wait_exit(process, 4 * timeout_s + 10)
            elapsed = time.monotonic() - signalled
            assert code == 0
            with pytest.raises(openai.APIError):  # cut off, not answered
                await asyncio.wait_for(request, timeout=5)
            await wait_until(lambda: mocks["a"].provider.in_flight == 0, timeout=5)
            return elapsed


async def test_drain_gives_up_on_a_request_that_never_ends(tmp_path: Path) -> None:
    await _sigterm_with_hung_request(tmp_path, 1.0)


async def test_drain_is_bounded_by_shutdown_timeout(tmp_path: Path) -> None:
    timeout_s = 1.0
    elapsed = await _sigterm_with_hung_request(tmp_path, timeout_s)
    assert elapsed < timeout_s + 1.0, elapsed


# --- bad configuration ----------------------------------------------------------------------


@contextmanager
def occupied_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        sock.listen(1)
        yield int(sock.getsockname()[1])


def run_serve(config: Path, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeroute.cli",
            "serve",
            "--config",
            str(config),
            "--host",
            HOST,
            "--port",
            str(port),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


GOOD_PROVIDER = {"name": "a", "base_url": "http://127.0.0.1:9/v1", "api_key": "sk-very-secret"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            json.dumps(
                {
                    "providers": [GOOD_PROVIDER],
                    "routes": [{"model": "chat", "targets": [{"provider": "b", "model": "m"}]}],
                }
            ),
            "$.routes[0].targets[0].provider",
        ),
        (json.dumps({"server": {"port": "eighty"}, "providers": [GOOD_PROVIDER]}), "$.server.port"),
        (json.dumps({"servr": {}, "providers": [GOOD_PROVIDER]}), "servr"),
        ("providers: [\n  - name: a\n   base_url: x\n", "invalid YAML"),
        (None, "cannot read"),
    ],
    ids=["unknown-provider", "bad-type", "unknown-field", "bad-yaml", "missing-file"],
)
def test_bad_config_exits_nonzero_with_one_readable_line(
    tmp_path: Path, text: str | None, expected: str
) -> None:
    config = tmp_path / "edgeroute.yaml"
    if text is not None:
        config.write_text(text)
    result = run_serve(config, free_port())
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("edgeroute:"), lines[0]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert "sk-very-secret" not in result.stderr + result.stdout
    assert "listening on" not in result.stdout


def test_port_in_use_exits_nonzero_with_one_readable_line(tmp_path: Path) -> None:
    config = tmp_path / "edgeroute.yaml"
    route = {"model": "chat", "targets": [{"provider": "a", "model": "m"}]}
    config.write_text(json.dumps({"providers": [GOOD_PROVIDER], "routes": [route]}))
    with occupied_port() as port:
        result = run_serve(config, port)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("edgeroute:") and str(port) in lines[0], lines[0]
