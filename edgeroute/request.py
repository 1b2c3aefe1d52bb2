"""Decode what routing needs from a client request: `model`, `stream`, usage options.

The body is kept as raw JSON fields and forwarded byte for byte; only the few fields the
gateway acts on are decoded. Every bad input gets an OpenAI-shaped 4xx, never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
from aiohttp import web

from edgeroute.jsonguard import refuse_deep_json
from edgeroute.providers import UpstreamRequest
from edgeroute.providers.base import Endpoint, Usage
from edgeroute.responses import error_response, too_large
from edgeroute.state.base import RouteSpec, session_hash

_FIELDS = msgspec.json.Decoder(dict[str, msgspec.Raw])
_STR = msgspec.json.Decoder(str)
_BOOL = msgspec.json.Decoder(bool)
_INT = msgspec.json.Decoder(int)

# The tokens a request is expected to use, reserved against a target's `tpm` at admission
# and replaced with the provider's real usage when it answers. A documented estimate, not a
# tokenizer: ~4 bytes of JSON per prompt token (English text, OpenAI's rule of thumb), plus
# the completion the client allows (`max_completion_tokens` or `max_tokens`), or
# DEFAULT_COMPLETION_TOKENS when it sets neither.
BYTES_PER_TOKEN = 4
DEFAULT_COMPLETION_TOKENS = 256
_PROMPT_FIELDS = ("messages", "input", "prompt")


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


_STREAM_OPTIONS = msgspec.json.Decoder(_StreamOptions)


@dataclass(slots=True)
class Rejected:
    """A request refused before routing: the answer, and the code its accounting uses."""

    response: web.Response
    code: str


async def parse_request(
    request: web.Request,
    endpoint: Endpoint,
    routes: dict[str, RouteSpec],
    request_id: str,
    max_body_bytes: int,
) -> tuple[RouteSpec, UpstreamRequest] | Rejected:
    if request.content_length is not None and request.content_length > max_body_bytes:
        return Rejected(too_large(max_body_bytes), "invalid_request")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return Rejected(too_large(max_body_bytes), "invalid_request")
    if len(body) > max_body_bytes:
        return Rejected(too_large(max_body_bytes), "invalid_request")
    if (too_deep := refuse_deep_json(body)) is not None:
        return Rejected(too_deep, "invalid_request")
    try:
        fields = _FIELDS.decode(body)
    except msgspec.DecodeError as exc:
        return _invalid(400, f"request body is not a JSON object: {exc}", "invalid_json")
    raw_model = fields.get("model")
    if raw_model is None:
        return _invalid(
            400, "you must provide a model parameter", "missing_required_parameter", "model"
        )
    try:
        model = _STR.decode(raw_model)
        raw_stream = fields.get("stream")
        stream = _BOOL.decode(raw_stream) if raw_stream is not None else False
        raw_options = fields.get("stream_options")
        wants_usage = (
            raw_options is not None
            and raw_options != b"null"
            and _STREAM_OPTIONS.decode(raw_options).include_usage
        )
    except msgspec.DecodeError as exc:
        return _invalid(400, f"invalid request: {exc}", "invalid_type")
    if endpoint == "chat" and "messages" not in fields:
        return _invalid(
            400, "you must provide a messages parameter", "missing_required_parameter", "messages"
        )
    route = routes.get(model)
    if route is None:
        return _invalid(
            404,
            f"The model `{model}` does not exist (no edgeroute route serves it)",
            "model_not_found",
            "model",
        )
    if stream and endpoint == "embeddings":
        stream = False
    return route, UpstreamRequest(endpoint, fields, model, stream, wants_usage, request_id)


def estimate_usage(fields: dict[str, msgspec.Raw]) -> Usage:
    """This request's estimated usage (see BYTES_PER_TOKEN): prompt and completion."""
    prompt = 0
    for name in _PROMPT_FIELDS:  # a loop, not sum() over a generator: once per request
        raw = fields.get(name)
        if raw is not None:
            prompt += len(raw)
    completion = DEFAULT_COMPLETION_TOKENS
    for name in ("max_completion_tokens", "max_tokens"):
        raw = fields.get(name)
        if raw is not None and raw != b"null":
            try:
                completion = max(0, _INT.decode(raw))
            except msgspec.DecodeError:
                continue  # the provider will refuse it; the estimate need not
            break
    return Usage(-(-prompt // BYTES_PER_TOKEN), completion)


def session_key(http: web.Request, route: RouteSpec, fields: dict[str, msgspec.Raw]) -> str:
    """The route's affinity key for this request, hashed ("" when the route has no
    affinity or the request no such header or string field). Only the hash is stored or
    logged anywhere: a session id may be a secret or personal data. The body field is
    decoded alone from the fields already split (the body is not parsed again)."""
    affinity = route.affinity
    if affinity is None:
        return ""
    if affinity.source == "header":
        value = http.headers.get(affinity.name)
    else:
        raw = fields.get(affinity.name)
        try:
            value = _STR.decode(raw) if raw is not None else None
        except msgspec.DecodeError:
            value = None  # not a string (a number, an object): no session
    return session_hash(value or "")


def _invalid(status: int, message: str, code: str, param: str | None = None) -> Rejected:
    response = error_response(
        status, message, type_="invalid_request_error", param=param, code=code
    )
    # The access line and metrics keep the two codes they always had.
    return Rejected(response, "model_not_found" if status == 404 else "invalid_request")
