"""What the gateway says about each request: OpenAI-shaped errors, request ids, access lines."""

from __future__ import annotations

import itertools
import logging
import os
from typing import Any

import msgspec
from aiohttp import web

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
) -> None:
    """One JSON line per request on the `edgeroute.access` logger (never a key or a body)."""
    record: dict[str, Any] = {
        "request_id": request_id,
        "route": route,
        "status": status,
        "attempts": attempts,
        "duration_ms": round(duration_s * 1000, 3),
    }
    if provider is not None:
        record["provider"] = provider
    if model is not None:
        record["model"] = model
    if target is not None:
        record["target"] = target
    if upstream_s is not None:
        record["upstream_ms"] = round(upstream_s * 1000, 3)
    if ttft is not None:
        record["ttft_ms"] = round(ttft * 1000, 3)
    if error:
        record["error"] = error
    if trace_id is not None:
        record["trace_id"] = trace_id
    access_log.info(_encode(record).decode())
