"""Reading an upstream's Server-Sent Events without copying more than needed."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp

from edgeroute.providers.base import ErrorClass, UpstreamError, Usage


class EventReader:
    """Yields blocks of complete SSE events (each ending in a blank line) as they arrive.

    Blocks keep the upstream's bytes; only CRLF line ends are normalised to LF.
    """

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self._buffer = b""

    async def read_block(self) -> bytes | None:
        """The next block of complete events, or None at a clean end of the body."""
        while True:
            try:
                chunk = await self._response.content.readany()
            except TimeoutError:
                raise UpstreamError(ErrorClass.TIMEOUT, "upstream stream stalled") from None
            except aiohttp.ClientError as exc:
                raise UpstreamError(
                    ErrorClass.STREAM, f"upstream stream broke: {type(exc).__name__}"
                ) from None
            if not chunk:
                if self._buffer.strip():
                    block, self._buffer = self._buffer + b"\n\n", b""
                    return block
                return None
            if b"\r" in chunk:
                chunk = chunk.replace(b"\r\n", b"\n")
            data = self._buffer + chunk if self._buffer else chunk
            end = data.rfind(b"\n\n")
            if end < 0:
                self._buffer = data
                continue
            self._buffer = data[end + 2 :]
            return data[: end + 2]

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
            return line[6:].strip().decode()
    return "message"


class PrimedStream:
    """An upstream SSE stream translated to OpenAI's, read one block ahead.

    `prime()` reads until the first block of events, so a stream that fails before any
    byte reached the client can still fail over; subclasses say what a block becomes
    (`_next`). Iterating yields the primed block first, then the rest.
    """

    status = 200

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.usage = Usage()
        self._reader = EventReader(response)
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
