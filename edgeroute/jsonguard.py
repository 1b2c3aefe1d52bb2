"""A bound on how deeply a client's JSON nests, checked before anything decodes it.

msgspec decodes (and even skips) nested values recursively, so a body nested ~1,000 levels
deep raises RecursionError wherever it is decoded first: an uncaught 500 and a long traceback
per request, a cheap way to flood logs. The check here is linear and allocation-light, and
almost always free: a body with fewer brackets than the limit cannot nest deeper than it.
"""

from __future__ import annotations

import re

from aiohttp import web

from edgeroute.responses import error_response

# Far deeper than any real request (tool schemas nest a few dozen levels at most) and far
# below the ~1,000 levels where msgspec runs out of interpreter stack, wherever it decodes.
MAX_JSON_DEPTH = 256

# A JSON string, escapes included; brackets inside strings do not nest anything.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_OPENERS = frozenset(b"[{")


def json_depth_exceeds(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True if `body` holds brackets nested more than `limit` deep (strings excepted).

    Malformed JSON is not judged here: the decoder rejects it with its own message.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    brackets = _STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    depth = 0
    for char in brackets:
        if char in _OPENERS:
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def refuse_deep_json(body: bytes, limit: int = MAX_JSON_DEPTH) -> web.Response | None:
    """The 400 to answer for a body nested deeper than `limit`, or None when it is fine."""
    if not json_depth_exceeds(body, limit):
        return None
    return error_response(
        400,
        f"request body is not acceptable JSON: nested deeper than {limit} levels",
        type_="invalid_request_error",
        code="invalid_json",
    )
