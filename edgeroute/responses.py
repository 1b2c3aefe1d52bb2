"""What the gateway says about each request: OpenAI-shaped errors, request ids, access lines."""

from __future__ import annotations

import itertools
import logging
import os
from typing import Any

import msgspec
from aiohttp import web

from edgeroute import accesslog

access_log = logging.getLogger("edgeroute.access")
_encode = msgspec.json.encode


def error_response(
    status: int,
    message: str,
    *,
    type_: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> web.Response:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    error: dict[str, Any] = {"message": message, "type": type_, "param": param, "code": code}
    if extra:
        error.update(extra)
    return web.Response(
        status=status,
        body=_encode({"error": error}),
        content_type="application/json",
        headers=headers,
    )


def too_large(limit: int) -> web.Response:
    return error_response(
        413,
        f"request body exceeds the {limit} byte limit",
        type_="invalid_request_error",
        code="request_too_large",
    )


_REQUEST_IDS = itertools.count(1)
_REQUEST_ID_PREFIX = os.urandom(8).hex()


def new_request_id() -> str:
    """Unique across the fleet (a random per-process prefix), cheaper than uuid4."""
    return f"{_REQUEST_ID_PREFIX}{next(_REQUEST_IDS):08x}"


class _AccessLine(msgspec.Struct, omit_defaults=True):
    """The access line's fields, in this order; the optional ones appear only when known.

    One object per line instead of a dict filled key by key; the encoder leaves out the
    optional fields left at None. `route` has no default, so it is always present (null for
    a request that never matched a route).
    """

    request_id: str
    route: str | None
    status: int
    attempts: int
    duration_ms: float
    provider: str | None = None
    model: str | None = None
    target: str | None = None
    upstream_ms: float | None = None
    ttft_ms: float | None = None
    error: str | None = None
    trace_id: str | None = None
    # The route the client named, when a fallback route (`route`) served or ended it.
    requested_route: str | None = None


_encode_line = msgspec.json.Encoder().encode


def write_access_line(
    request_id: str,
    route: str | None,
    status: int,
    duration_s: float,
    *,
    attempts: int = 0,
    provider: str | None = None,
    model: str | None = None,
    target: str | None = None,
    upstream_s: float | None = None,
    ttft: float | None = None,
    error: str | None = None,
    trace_id: str | None = None,
    requested_route: str | None = None,
) -> None:
    """One JSON line per request on the `edgeroute.access` logger (never a key or a body).

    In a serving process (`edgeroute serve`) the line goes to the access-log writer thread
    (edgeroute.accesslog) instead of through `logging`: same bytes on stderr, no I/O on the
    loop. The logger's level still decides whether there is a line at all.
    """
    if not access_log.isEnabledFor(logging.INFO):
        return
    line = _encode_line(
        _AccessLine(
            request_id,
            route,
            status,
            attempts,
            round(duration_s * 1000, 3),
            provider,
            model,
            target,
            None if upstream_s is None else round(upstream_s * 1000, 3),
            None if ttft is None else round(ttft * 1000, 3),
            error or None,
            trace_id,
            requested_route,
        )
    )
    sink = accesslog.writer()
    if sink is not None:
        sink.submit(line + b"\n")
    else:
        access_log.info(line.decode())
