"""The upstream HTTP/1.1 client (edgeroute/providers/http1.py) against scripted servers.

Each server is a real asyncio server on loopback that reads the request and answers with the
exact bytes a test scripts, so framings, codings and misbehaviour are deliberate: what the
client accepts, what it refuses (and as which error), when it reuses a connection and when
it must not.
"""

from __future__ import annotations

import asyncio
import gzip
import shutil
import ssl
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from edgeroute.providers.base import ErrorClass, UpstreamError
from edgeroute.providers.http1 import (
    INFLATE_STEP,
    MAX_HEAD_BYTES,
    ConnectionLost,
    RequestHeaders,
    Timeouts,
    UpstreamClient,
)
from edgeroute.providers.transport import post, read_body, request_headers
from tests.support.ci import missing
from tests.test_redis_topologies import _openssl

TIMEOUTS = Timeouts(connect_s=2.0, read_s=2.0)
HEADERS = RequestHeaders({"Content-Type": "application/json"})
BODY = b'{"model":"m"}'

Reply = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[None]]


class Upstream:
    """What the scripted server saw: connections opened and requests (head, body) read."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.closed = 0


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)


@asynccontextmanager
async def upstream(
    *replies: bytes | Reply, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[str, Upstream]]:
    """A server answering its n-th request with replies[n] (bytes, or a coroutine that
    writes whatever it likes); after the last one it keeps the connection open, silent."""
    seen = Upstream()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.connections += 1
        try:
            while (request := await _read_request(reader)) is not None:
                seen.requests.append(request)
                index = len(seen.requests) - 1
                if index >= len(replies):
                    await asyncio.sleep(3600)
                reply = replies[index]
                if isinstance(reply, bytes):
                    writer.write(reply)
                    await writer.drain()
                else:
                    await reply(reader, writer, request[1])
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # (cancelled: the test is over and the server closing)
        finally:
            seen.closed += 1
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ssl_context)
    port = server.sockets[0].getsockname()[1]
    scheme = "https" if ssl_context else "http"
    try:
        yield f"{scheme}://127.0.0.1:{port}/v1/chat/completions", seen
    finally:
        server.close()


def ok(body: bytes, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def chunked(*pieces: bytes, trailer: bytes = b"") -> bytes:
    body = b"".join(f"{len(p):x};ext=1\r\n".encode() + p + b"\r\n" for p in pieces)
    return (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + body
        + b"0\r\n"
        + trailer
        + b"\r\n"
    )


async def fetch(client: UpstreamClient, url: str, limit: int = 1 << 20) -> bytes:
    response = await client.post(url, BODY, HEADERS, TIMEOUTS)
    return await read_body(response, limit)


# ---- framing and reuse -------------------------------------------------------------------


async def test_content_length_bodies_reuse_one_connection() -> None:
    async with upstream(ok(b"first"), ok(b"second")) as (url, seen):
        client = UpstreamClient()
        assert await fetch(client, url) == b"first"
        assert await fetch(client, url) == b"second"
        assert seen.connections == 1
        head, body = seen.requests[0]
        assert body == BODY
        assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        assert f"Host: 127.0.0.1:{url.split(':')[2].split('/')[0]}".encode() in head
        assert b"Content-Length: 13\r\n" in head
        await client.close()


async def test_chunked_bodies_with_extensions_and_trailers_are_joined_and_reused() -> None:
    reply = chunked(b"data: a\n\n", b"data: b\n\n", trailer=b"X-Trailer: 1\r\n")
    async with upstream(reply, ok(b"next")) as (url, seen):
        client = UpstreamClient()
        assert await fetch(client, url) == b"data: a\n\ndata: b\n\n"
        assert await fetch(client, url) == b"next"
        assert seen.connections == 1
        await client.close()


async def test_a_body_until_close_or_connection_close_is_never_reused() -> None:
    until_close: Reply = _write_then_close(b"HTTP/1.1 200 OK\r\n\r\nall of it")
    async with upstream(until_close) as (url, seen):
        client = UpstreamClient()
        assert await fetch(client, url) == b"all of it"
    async with upstream(ok(b"one", "Connection: close"), ok(b"two")) as (url, seen):
        assert await fetch(client, url) == b"one"
        assert await fetch(client, url) == b"two"
        assert seen.connections == 2
        await client.close()


async def test_interim_responses_are_skipped() -> None:
    async with upstream(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"final")) as (url, _):
        client = UpstreamClient()
        response = await client.post(url, BODY, HEADERS, TIMEOUTS)
        assert response.status == 200
        assert await read_body(response, 1024) == b"final"
        await client.close()


async def test_status_headers_and_content_type_are_read() -> None:
    reply = (
        b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json; charset=utf-8\r\n"
        b"Retry-After: 7\r\nX-Dup: a\r\nX-Dup: b\r\nContent-Length: 2\r\n\r\n{}"
    )
    async with upstream(reply) as (url, _):
        client = UpstreamClient()
        with pytest.raises(UpstreamError) as failure:
            await post(client, url, BODY, HEADERS, TIMEOUTS)
        assert failure.value.status == 429
        assert failure.value.retry_after_s == 7.0
        assert failure.value.body == b"{}"
        assert failure.value.content_type == "application/json; charset=utf-8"
        await client.close()


# ---- codings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "coding,compress",
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),  # zlib-wrapped, as RFC 9110 says
        ("deflate", lambda data: zlib.compress(data)[2:-4]),  # raw, as many servers send
    ],
    ids=["gzip", "deflate-zlib", "deflate-raw"],
)
async def test_compressed_bodies_are_inflated(
    coding: str, compress: Callable[[bytes], bytes]
) -> None:
    plain = b"squeezed " * 5000
    async with upstream(ok(compress(plain), f"Content-Encoding: {coding}"), ok(b"next")) as (
        url,
        seen,
    ):
        client = UpstreamClient()
        assert await fetch(client, url) == plain
        assert await fetch(client, url) == b"next"
        assert seen.connections == 1  # read to its end: reused
        await client.close()


async def test_a_gzip_bomb_is_cut_while_inflating() -> None:
    bomb = gzip.compress(b"\0" * (64 << 20))  # 64 MiB of zeros in ~64 KiB
    async with upstream(*[ok(bomb, "Content-Encoding: gzip")] * 2) as (url, _):
        client = UpstreamClient()
        response = await client.post(url, BODY, HEADERS, TIMEOUTS)
        largest = 0
        total = 0
        while chunk := await response.read_chunk():
            largest = max(largest, len(chunk))
            total += len(chunk)
            if total > 1 << 20:
                break
        response.close()
        assert largest <= INFLATE_STEP  # never inflated further than asked
        with pytest.raises(UpstreamError) as failure:
            await fetch(client, url, limit=1 << 20)
        await client.close()
    assert failure.value.error_class == ErrorClass.TOO_LARGE


async def test_a_body_that_does_not_inflate_is_a_broken_response() -> None:
    async with upstream(ok(b"not gzip at all", "Content-Encoding: gzip")) as (url, _):
        client = UpstreamClient()
        with pytest.raises(UpstreamError) as failure:
            await fetch(client, url)
        assert failure.value.error_class == ErrorClass.STREAM
        await client.close()


# ---- hostile and broken upstreams --------------------------------------------------------

BROKEN_HEADS = {
    "not-http": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "no-status": b"HTTP/1.1 OK\r\nContent-Length: 0\r\n\r\n",
    "http2-preface": b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    "header-without-colon": b"HTTP/1.1 200 OK\r\nbroken header\r\nContent-Length: 0\r\n\r\n",
    "folded-header": b"HTTP/1.1 200 OK\r\nX-A: 1\r\n  folded\r\nContent-Length: 0\r\n\r\n",
    "length-and-chunked": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    "negative-length": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    "gzip-then-chunked-missing": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    "brotli": b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 1\r\n\r\nx",
    "head-too-large": b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_HEAD_BYTES + 10) + b"\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(BROKEN_HEADS))
async def test_a_malformed_head_fails_the_attempt_as_a_connect_failure(name: str) -> None:
    async with upstream(BROKEN_HEADS[name]) as (url, _):
        client = UpstreamClient()
        with pytest.raises(UpstreamError) as failure:
            await post(client, url, BODY, HEADERS, TIMEOUTS)
        assert failure.value.error_class == ErrorClass.CONNECT
        assert "ProtocolError" in str(failure.value)
        await client.close()


def _write_then_close(data: bytes) -> Reply:
    async def reply(_: asyncio.StreamReader, writer: asyncio.StreamWriter, __: bytes) -> None:
        writer.write(data)
        await writer.drain()
        writer.close()

    return reply


@pytest.mark.parametrize(
    "reply",
    [
        _write_then_close(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this"),
        _write_then_close(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXX0\r\n\r\n",
    ],
    ids=["length-cut-short", "chunk-cut-short", "bad-chunk-size", "chunk-without-crlf"],
)
async def test_a_broken_body_fails_the_attempt_as_a_stream_failure(reply: bytes | Reply) -> None:
    async with upstream(reply) as (url, _):
        client = UpstreamClient()
        with pytest.raises(UpstreamError) as failure:
            await fetch(client, url)
        assert failure.value.error_class == ErrorClass.STREAM
        await client.close()


async def test_no_answer_within_the_read_timeout_is_a_timeout() -> None:
    async with upstream() as (url, _):  # reads the request, never answers
        client = UpstreamClient()
        with pytest.raises(UpstreamError) as failure:
            await post(client, url, BODY, HEADERS, Timeouts(connect_s=2.0, read_s=0.2))
        assert failure.value.error_class == ErrorClass.TIMEOUT
        await client.close()


async def test_a_trickling_body_times_out_between_bytes_not_in_total() -> None:
    async def trickle(_: asyncio.StreamReader, writer: asyncio.StreamWriter, __: bytes) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
        for byte in b"abcdef":
            await asyncio.sleep(0.1)
            writer.write(bytes([byte]))
            await writer.drain()

    async with upstream(trickle) as (url, _):
        client = UpstreamClient()
        response = await client.post(url, BODY, HEADERS, Timeouts(connect_s=2.0, read_s=0.3))
        assert await read_body(response, 100) == b"abcdef"  # 0.6 s in all, 0.1 s per byte
        await client.close()


async def test_a_refused_connection_is_a_connect_failure() -> None:
    async with upstream() as (url, _):
        pass  # closed again: nothing listens there now
    client = UpstreamClient()
    with pytest.raises(UpstreamError) as failure:
        await post(client, url, BODY, HEADERS, TIMEOUTS)
    assert failure.value.error_class == ErrorClass.CONNECT
    await client.close()


async def test_bytes_on_an_idle_connection_retire_it() -> None:
    async def then_garbage(
        _: asyncio.StreamReader, writer: asyncio.StreamWriter, __: bytes
    ) -> None:
        writer.write(ok(b"fine") + b"HTTP/1.1 200 OK\r\n")  # a second, unasked-for response
        await writer.drain()

    async with upstream(then_garbage, ok(b"fresh")) as (url, seen):
        client = UpstreamClient()
        assert await fetch(client, url) == b"fine"
        assert await fetch(client, url) == b"fresh"
        assert seen.connections == 2
        await client.close()


async def test_a_response_abandoned_mid_body_closes_its_connection() -> None:
    async def slow(_: asyncio.StreamReader, writer: asyncio.StreamWriter, __: bytes) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()

    async with upstream(slow, ok(b"next")) as (url, seen):
        client = UpstreamClient()
        response = await client.post(url, BODY, HEADERS, TIMEOUTS)
        assert await response.read_chunk() == b"abc"
        reading = asyncio.ensure_future(response.read_chunk())
        await asyncio.sleep(0.05)
        reading.cancel()
        response.close()
        assert await fetch(client, url) == b"next"
        assert seen.connections == 2
        await client.close()


async def test_idle_connections_are_closed_after_keepalive() -> None:
    async with upstream(ok(b"one")) as (url, seen):
        client = UpstreamClient(keepalive_s=0.2)
        assert await fetch(client, url) == b"one"
        for _ in range(50):
            if seen.closed:
                break
            await asyncio.sleep(0.05)
        assert seen.closed == 1  # the sweep closed it; the server saw it go
        await client.close()


async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    async with upstream(_write_then_close(ok(b"bye")), ok(b"again")) as (url, seen):
        client = UpstreamClient()
        assert await fetch(client, url) == b"bye"
        await asyncio.sleep(0.1)  # the FIN arrives while the connection is idle
        assert await fetch(client, url) == b"again"
        assert seen.connections == 2
        await client.close()


# ---- requests ----------------------------------------------------------------------------


def test_header_values_cannot_inject_lines() -> None:
    for name, value in (("X-A", "v\r\nX-Injected: 1"), ("X-A", "v\n"), ("X A", "v"), ("", "v")):
        with pytest.raises(ValueError):
            RequestHeaders({name: value})
    plain, _ = request_headers({"Authorization": "Bearer k"}, {})
    with pytest.raises(ValueError):
        plain.with_extra({"traceparent": "00-\r\n"})


async def test_a_url_the_request_line_cannot_carry_is_a_send_failure() -> None:
    client = UpstreamClient()
    for url in ("ftp://example.com/x", "http:///nohost", "http://[::1/x"):
        with pytest.raises(UpstreamError) as failure:
            await post(client, url, BODY, HEADERS, TIMEOUTS)
        assert failure.value.error_class == ErrorClass.CONNECT
        assert "cannot send" in str(failure.value)
    await client.close()


async def test_the_path_is_percent_encoded_and_url_credentials_are_basic_auth() -> None:
    async with upstream(ok(b"1")) as (url, seen):
        client = UpstreamClient()
        odd = url.replace("http://", "http://us%40er:p%3Ass@").replace(
            "/chat/completions", "/deployments/my model/chat?api-version=2024 01&x=%41"
        )
        assert await fetch(client, odd) == b"1"
        head = seen.requests[0][0]
        assert head.startswith(
            b"POST /v1/deployments/my%20model/chat?api-version=2024%2001&x=%41 HTTP/1.1\r\n"
        )
        assert b"Authorization: Basic dXNAZXI6cDpzcw==\r\n" in head  # us@er:p:ss
        with pytest.raises(UpstreamError) as failure:  # and an Authorization header too
            await post(client, odd, BODY, HEADERS.with_extra({"Authorization": "x"}), TIMEOUTS)
        assert "cannot send" in str(failure.value)
        await client.close()


async def test_a_large_body_goes_out_whole() -> None:
    async def echo_size(_: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> None:
        writer.write(ok(str(len(body)).encode()))
        await writer.drain()

    async with upstream(echo_size) as (url, seen):
        client = UpstreamClient()
        big = b"x" * (3 << 20)
        response = await client.post(url, big, HEADERS, TIMEOUTS)
        assert await read_body(response, 100) == str(len(big)).encode()
        assert seen.requests[0][1] == big
        await client.close()


# ---- TLS ---------------------------------------------------------------------------------


@pytest.fixture
def tls_files(tmp_path: Path) -> Path:
    if shutil.which("openssl") is None:
        missing("openssl (a throwaway CA)", install="Debian package openssl")
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test CA",
        "-keyout", "ca.key", "-out", "ca.pem", cwd=tmp_path,
    )  # fmt: skip
    (tmp_path / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", "server.key", "-out", "server.csr", cwd=tmp_path,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-extfile", "san.cnf", "-out", "server.pem",
        cwd=tmp_path,
    )  # fmt: skip
    return tmp_path


async def test_https_verifies_the_certificate(
    tls_files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(tls_files / "server.pem", tls_files / "server.key")
    async with upstream(ok(b"secure"), ok(b"again"), ssl_context=server_context) as (url, _):
        untrusting = UpstreamClient()
        with pytest.raises(UpstreamError) as failure:
            await post(untrusting, url, BODY, HEADERS, TIMEOUTS)
        assert failure.value.error_class == ErrorClass.CONNECT
        assert "SSL" in str(failure.value)
        await untrusting.close()
        monkeypatch.setenv("SSL_CERT_FILE", str(tls_files / "ca.pem"))
        trusting = UpstreamClient()
        assert await fetch(trusting, url) == b"secure"
        assert await fetch(trusting, url) == b"again"
        await trusting.close()


async def test_closed_client_refuses_new_requests() -> None:
    client = UpstreamClient()
    await client.close()
    with pytest.raises(ConnectionLost):
        await client.post("http://127.0.0.1:1/x", BODY, HEADERS, TIMEOUTS)


# ---- the gateway's loop ------------------------------------------------------------------


def test_the_same_client_on_uvloop() -> None:
    """The gateway runs on uvloop, whose transports are not asyncio's classes: reuse,
    chunked, gzip and a read timeout there too."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        await test_content_length_bodies_reuse_one_connection()
        await test_chunked_bodies_with_extensions_and_trailers_are_joined_and_reused()
        await test_compressed_bodies_are_inflated("gzip", gzip.compress)
        await test_no_answer_within_the_read_timeout_is_a_timeout()
        await test_a_response_abandoned_mid_body_closes_its_connection()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
