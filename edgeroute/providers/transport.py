"""The HTTP side every adapter shares: one POST, bounded bodies, streams that really are SSE.

Everything an upstream sends is untrusted: a body is read in chunks after decompression and
cut at `max_response_bytes` (aiohttp inflates a compressed body a bounded piece at a time, so
a gzip bomb is stopped while inflating, never held whole), and a response to a streaming
request must say `text/event-stream` before a byte of it is forwarded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import aiohttp
from multidict import CIMultiDict

from edgeroute.providers.base import (
    ErrorClass,
    UpstreamError,
    classify_status,
    parse_limit_reset,
    parse_retry_after,
)

# An upstream's error body is relayed to the client (400s) or only classified: it never
# needs to be large, so it is cut short rather than read to max_response_bytes.
MAX_ERROR_BODY_BYTES = 64 * 1024


class _CompleteHeaders(aiohttp.ClientRequest):
    """A request whose headers the adapter built whole, once per provider (`request_headers`).

    aiohttp would otherwise merge its defaults into every request: with the session's
    skip list (no User-Agent, no Accept-Encoding) that copies the headers and builds a
    sorted multidict per attempt, about a third of constructing the request.
    """

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        # Nothing to add: `request_headers` already says Accept, and User-Agent and
        # Accept-Encoding stay off on purpose (upstream bodies pass through uncompressed).
        pass


def new_session() -> aiohttp.ClientSession:
    """The one upstream session every adapter posts through."""
    connector = aiohttp.TCPConnector(
        limit=0, limit_per_host=0, keepalive_timeout=60, ttl_dns_cache=300
    )
    return aiohttp.ClientSession(connector=connector, request_class=_CompleteHeaders)


def request_headers(
    base: Mapping[str, str], configured: Mapping[str, str]
) -> tuple[CIMultiDict[str], CIMultiDict[str]]:
    """A provider's complete request headers, built at startup: (plain, streaming).

    `base` is the adapter's (content type, auth), `configured` the provider's `headers`,
    which win. No Accept-Encoding: an upstream answers plain and its body passes through
    as is (one that compresses anyway is still decoded before the client sees it).
    """
    plain: CIMultiDict[str] = CIMultiDict({"Accept": "*/*", **base})
    plain.update(configured)
    stream = plain.copy()
    stream["Accept"] = "text/event-stream"
    return plain, stream


def too_large(what: str, limit: int) -> UpstreamError:
    return UpstreamError(ErrorClass.TOO_LARGE, f"upstream {what} exceeds {limit} bytes")


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: CIMultiDict[str],
    client_timeout: aiohttp.ClientTimeout,
) -> aiohttp.ClientResponse:
    """POST and classify transport failures; an HTTP error status is raised as UpstreamError."""
    try:
        response = await session.post(url, data=body, headers=headers, timeout=client_timeout)
    except TimeoutError:
        raise UpstreamError(ErrorClass.TIMEOUT, "upstream timed out before answering") from None
    except aiohttp.ClientError as exc:
        raise UpstreamError(
            ErrorClass.CONNECT, f"cannot reach upstream: {type(exc).__name__}"
        ) from None
    except ValueError as exc:
        # aiohttp refuses some requests before sending them (e.g. an URL it cannot encode):
        # that is this provider's configuration failing, not the client's request.
        raise UpstreamError(
            ErrorClass.CONNECT, f"cannot send to upstream: {type(exc).__name__}"
        ) from None
    if response.status >= 400:
        try:
            data = await read_body(response, MAX_ERROR_BODY_BYTES)
        except UpstreamError:
            data = b""  # the status says enough; a broken or huge error body is not relayed
        raise UpstreamError(
            classify_status(response.status),
            f"upstream answered {response.status}",
            status=response.status,
            body=data,
            content_type=response.headers.get("Content-Type", "application/json"),
            retry_after_s=parse_retry_after(
                response.headers.get("Retry-After"), response.headers.get("retry-after-ms")
            ),
            limit_reset_s=parse_limit_reset(response.headers),
        )
    return response


async def read_body(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole (decompressed) body, or TOO_LARGE as soon as it passes `limit` bytes."""
    try:
        declared = response.content_length
        if declared is not None and declared > limit and not _encoded(response):
            raise too_large("body", limit)  # said so up front: nothing to read
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise too_large("body", limit)
            chunks.append(chunk)
        return b"".join(chunks)
    except TimeoutError:
        raise UpstreamError(ErrorClass.TIMEOUT, "upstream stalled mid-response") from None
    except aiohttp.ClientError as exc:
        # ClientPayloadError covers a body that does not inflate (bad gzip) or is cut short.
        raise UpstreamError(
            ErrorClass.STREAM, f"upstream response broke: {type(exc).__name__}"
        ) from None
    finally:
        # close(), not release(): a body left unread must not go back to the pool.
        if response.content.is_eof():
            response.release()
        else:
            response.close()


def _encoded(response: aiohttp.ClientResponse) -> bool:
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    return encoding not in ("", "identity")


def expect_event_stream(response: aiohttp.ClientResponse) -> None:
    """A streaming request must get SSE back; anything else fails the attempt before any
    byte reached the client, so the router can still fail over."""
    if response.content_type == "text/event-stream":
        return
    content_type = response.content_type or "no content type"
    response.close()
    raise UpstreamError(
        ErrorClass.BAD_RESPONSE,
        f"upstream answered a streaming request with {content_type}, not text/event-stream",
    )
