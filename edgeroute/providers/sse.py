"""Reading an upstream's Server-Sent Events in linear time, with bounds on time and size."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

from edgeroute.config import ProviderConfig
from edgeroute.providers.base import ErrorClass, UpstreamError, Usage, parse_limit_reset
from edgeroute.providers.http1 import ConnectionLost, ProtocolError, Response


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """How long a stream may go without a complete event, last in all, and one event's size."""

    idle_timeout_s: float
    total_timeout_s: float | None
    max_event_bytes: int

    @classmethod
    def of(cls, config: ProviderConfig) -> StreamLimits:
        return cls(config.stream_idle_s, config.stream_timeout_s, config.max_event_bytes)


class EventReader:
    """Yields blocks of complete SSE events (each ending in a blank line) as they arrive.

    Blocks keep the upstream's bytes; only CRLF and CR line ends are normalised to LF.
    Each byte is scanned once: the buffer grows in place and the search for the blank line
    that ends an event resumes where the last one stopped, so an event sent in many small
    pieces costs its length, not its length squared. Time counts between complete events,
    not bytes: an upstream trickling a byte at a time cannot hold the stream open.
    """

    def __init__(self, response: Response, limits: StreamLimits) -> None:
        self._response = response
        self._limits = limits
        self._buffer = bytearray()
        self._scanned = 0  # bytes of _buffer already searched for a blank line
        self._carry_cr = False  # a chunk ended in CR: it may be the first half of CRLF
        self._eof = False
        now = asyncio.get_running_loop().time()
        self._last_event = now
        total = limits.total_timeout_s
        self._deadline = now + total if total is not None else math.inf

    async def read_block(self) -> bytes | None:
        """The next block of complete events, or None at a clean end of the body."""
        idle_deadline = self._last_event + self._limits.idle_timeout_s
        when = min(idle_deadline, self._deadline)
        try:
            async with asyncio.timeout_at(when):
                block = await self._read_block()
        except TimeoutError:
            if when == self._deadline:
                message = f"upstream stream ran past {self._limits.total_timeout_s}s"
            else:
                message = f"upstream sent no event for {self._limits.idle_timeout_s}s"
            raise UpstreamError(ErrorClass.TIMEOUT, message) from None
        self._last_event = asyncio.get_running_loop().time()
        return block

    async def _read_block(self) -> bytes | None:
        buffer = self._buffer
        while True:
            # A blank line may straddle the old and new bytes: step back one.
            end = buffer.rfind(b"\n\n", max(0, self._scanned - 1))
            if end >= 0:
                block = bytes(buffer[: end + 2])
                del buffer[: end + 2]  # O(1) from the front of a bytearray
                self._scanned = len(buffer)
                if len(block) > self._limits.max_event_bytes:
                    self._check_events(block)
                return block
            if len(buffer) > self._limits.max_event_bytes:
                raise self._too_large()
            self._scanned = len(buffer)
            if self._eof:
                if buffer.strip():
                    block = bytes(buffer) + b"\n\n"
                    buffer.clear()
                    return block
                return None
            chunk = await self._read_chunk()
            if not chunk:
                self._eof = True
                if self._carry_cr:
                    self._carry_cr = False
                    buffer += b"\n"
                continue
            if self._carry_cr:
                chunk = b"\r" + chunk
                self._carry_cr = False
            if b"\r" in chunk:
                if chunk.endswith(b"\r"):
                    chunk = chunk[:-1]
                    self._carry_cr = True
                chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            buffer += chunk

    async def _read_chunk(self) -> bytes:
        try:
            return await self._response.read_chunk()
        except TimeoutError:
            raise UpstreamError(ErrorClass.TIMEOUT, "upstream stream stalled") from None
        except (OSError, ConnectionLost, ProtocolError) as exc:
            raise UpstreamError(
                ErrorClass.STREAM, f"upstream stream broke: {type(exc).__name__}"
            ) from None

    def _check_events(self, block: bytes) -> None:
        """A big block may be many small events; only one event over the bound is refused."""
        limit = self._limits.max_event_bytes
        if any(len(event) > limit for event in block.split(b"\n\n")):
            raise self._too_large()

    def _too_large(self) -> UpstreamError:
        return UpstreamError(
            ErrorClass.TOO_LARGE,
            f"upstream sent an SSE event over {self._limits.max_event_bytes} bytes",
        )

    def close(self) -> None:
        self._response.close()


def split_events(block: bytes) -> list[bytes]:
    return [event for event in block.split(b"\n\n") if event.strip()]


def event_data(event: bytes) -> bytes:
    """The joined `data:` lines of one event."""
    lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines)


def event_name(event: bytes) -> str:
    for line in event.split(b"\n"):
        if line.startswith(b"event:"):
            return line[6:].strip().decode(errors="replace")
    return "message"


class PrimedStream:
    """An upstream SSE stream translated to OpenAI's, read one block ahead.

    `prime()` reads until the first block of events, so a stream that fails before any
    byte reached the client can still fail over; subclasses say what a block becomes
    (`_next`). Iterating yields the primed block first, then the rest.
    """

    status = 200

    def __init__(self, response: Response, limits: StreamLimits) -> None:
        self.usage = Usage()
        self.limit_reset_s = parse_limit_reset(response.headers)
        self._reader = EventReader(response, limits)
        self._first: bytes | None = None

    async def _next(self) -> bytes | None:
        raise NotImplementedError

    async def prime(self) -> None:
        self._first = await self._next()
        if self._first is None:
            raise UpstreamError(ErrorClass.STREAM, "upstream ended the stream before any event")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        while (block := await self._next()) is not None:
            yield block

    async def aclose(self) -> None:
        self._reader.close()
