"""The HTTP side every adapter shares: one POST, bounded bodies, streams that really are SSE.

Everything an upstream sends is untrusted: a body is read in chunks after decompression and
cut at `max_response_bytes` (http1.py inflates a compressed body a bounded piece at a time,
so a gzip bomb is stopped while inflating, never held whole), and a response to a streaming
request must say `text/event-stream` before a byte of it is forwarded.
"""

from __future__ import annotations

from collections.abc import Mapping

from edgeroute.providers.base import (
    ErrorClass,
    UpstreamError,
    classify_status,
    parse_limit_reset,
    parse_retry_after,
)
from edgeroute.providers.http1 import (
    ConnectionLost,
    ProtocolError,
    RequestHeaders,
    Response,
    Timeouts,
    UpstreamClient,
)

# An upstream's error body is relayed to the client (400s) or only classified: it never
# needs to be large, so it is cut short rather than read to max_response_bytes.
MAX_ERROR_BODY_BYTES = 64 * 1024


def new_session() -> UpstreamClient:
    """The one upstream client every adapter posts through (keep-alive pools per host)."""
    return UpstreamClient()


def request_headers(
    base: Mapping[str, str], configured: Mapping[str, str]
) -> tuple[RequestHeaders, RequestHeaders]:
    """A provider's complete request headers, built and encoded at startup: (plain, streaming).

    `base` is the adapter's (content type, auth), `configured` the provider's `headers`,
    which win. No Accept-Encoding and no User-Agent: an upstream answers plain and its body
    passes through as is (one that compresses anyway is still decoded before the client
    sees it). Host and Content-Length are added per request.
    """
    plain = RequestHeaders({"Accept": "*/*", **base}).with_extra(configured)
    stream = plain.with_extra({"Accept": "text/event-stream"})
    return plain, stream


def too_large(what: str, limit: int) -> UpstreamError:
    return UpstreamError(ErrorClass.TOO_LARGE, f"upstream {what} exceeds {limit} bytes")


async def post(
    session: UpstreamClient,
    url: str,
    body: bytes,
    headers: RequestHeaders,
    limits: Timeouts,
) -> Response:
    """POST and classify transport failures; an HTTP error status is raised as UpstreamError."""
    try:
        response = await session.post(url, body, headers, limits)
    except TimeoutError:
        raise UpstreamError(ErrorClass.TIMEOUT, "upstream timed out before answering") from None
    except (OSError, ConnectionLost, ProtocolError) as exc:
        # (ssl.SSLError is an OSError: a certificate that does not verify lands here too.)
        raise UpstreamError(
            ErrorClass.CONNECT, f"cannot reach upstream: {type(exc).__name__}"
        ) from None
    except (ValueError, UnicodeError) as exc:
        # A request that cannot be sent as it is (an URL or a header value it cannot
        # carry): that is this provider's configuration failing, not the client's request.
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


async def read_body(response: Response, limit: int) -> bytes:
    """The whole (decompressed) body, or TOO_LARGE as soon as it passes `limit` bytes."""
    try:
        declared = response.content_length
        if declared is not None and declared > limit and not _encoded(response):
            raise too_large("body", limit)  # said so up front: nothing to read
        chunks: list[bytes] = []
        size = 0
        while chunk := await response.read_chunk():
            size += len(chunk)
            if size > limit:
                raise too_large("body", limit)
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    except TimeoutError:
        raise UpstreamError(ErrorClass.TIMEOUT, "upstream stalled mid-response") from None
    except (OSError, ConnectionLost, ProtocolError) as exc:
        # A body that does not inflate (bad gzip), is framed wrong or is cut short.
        raise UpstreamError(
            ErrorClass.STREAM, f"upstream response broke: {type(exc).__name__}"
        ) from None
    finally:
        # close(), not release(): a body left unread must not go back to the pool.
        if response.is_eof():
            response.release()
        else:
            response.close()


def _encoded(response: Response) -> bool:
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    return encoding not in ("", "identity")


def expect_event_stream(response: Response) -> None:
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
