"""The upstream HTTP/1.1 client: keep-alive connections on asyncio protocols, nothing else.

A gateway posts one JSON body per attempt and reads one response: a body to hold whole, or
an SSE stream to pass on. aiohttp's client does far more per request (trace hooks, cookie
jar, redirects, auto headers, a connector, timer contexts, a StreamReader per response),
and on the 2-core bench machine that was ~0.08 ms of the gateway's ~0.17 ms CPU per request;
this client does the same job in a fraction of it (bench/README.md, "The upstream client").

What it does: one pool of idle connections per (scheme, host, port), most recently used
first, closed after `keepalive_s` idle or when the server closes them; TLS through the
default SSL context (certificates and host names verified); one write per request (head and
body together); the response head parsed in Python (bounded: `MAX_HEAD_BYTES`), the body
framed by Content-Length, chunked transfer coding or the connection's close; gzip and
deflate inflated a bounded piece at a time (`INFLATE_STEP`), so a reader that stops at its
limit never holds a bomb whole. A response goes back to the pool only when it was read to
its end; anything else closes its connection.

Everything the upstream sends is untrusted: malformed heads, framing and codings raise
`ProtocolError`; a connection lost mid-response raises `ConnectionLost`; no byte for
`read_timeout_s` raises TimeoutError (`transport.py` turns each into an UpstreamError).
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import quote, unquote, urlsplit

from multidict import CIMultiDict

# The status line and headers of one response: far above anything an LLM API sends.
MAX_HEAD_BYTES = 64 * 1024
# Bytes inflated per step: a compressed body is never inflated further than the reader asks.
INFLATE_STEP = 64 * 1024
# Raw bytes buffered before the socket stops being read (the reader is slower than the peer).
HIGH_WATER = 256 * 1024
KEEPALIVE_S = 60.0


class ProtocolError(Exception):
    """The upstream's bytes are not a valid HTTP/1.1 response."""


class ConnectionLost(Exception):
    """The connection closed (or broke) before the response was complete."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float
    read_s: float  # the longest wait for any byte of the response


class RequestHeaders:
    """A request's headers, encoded once (the adapters build one set per provider)."""

    __slots__ = ("encoded", "items")

    def __init__(self, items: Mapping[str, str]) -> None:
        merged: dict[str, tuple[str, str]] = {}
        for name, value in items.items():
            if not _valid_header(name, value):
                raise ValueError(f"invalid request header {name!r}")
            merged[name.lower()] = (name, value)
        self.items: tuple[tuple[str, str], ...] = tuple(merged.values())
        self.encoded = "".join(f"{n}: {v}\r\n" for n, v in self.items).encode("latin-1")

    def with_extra(self, extra: Mapping[str, str]) -> RequestHeaders:
        """These headers with `extra` added, replacing any of the same name."""
        replaced = {name.lower() for name in extra}
        return RequestHeaders(
            {**{n: v for n, v in self.items if n.lower() not in replaced}, **extra}
        )

    def get(self, name: str) -> str | None:
        lowered = name.lower()
        return next((v for n, v in self.items if n.lower() == lowered), None)


def _valid_header(name: str, value: str) -> bool:
    if not name or any(c in name for c in ":\r\n\0 \t"):
        return False
    if any(c in value for c in "\r\n\0"):
        return False
    try:
        name.encode("latin-1")
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class _Target:
    key: tuple[str, str, int]  # scheme, host, port: one pool each
    host_header: bytes
    path: bytes
    # Credentials in the URL (https://user:password@host/...) go as Basic auth, as aiohttp
    # sent them: the whole header line, or b"".
    basic_auth: bytes = b""


class UpstreamClient:
    """Every adapter's connection pools; one per gateway process (`transport.new_session`)."""

    def __init__(self, *, keepalive_s: float = KEEPALIVE_S) -> None:
        self._keepalive_s = keepalive_s
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._targets: dict[str, _Target] = {}
        self._ssl: ssl.SSLContext | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.closed = False

    async def post(
        self, url: str, body: bytes, headers: RequestHeaders, timeouts: Timeouts
    ) -> Response:
        """Send the request and read the response head; the body is the caller's to read."""
        if self.closed:
            raise ConnectionLost("the upstream client is closed")
        target = self._targets.get(url) or self._target(url)
        if target.basic_auth and headers.get("Authorization") is not None:
            raise ValueError("credentials in the URL and an Authorization header both")
        head = b"".join(
            (
                b"POST ",
                target.path,
                b" HTTP/1.1\r\nHost: ",
                target.host_header,
                b"\r\n",
                target.basic_auth,
                headers.encoded,
                b"Content-Length: ",
                str(len(body)).encode(),
                b"\r\n\r\n",
            )
        )
        connection = self._idle_connection(target.key) or await self._connect(target, timeouts)
        return await connection.exchange(head, body, timeouts)

    def _target(self, url: str) -> _Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        default = (parts.scheme == "https" and port == 443) or (
            parts.scheme == "http" and port == 80
        )
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if default else f"{shown}:{port}"
        # Percent-encoded as yarl did for aiohttp (what is encoded already stays as it is):
        # a deployment name with a space still makes a valid request line.
        path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=~")
        if parts.query:
            path += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=~?")
        basic_auth = b""
        if parts.username is not None or parts.password is not None:
            user = unquote(parts.username or "")
            credentials = f"{user}:{unquote(parts.password or '')}".encode("latin-1")
            basic_auth = b"Authorization: Basic " + base64.b64encode(credentials) + b"\r\n"
        target = _Target(
            (parts.scheme, host, port), host_header.encode("idna"), path.encode(), basic_auth
        )
        if len(self._targets) < 10_000:  # (URLs are per provider and model: few)
            self._targets[url] = target
        return target

    def _idle_connection(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        oldest_allowed = time.monotonic() - self._keepalive_s
        while idle:
            connection = idle.pop()
            if connection.reusable and connection.idle_since >= oldest_allowed:
                return connection
            connection.close()
        return None

    async def _connect(self, target: _Target, timeouts: Timeouts) -> _Connection:
        scheme, host, port = target.key
        context = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeouts.connect_s):
            _, connection = await loop.create_connection(
                lambda: _Connection(self, target.key),
                host,
                port,
                ssl=context,
                server_hostname=host if context else None,
            )
        return connection

    def _park(self, connection: _Connection) -> None:
        """A connection whose response was read to its end: idle, ready for the next."""
        connection.idle_since = time.monotonic()
        self._idle.setdefault(connection.key, []).append(connection)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(
                self._keepalive_s / 2, self._sweep
            )

    def _forget(self, connection: _Connection) -> None:
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def _sweep(self) -> None:
        """Close connections idle past `keepalive_s` (the server may keep them forever)."""
        self._sweeper = None
        oldest_allowed = time.monotonic() - self._keepalive_s
        pending = False
        for idle in self._idle.values():
            for connection in [c for c in idle if c.idle_since < oldest_allowed]:
                idle.remove(connection)
                connection.close()
            pending = pending or bool(idle)
        if pending and not self.closed:
            self._sweeper = asyncio.get_running_loop().call_later(
                self._keepalive_s / 2, self._sweep
            )

    async def close(self) -> None:
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()


class _Connection(asyncio.Protocol):
    """One keep-alive connection: idle in its pool, or carrying one response."""

    def __init__(self, client: UpstreamClient, key: tuple[str, str, int]) -> None:
        self.client = client
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.idle_since = 0.0
        self.reusable = True
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, but behave as one.)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.response is None:
            # Bytes nobody asked for on an idle connection: it cannot be trusted again.
            self.close()
            return
        self.response.feed(data)

    def eof_received(self) -> bool | None:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self.client._forget(self)
        if self.response is not None:
            self.response.connection_lost(exc)

    def pause_reading(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    async def exchange(self, head: bytes, body: bytes, timeouts: Timeouts) -> Response:
        if self.transport is None or not self.reusable:
            raise ConnectionLost("the upstream connection is closed")
        response = self.response = Response(self, timeouts.read_s)
        if len(body) < 65536:
            self.transport.write(head + body)  # one segment: a small copy beats two writes
        else:
            self.transport.writelines((head, body))
        try:
            await response.read_head()
        except BaseException:
            response.close()
            raise
        return response

    def finished(self, response: Response) -> None:
        """`response` was read to its end."""
        self.response = None
        if self.reusable and not self.client.closed and self.transport is not None:
            self.resume_reading()
            self.client._park(self)
        else:
            self.close()

    def close(self) -> None:
        self.reusable = False
        self.response = None
        if self.transport is not None:
            self.transport.close()


# Body framing.
_LENGTH, _CHUNKED, _UNTIL_CLOSE, _NONE = 0, 1, 2, 3


class Response:
    """One response: its status and headers, and a body read a piece at a time."""

    __slots__ = (
        "_buffer",
        "_chunk_left",
        "_closed",
        "_connection",
        "_decoder",
        "_done",
        "_framing",
        "_left",
        "_lost",
        "_pending",
        "_read_timeout",
        "_waiter",
        "content_length",
        "content_type",
        "headers",
        "status",
    )

    def __init__(self, connection: _Connection, read_timeout: float) -> None:
        self._connection = connection
        self._read_timeout = read_timeout
        self._buffer = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._lost: BaseException | None = None
        self._closed = False
        self._done = False  # the body was read to its end
        self._framing = _NONE
        self._left = 0  # Content-Length bytes still to come
        self._chunk_left = -1  # chunked: bytes left in the current chunk (-1: at a size line)
        self._decoder: Any = None  # zlib decompressobj for gzip / deflate
        self._pending = b""  # compressed bytes not inflated yet (INFLATE_STEP at a time)
        self.status = 0
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.content_type = ""
        self.content_length: int | None = None

    # ---- fed by the connection ---------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > HIGH_WATER:
            self._connection.pause_reading()
        self._wake()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._lost = exc or ConnectionLost("the upstream closed the connection")
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _more(self) -> bool:
        """Wait for bytes; False when the connection has closed (nothing more will come)."""
        if self._lost is not None:
            return False
        self._connection.resume_reading()
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(self._read_timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        return True

    # ---- the head --------------------------------------------------------------------

    async def read_head(self) -> None:
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD_BYTES:
                    raise ProtocolError("the upstream's response head is too large")
                if not await self._more():
                    if self._buffer:
                        raise ProtocolError("the upstream closed the connection mid-head")
                    raise ConnectionLost("the upstream closed the connection without a response")
                continue
            if end > MAX_HEAD_BYTES:
                raise ProtocolError("the upstream's response head is too large")
            head = bytes(self._buffer[:end])
            del self._buffer[: end + 4]
            status = self._parse_head(head)
            if 100 <= status < 200:
                continue  # an interim response (100 Continue, 103 Early Hints): the next
            return

    def _parse_head(self, head: bytes) -> int:
        lines = head.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code = rest[:3]
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or not code.isdigit() or len(rest) < 3:
            raise ProtocolError("the upstream's status line is not HTTP/1.x")
        status = int(code)
        if status < 100 or (len(rest) > 3 and rest[3:4] != b" "):
            raise ProtocolError("the upstream's status line is not HTTP/1.x")
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip() or name[:1] in (b" ", b"\t"):
                raise ProtocolError("the upstream sent a malformed header line")
            headers.add(name.decode("latin-1"), value.strip(b" \t").decode("latin-1"))
        self.status = status
        self.headers = headers
        if status < 200:
            return status
        keep_alive = version == b"HTTP/1.1"
        connection = headers.get("Connection", "").lower()
        if "close" in connection:
            keep_alive = False
        elif "keep-alive" in connection:
            keep_alive = True
        if not keep_alive:
            self._connection.reusable = False
        content_type = headers.get("Content-Type", "")
        self.content_type = content_type.partition(";")[0].strip().lower()
        transfer = headers.get("Transfer-Encoding")
        lengths = headers.getall("Content-Length", [])
        if status in (204, 304):
            self._framing = _NONE
        elif transfer is not None:
            codings = [c.strip().lower() for c in transfer.split(",")]
            if codings[-1] != "chunked" or lengths:
                # Ambiguous framing (both headers, or a coding we cannot frame by): refused,
                # the classic request-smuggling shape.
                raise ProtocolError("the upstream's response framing is ambiguous")
            self._framing = _CHUNKED
        elif lengths:
            if len(set(lengths)) != 1 or not lengths[0].strip().isdigit():
                raise ProtocolError("the upstream sent an invalid Content-Length")
            self._left = int(lengths[0])
            self.content_length = self._left
            self._framing = _LENGTH if self._left else _NONE
        else:
            self._framing = _UNTIL_CLOSE
            self._connection.reusable = False
        coding = headers.get("Content-Encoding", "identity").strip().lower()
        if coding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            self._decoder = _Deflate()
        elif coding not in ("", "identity"):
            raise ProtocolError(f"the upstream's content coding {coding!r} is not supported")
        if self._framing == _NONE:
            self._finish()
        return status

    # ---- the body --------------------------------------------------------------------

    def is_eof(self) -> bool:
        """The body was read to its end (`read_chunk` answered b"")."""
        return self._done and not self._pending and self._decoder is None

    async def read_chunk(self) -> bytes:
        """The next piece of the (decoded) body; b"" at its end."""
        while True:
            if self._pending:
                return self._inflate(b"")
            if self._done:
                return self._flush_decoder()  # b"" once the decoder is drained, or none
            raw = await self._next_raw()
            if raw is None:
                self._done = True
                if self._decoder is not None and not self._decoder_finished():
                    raise ConnectionLost("the upstream's compressed body is cut short")
                continue
            if self._decoder is None:
                if raw:
                    return raw
                continue
            out = self._inflate(raw)
            if out:
                return out

    async def _next_raw(self) -> bytes | None:
        """The next framed body bytes (possibly b""), or None when the body has ended."""
        if self._closed:
            raise ConnectionLost("the response was closed")
        framing = self._framing
        if framing == _NONE:
            return None
        if framing == _LENGTH:
            if self._left == 0:
                self._finish()
                return None
            if not self._buffer and not await self._more() and not self._buffer:
                raise ConnectionLost("the upstream closed the connection mid-body")
            take = bytes(self._buffer[: self._left])
            del self._buffer[: len(take)]
            self._left -= len(take)
            if self._left == 0:
                self._finish()
            return take
        if framing == _UNTIL_CLOSE:
            if not self._buffer and not await self._more() and not self._buffer:
                self._finish()
                return None
            take = bytes(self._buffer)
            self._buffer.clear()
            return take
        return await self._next_chunk()

    async def _next_chunk(self) -> bytes | None:
        """Every chunk's data already here (one await only when there is none yet): as
        much as a read of the socket brought, like the other framings."""
        out: list[bytes] = []
        while True:
            if self._chunk_left > 0:
                if not self._buffer:
                    if out:
                        return b"".join(out)
                    if not await self._more() and not self._buffer:
                        raise ConnectionLost("the upstream closed the connection mid-chunk")
                    continue
                take = bytes(self._buffer[: self._chunk_left])
                del self._buffer[: len(take)]
                self._chunk_left -= len(take)
                if self._chunk_left == 0:
                    self._chunk_left = -2  # the CRLF after the chunk's data
                out.append(take)
                continue
            line_end = self._buffer.find(b"\r\n")
            if line_end < 0:
                if len(self._buffer) > 4096:
                    raise ProtocolError("the upstream sent a malformed chunk")
                if out:
                    return b"".join(out)
                if not await self._more() and b"\r\n" not in self._buffer:
                    raise ConnectionLost("the upstream closed the connection mid-chunk")
                continue
            line = bytes(self._buffer[:line_end])
            del self._buffer[: line_end + 2]
            if self._chunk_left == -2:  # the CRLF that ends a chunk's data
                if line:
                    raise ProtocolError("the upstream sent a malformed chunk")
                self._chunk_left = -1
                continue
            if self._chunk_left == -3:  # trailers after the last chunk, up to an empty line
                if not line:
                    self._finish()
                    return b"".join(out) if out else None
                continue
            size = line.partition(b";")[0].strip()
            try:
                if not size or len(size) > 16:
                    raise ValueError
                self._chunk_left = int(size, 16)
            except ValueError:
                raise ProtocolError("the upstream sent a malformed chunk size") from None
            if self._chunk_left < 0:
                raise ProtocolError("the upstream sent a malformed chunk size")
            if self._chunk_left == 0:
                self._chunk_left = -3

    def _inflate(self, raw: bytes) -> bytes:
        data = self._pending + raw if self._pending else raw
        try:
            out: bytes = self._decoder.decompress(data, INFLATE_STEP)
        except zlib.error:
            raise ProtocolError("the upstream's compressed body does not inflate") from None
        self._pending = self._decoder.unconsumed_tail
        return out

    def _decoder_finished(self) -> bool:
        return bool(getattr(self._decoder, "eof", True))

    def _flush_decoder(self) -> bytes:
        if self._decoder is None:
            return b""
        decoder, self._decoder = self._decoder, None
        try:
            rest: bytes = decoder.flush()
        except zlib.error:
            raise ProtocolError("the upstream's compressed body does not inflate") from None
        return rest

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        if self._buffer:
            self._connection.reusable = False  # bytes past the response: never reused
        if self._pending or self._decoder is not None:
            return  # the connection's part is over; the reader still drains the decoder
        self._release_connection()

    def _release_connection(self) -> None:
        connection = self._connection
        if connection.response is self and not self._closed:
            self._closed = True
            connection.finished(self)

    def release(self) -> None:
        """Done with the response: its connection goes back to the pool if it was read to
        its end, else it is closed."""
        if self._closed:
            return
        if self._done:
            self._release_connection()
        else:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake()
        connection = self._connection
        if connection.response is self:
            connection.close()


class _Deflate:
    """`deflate` as servers send it: zlib-wrapped (RFC 9110) or, often, raw."""

    def __init__(self) -> None:
        self._inner: Any = None
        self._first = b""

    @property
    def unconsumed_tail(self) -> bytes:
        return b"" if self._inner is None else bytes(self._inner.unconsumed_tail)

    @property
    def eof(self) -> bool:
        return self._inner is not None and bool(self._inner.eof)

    def decompress(self, data: bytes, max_length: int) -> bytes:
        if self._inner is None:
            data = self._first + data
            if len(data) < 2:
                self._first = data
                return b""
            zlib_wrapped = (data[0] & 0x0F) == 8 and (data[0] << 8 | data[1]) % 31 == 0
            self._inner = zlib.decompressobj(zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS)
        out: bytes = self._inner.decompress(data, max_length)
        return out

    def flush(self) -> bytes:
        if self._inner is None:
            return b""
        out: bytes = self._inner.flush()
        return out


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
