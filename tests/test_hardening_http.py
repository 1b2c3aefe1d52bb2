"""Hostile and sloppy clients (issue 9, items 5-7), against real gateways on loopback.

- every error the gateway answers is OpenAI's JSON error shape: unknown paths, wrong
  methods, path tricks, deeply nested JSON, requests the HTTP parser refuses;
- slow and idle connections are closed (header, body and keep-alive deadlines), connections
  beyond the cap or the descriptor budget get a 503 and are closed, and the gateway keeps
  serving with a log that does not flood.

The connection tests run `edgeroute serve` as a child process: those protections live in the
listener that `serve` builds. Raw sockets play the clients; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from edgeroute.config import loads_config
from edgeroute.errors import ConfigError
from edgeroute.jsonguard import MAX_JSON_DEPTH, json_depth_exceeds
from edgeroute.logfilter import RepeatFilter
from edgeroute.mock_provider import MockSettings
from edgeroute.proxy import Proxy
from tests.support.gateway import (
    HOST,
    gateway_config,
    mock_upstreams,
    running_app,
    running_gateway,
    wait_until,
)

ROUTE = [{"model": "chat", "targets": [{"provider": "up", "model": "m"}]}]


def assert_openai_error(raw: bytes, status: int, code: str | None = None) -> dict[str, Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    assert status_line.split(" ")[1] == str(status), raw[:300]
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    assert headers["content-type"].startswith("application/json"), raw[:300]
    error = json.loads(body)["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code, error
    assert "Traceback" not in error["message"]
    return dict(error)


async def exchange(url: str, request: bytes, timeout: float = 10.0) -> bytes:  # noqa: ASYNC109
    """Send raw bytes, read until the server closes or stops (a whole small answer)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        data = b""
        with suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while b"\r\n\r\n" not in data or not _complete(data):
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    data += chunk
        return data
    finally:
        writer.close()


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


@asynccontextmanager
async def gateway(**sections: Any) -> AsyncIterator[str]:
    async with mock_upstreams(up=MockSettings()) as mocks:
        document = gateway_config(mocks, ROUTE, **sections)
        async with running_gateway(document) as (url, _app):
            yield url


# ---- item 6: the shape of every error ------------------------------------------------------


@pytest.mark.parametrize(
    ("request_line", "status", "code"),
    [
        (b"GET /nope HTTP/1.1", 404, "not_found"),
        (b"GET /v1/../admin/state HTTP/1.1", 404, "not_found"),
        (b"GET /v1/%2e%2e/admin/state HTTP/1.1", 404, "not_found"),
        (b"GET /v1/chat/completions HTTP/1.1", 405, "method_not_allowed"),
        (b"DELETE /healthz HTTP/1.1", 405, "method_not_allowed"),
        (b"POST /v1/models HTTP/1.1", 405, "method_not_allowed"),
    ],
)
async def test_errors_outside_the_routes_are_openai_json(
    request_line: bytes, status: int, code: str
) -> None:
    async with gateway(server={"admin_token": "hardening-admin"}) as url:
        raw = await exchange(url, request_line + b"\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        error = assert_openai_error(raw, status, code)
        assert error["type"] == "invalid_request_error"
        if status == 405:
            assert b"\r\nAllow: " in raw


async def test_invalid_url_echoes_method_and_path_like_openai() -> None:
    async with gateway() as url, aiohttp.ClientSession() as session:
        async with session.get(f"{url}/v1/nothing-here") as response:
            assert response.status == 404
            body = await response.json()
        assert body["error"]["message"] == "Invalid URL (GET /v1/nothing-here)"


async def test_a_handler_bug_is_a_json_500(monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(self: Proxy, request: web.Request, endpoint: str) -> web.StreamResponse:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Proxy, "handle", broken)
    async with gateway() as url:
        raw = await exchange(
            url,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2\r\n\r\n{}",
        )
        error = assert_openai_error(raw, 500, "internal_error")
        assert "a bug" not in error["message"]
        assert await healthz_in_process(url) == 200


async def healthz_in_process(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/healthz") as response:
        return response.status


# ---- item 5: nesting ---------------------------------------------------------------------


def nested(levels: int, inner: bytes = b"1") -> bytes:
    return b"[" * levels + inner + b"]" * levels


async def test_deeply_nested_json_is_400_invalid_json_without_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = b'{"model":"chat","messages":' + nested(1000) + b"}"
    async with gateway() as url:
        caplog.clear()
        for _ in range(3):
            raw = await exchange(
                url,
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body,
            )
            error = assert_openai_error(raw, 400, "invalid_json")
            assert "nested deeper" in error["message"]
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

        # As deep as a real request may be is still served.
        content = json.dumps({"a": json.loads(nested(MAX_JSON_DEPTH - 10))})
        async with aiohttp.ClientSession() as session:
            payload = {"model": "chat", "messages": [{"role": "user", "content": content}]}
            async with session.post(f"{url}/v1/chat/completions", json=payload) as response:
                assert response.status == 200, await response.text()


def test_json_depth_counts_brackets_outside_strings_only() -> None:
    limit = 5
    assert not json_depth_exceeds(nested(5), limit)
    assert json_depth_exceeds(nested(6), limit)
    assert json_depth_exceeds(b'{"a":{"b":{"c":{"d":{"e":{"f":1}}}}}}', limit)
    # Brackets inside strings, escaped quotes included, nest nothing.
    quoted = b'["' + b"[" * 50 + b'\\"' + b"{" * 50 + b'"]'
    assert not json_depth_exceeds(quoted, limit)
    assert not json_depth_exceeds(b"[" * 3 + b"]" * 3 + b"[" * 3 + b"]" * 3, limit)
    # Malformed documents are the decoder's to refuse; judging them never raises.
    assert json_depth_exceeds(b'"unterminated [[[[[[[[', limit) in (True, False)
    assert not json_depth_exceeds(b"]]]]]]]]]]", limit)


# ---- item 1: credentials in base_url -------------------------------------------------------


@pytest.mark.parametrize(
    "provider",
    [
        {"kind": "openai", "api_key": "sk-secret-key"},
        {"kind": "openai", "headers": {"Authorization": "Bearer sk-secret-key"}},
        {"kind": "anthropic", "headers": {"authorization": "Bearer sk-secret-key"}},
    ],
)
def test_base_url_credentials_next_to_an_authorization_header_are_refused(
    provider: dict[str, Any], tmp_path: Path
) -> None:
    document = {
        "providers": [{"name": "p", "base_url": "https://user:pw@llm.example/v1", **provider}],
        "routes": ROUTE[:0],
    }
    with pytest.raises(ConfigError) as caught:
        loads_config(yaml.safe_dump(document), env={})
    message = str(caught.value)
    assert message.startswith("$.providers[0]")
    assert "base_url" in message and "user:pass@" in message
    assert "sk-secret-key" not in message and "pw@" not in message

    path = tmp_path / "edgeroute.yaml"
    path.write_text(yaml.safe_dump(document))
    checked = subprocess.run(
        [sys.executable, "-m", "edgeroute.cli", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode != 0
    assert "$.providers[0]" in checked.stderr and "base_url" in checked.stderr
    assert "sk-secret-key" not in checked.stderr + checked.stdout


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_base_url_credentials_alone_are_sent_as_basic_auth(kind: str) -> None:
    seen: list[dict[str, str]] = []

    async def upstream(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        if kind == "anthropic":
            return web.json_response(
                {
                    "content": [{"type": "text", "text": "hi"}],
                    "stop_reason": "end_turn",
                    "usage": {"input_tokens": 1, "output_tokens": 1},
                }
            )
        return web.json_response(
            {
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1},
            }
        )

    app = web.Application()
    app.router.add_post("/v1/{tail:.*}", upstream)
    async with running_app(app) as upstream_url:
        provider: dict[str, Any] = {
            "name": "up",
            "kind": kind,
            "base_url": upstream_url.replace("http://", "http://gate:s3cret@") + "/v1",
        }
        if kind == "anthropic":
            provider["api_key"] = "sk-ant-key"  # x-api-key: no clash with Basic auth
        document = {"providers": [provider], "routes": ROUTE}
        async with running_gateway(document) as (url, _app), aiohttp.ClientSession() as session:
            payload = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
            async with session.post(f"{url}/v1/chat/completions", json=payload) as response:
                assert response.status == 200, await response.text()
    assert seen[0]["Authorization"] == "Basic " + base64.b64encode(b"gate:s3cret").decode()
    if kind == "anthropic":
        assert seen[0]["x-api-key"] == "sk-ant-key"


# ---- item 7: the log does not flood ------------------------------------------------------


def test_repeated_identical_errors_are_rate_limited() -> None:
    now = [0.0]
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect()
    handler.addFilter(RepeatFilter(10.0, clock=lambda: now[0]))
    logger = logging.getLogger("tests.hardening.flood")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        for _ in range(1000):
            try:
                raise OSError(24, "Too many open files")
            except OSError:
                logger.exception("socket.accept() out of system resource")
        logger.error("a different error")
        logger.info("info is never limited")
        logger.info("info is never limited")
        assert [r.getMessage() for r in records] == [
            "socket.accept() out of system resource",
            "a different error",
            "info is never limited",
            "info is never limited",
        ]
        now[0] = 11.0
        try:
            raise OSError(24, "Too many open files")
        except OSError:
            logger.exception("socket.accept() out of system resource")
        assert records[-1].getMessage() == (
            "socket.accept() out of system resource [999 identical messages suppressed]"
        )
    finally:
        logger.removeHandler(handler)


# ---- item 7: slow, idle and too many connections, against `edgeroute serve` ---------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(
    tmp_path: Path, server: dict[str, Any], *, open_files: int | None = None
) -> Iterator[tuple[str, Path]]:
    """`edgeroute serve` with one provider (never called here); yields (URL, log path)."""
    port = free_port()
    document = {
        "server": server,
        "providers": [{"name": "up", "base_url": "http://127.0.0.1:9/v1"}],
        "routes": ROUTE,
    }
    config = tmp_path / f"edgeroute-{port}.yaml"
    config.write_text(yaml.safe_dump(document))
    log_path = tmp_path / f"edgeroute-{port}.log"

    def limit_files() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "edgeroute.cli", "serve", "--config", str(config)),
                *("--host", HOST, "--port", str(port)),
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            env={**os.environ, "EDGEROUTE_ACCESS_LOG": "0"},
            preexec_fn=limit_files,
        )
        try:
            assert process.stdout is not None
            line = process.stdout.readline().decode()
            assert "listening on" in line, log_path.read_text()
            yield f"http://{HOST}:{port}", log_path
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


async def healthz(url: str) -> int:
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"{url}/healthz") as response,
    ):
        return response.status


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    """True once the server closed (EOF or reset) within `within` seconds."""
    try:
        async with asyncio.timeout(within):
            while await reader.read(65536):
                pass
        return True
    except ConnectionError:
        return True
    except TimeoutError:
        return False


async def open_sockets(url: str, count: int) -> list[tuple[asyncio.StreamReader, Any]]:
    host, port = url.removeprefix("http://").split(":")
    return [await asyncio.open_connection(host, int(port)) for _ in range(count)]


def close_all(sockets: list[tuple[asyncio.StreamReader, Any]]) -> None:
    for _reader, writer in sockets:
        writer.close()


async def test_parser_errors_are_openai_json(tmp_path: Path) -> None:
    with serve(tmp_path, {}) as (url, log_path):
        raw = await exchange(url, b"GARBAGE\r\n\r\n")
        assert_openai_error(raw, 400, "bad_request")
        raw = await exchange(url, b"GET /healthz HTTP/1.1\r\nBad Header\r\n\r\n")
        assert_openai_error(raw, 400, "bad_request")
        long_header = b"GET /healthz HTTP/1.1\r\nX-Long: " + b"a" * 20_000 + b"\r\n\r\n"
        assert_openai_error(await exchange(url, long_header), 400)
        raw = await exchange(url, b"GET /v1/../admin/state HTTP/1.1\r\nHost: x\r\n\r\n")
        assert_openai_error(raw, 404, "not_found")
        assert await healthz(url) == 200
    assert "Traceback" not in log_path.read_text()


async def test_slowloris_and_slow_bodies_are_closed(tmp_path: Path) -> None:
    server = {"header_timeout_s": 1, "body_timeout_s": 1, "keepalive_timeout_s": 30}
    with serve(tmp_path, server) as (url, _log):
        slow = await open_sockets(url, 50)
        for _reader, writer in slow:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never the blank line
        bodies = await open_sockets(url, 10)
        for _reader, writer in bodies:
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
            )
        # Keep trickling header bytes: activity must not extend the deadline.
        for _ in range(3):
            await asyncio.sleep(0.3)
            for _reader, writer in slow:
                with suppress(ConnectionError):
                    writer.write(b"X-A: b\r\n")
        assert await healthz(url) == 200  # served meanwhile
        closed = await asyncio.gather(
            *(closed_by_server(reader, 8.0) for reader, _ in slow + bodies)
        )
        assert all(closed), f"{closed.count(False)} slow connections still open"
        close_all(slow + bodies)


async def test_idle_keepalive_connections_are_closed(tmp_path: Path) -> None:
    with serve(tmp_path, {"keepalive_timeout_s": 1, "header_timeout_s": 30}) as (url, _log):
        [(reader, writer)] = await open_sockets(url, 1)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        assert await closed_by_server(reader, 8.0)
        writer.close()


async def test_connections_beyond_the_cap_get_503_and_the_gateway_keeps_serving(
    tmp_path: Path,
) -> None:
    server = {"max_connections": 20, "header_timeout_s": 2}
    with serve(tmp_path, server) as (url, log_path):
        held = await open_sockets(url, 20)
        await asyncio.sleep(0.2)
        extra = await open_sockets(url, 30)
        answers = []
        for reader, _writer in extra:
            with suppress(ConnectionError, TimeoutError):
                answers.append(await asyncio.wait_for(reader.read(4096), 5))
        refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
        assert len(refused) == 30, answers[:3]
        assert_openai_error(refused[0], 503, "too_many_connections")
        close_all(extra)
        # The idle ones are reaped by the header deadline; then normal service resumes.
        closed = await asyncio.gather(*(closed_by_server(r, 8.0) for r, _ in held))
        assert all(closed)
        close_all(held)

        async def serving() -> bool:
            with suppress(aiohttp.ClientError, TimeoutError):
                return await healthz(url) == 200
            return False

        await wait_until(serving, 10.0, 0.1)
    refusals = log_path.read_text().count("connection refused")
    assert 1 <= refusals <= 3, refusals  # rate-limited, not one line per refusal


async def test_near_the_fd_limit_new_connections_are_refused_not_fatal(tmp_path: Path) -> None:
    limit = 256  # budget: (256 - 64) // 2 = 96 client connections
    server = {"header_timeout_s": 2}
    with serve(tmp_path, server, open_files=limit) as (url, log_path):
        sockets = []
        with suppress(OSError):
            sockets = await open_sockets(url, 400)  # more than the gateway's descriptors
        await asyncio.sleep(1.0)
        refused = 0
        for reader, _writer in sockets[100:]:
            with suppress(ConnectionError, TimeoutError):
                if (await asyncio.wait_for(reader.read(4096), 2)).startswith(b"HTTP/1.1 503"):
                    refused += 1
        assert refused >= 200
        close_all(sockets)

        async def serving() -> bool:
            with suppress(aiohttp.ClientError, TimeoutError):
                return await healthz(url) == 200
            return False

        await wait_until(serving, 15.0, 0.2)
        started = time.monotonic()
        assert await healthz(url) == 200
        assert time.monotonic() - started < 5
    log = log_path.read_text()
    assert "Too many open files" not in log
    assert "lowered from 4096 to 96" in log
    assert len(log) < 20_000, f"log grew to {len(log)} bytes"
