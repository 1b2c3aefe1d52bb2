"""Relay an upstream SSE stream to the client once an attempt has produced its first chunk.

After the first byte there is no failover: a stream that breaks ends with an OpenAI-shaped
error event and counts against its target; a client that leaves stops the upstream too.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Mapping

import msgspec
from aiohttp import web

from edgeroute.providers import UpstreamError, UpstreamStream
from edgeroute.types import TargetSpec

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
_encode = msgspec.json.encode


class StreamEnd(enum.Enum):
    COMPLETE = "success"
    UPSTREAM_FAILED = "stream_error"
    CLIENT_GONE = "client_disconnected"


async def relay(
    http: web.Request,
    stream: UpstreamStream,
    target: TargetSpec,
    headers: Mapping[str, str],
) -> tuple[web.StreamResponse, StreamEnd, str | None]:
    """Send `stream` to the client. Returns the response, how it ended and the error class
    (for a broken upstream). CancelledError (the client left) propagates after cleanup."""
    response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **headers})
    try:
        await response.prepare(http)
        async for block in stream:
            await response.write(block)
    except UpstreamError as exc:
        error = exc.error_class.value
        message = {
            "error": {
                "message": f"upstream {target.provider} failed mid-stream: {exc.message}",
                "type": "upstream_error",
                "param": None,
                "code": error,
            }
        }
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write(b"data: " + _encode(message) + b"\n\n")
            await response.write_eof()
        return response, StreamEnd.UPSTREAM_FAILED, error
    except ConnectionError:
        return response, StreamEnd.CLIENT_GONE, "client_disconnected"
    finally:
        # Also on cancellation (the client went away): stop the upstream.
        await stream.aclose()
    # The caller accounts for the request, then `finish`es it: a client that sees the end
    # of the stream finds the request already in the metrics.
    return response, StreamEnd.COMPLETE, None


async def finish(response: web.StreamResponse) -> None:
    with contextlib.suppress(ConnectionError):
        await response.write_eof()


__all__ = ["SSE_HEADERS", "StreamEnd", "finish", "relay"]
