"""A fake LLM upstream for tests, benchmarks, docker compose and the quickstart.

It answers the OpenAI endpoints the gateway forwards (chat, completions, embeddings, models)
Azure OpenAI's deployment paths (`/openai/deployments/{deployment}/...`, for `kind: azure`)
and Anthropic's Messages API (`POST /v1/messages`, so `kind: anthropic` can be tried without a
key) with realistic bodies, and it can misbehave on purpose: latency, random 500s, 429s with
`Retry-After`, connection resets, hangs, slow first tokens, cut streams, and the refusals a
provider gives a prompt too long for the model or one its content filter blocks, each in the
error shape of the API the request came in on. A small control
plane under `/_mock/` lets a test reconfigure faults at runtime and read back what the mock
saw (request counts, the last `Authorization` header and body) without restarting it.

The mock is the upstream in throughput benchmarks, so the success path is kept cheap: the
static part of every reply is encoded once per (model, chunk count) and cached, each request
only splices in its id, timestamp and token counts, stats are plain integer bumps, and the
last headers/body are kept as references and decoded only when `/_mock/stats` is read.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import itertools
import math
import os
import random
import re
import signal
import struct
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn, TypeVar

import msgspec
from aiohttp import web

__all__ = [
    "FAULTS",
    "MOCK_PROVIDER",
    "MockProvider",
    "MockSettings",
    "build_arg_parser",
    "create_mock_app",
    "main",
    "run_mock_provider",
    "serve_mock_provider",
]

FAULTS: Final[tuple[str, ...]] = (
    "none",
    "status",
    "rate_limit",
    "reset",
    "hang",
    "slow_first_token",
    "cut_stream",
    "context_window",
    "content_policy",
)

# Faults that only make sense on a streamed reply; other requests pass through untouched and
# do not consume `fault_count`, so a test can aim a stream fault without counting side traffic.
_STREAM_ONLY_FAULTS: Final = frozenset({"cut_stream"})

# How often a hanging handler checks whether its client left. aiohttp only cancels handlers
# on disconnect when the runner enables `handler_cancellation`; polling keeps `hang` leak-free
# under runners we do not control (e.g. a gateway test that mounts this app itself).
_HANG_POLL_S: Final = 0.05

# Big prompts are legitimate traffic for an LLM upstream; aiohttp's 1 MiB default is not.
_CLIENT_MAX_SIZE: Final = 64 * 1024 * 1024

# Model ids are echoed from requests, so the reply-template cache is bounded.
_CACHE_LIMIT: Final = 1024

_DEFAULT_MODELS: Final = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")
_DEFAULT_EMBEDDING_DIMS: Final = 8
_MAX_EMBEDDING_DIMS: Final = 4096


class MockSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Behaviour of one mock upstream; every field can be changed at runtime via /_mock/config.

    `latency_ms` (± `latency_jitter_ms`, uniformly) delays every inference reply. `error_rate`
    is the fraction of inference requests answered with a 500. `fault` selects a scripted
    misbehaviour (see FAULTS) for the next `fault_count` inference requests, or for all of them
    when `fault_count` is 0. `model_name` overrides the model reported back; None echoes the
    request's model so one mock can stand in for many deployments. `seed` makes error_rate and
    jitter reproducible.
    """

    latency_ms: float = 0
    latency_jitter_ms: float = 0
    error_rate: float = 0
    stream_chunks: int = 5
    model_name: str | None = None
    fault: str = "none"
    fault_count: int = 0
    retry_after_s: float = 1
    first_token_delay_ms: float = 0
    cut_after_chunks: int = 0
    status: int = 500
    seed: int | None = None

    def __post_init__(self) -> None:
        # Runs on construction and on msgspec.convert, so the CLI, create_mock_app and the
        # control plane all reject the same nonsense with the same one-line message.
        for field in ("latency_ms", "latency_jitter_ms", "retry_after_s", "first_token_delay_ms"):
            value = getattr(self, field)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{field} must be a finite number >= 0, got {value!r}")
        if not 0 <= self.error_rate <= 1:
            raise ValueError(f"error_rate must be between 0 and 1, got {self.error_rate!r}")
        if self.stream_chunks < 1:
            raise ValueError(f"stream_chunks must be >= 1, got {self.stream_chunks!r}")
        if self.fault not in FAULTS:
            raise ValueError(f"fault must be one of {', '.join(FAULTS)}; got {self.fault!r}")
        if self.fault_count < 0:
            raise ValueError(f"fault_count must be >= 0, got {self.fault_count!r}")
        if self.cut_after_chunks < 0:
            raise ValueError(f"cut_after_chunks must be >= 0, got {self.cut_after_chunks!r}")
        if not 400 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP error status (400-599), got {self.status!r}")


# --- request shapes -------------------------------------------------------------------------
# Typed decoders validate and decode in one pass and skip fields they do not name, which is
# both faster than decoding to dicts and tolerant of whatever extra parameters clients send.


class _ContentPart(msgspec.Struct):
    text: str | None = None


class _Message(msgspec.Struct):
    content: str | list[_ContentPart] | None = None


class _StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class _ChatRequest(msgspec.Struct):
    model: str | None = None
    messages: list[_Message] | None = None
    stream: bool | None = None
    stream_options: _StreamOptions | None = None


class _CompletionRequest(msgspec.Struct):
    model: str | None = None
    # A string, a list of strings, a token list or a list of token lists.
    prompt: str | list[Any] | None = None
    stream: bool | None = None
    stream_options: _StreamOptions | None = None


class _EmbeddingRequest(msgspec.Struct):
    model: str | None = None
    input: str | list[Any] | None = None
    encoding_format: str | None = None
    dimensions: int | None = None


class _AnthropicBlock(msgspec.Struct):
    type: str | None = None
    text: str | None = None


class _AnthropicMessage(msgspec.Struct):
    role: str | None = None
    content: str | list[_AnthropicBlock] | None = None


class _MessagesRequest(msgspec.Struct):
    model: str | None = None
    max_tokens: int | None = None
    messages: list[_AnthropicMessage] | None = None
    system: str | list[_AnthropicBlock] | None = None
    stream: bool | None = None


_CHAT_DECODER: Final = msgspec.json.Decoder(_ChatRequest)
_MESSAGES_DECODER: Final = msgspec.json.Decoder(_MessagesRequest)
_COMPLETION_DECODER: Final = msgspec.json.Decoder(_CompletionRequest)
_EMBEDDING_DECODER: Final = msgspec.json.Decoder(_EmbeddingRequest)
_ANY_DECODER: Final = msgspec.json.Decoder()
_ENCODER: Final = msgspec.json.Encoder()

# msgspec reports where validation failed as "... - at `$.messages[0].content`".
_ERROR_PATH_RE: Final = re.compile(r"at `\$\.?([^`]*)`")
_CONFIG_FIELD_RE: Final = re.compile(r"unknown field `(\w+)`|^(\w+) must")


class _BadRequest(Exception):
    """A request the mock refuses with a 400, carrying the OpenAI-style `param`."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def _missing(param: str) -> _BadRequest:
    return _BadRequest(
        f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
    )


_T = TypeVar("_T")


def _decode(decoder: msgspec.json.Decoder[_T], body: bytes) -> _T:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        match = _ERROR_PATH_RE.search(str(exc))
        param = match.group(1) if match else None
        raise _BadRequest(f"Invalid request: {exc}", param=param) from None
    except msgspec.DecodeError as exc:
        raise _BadRequest(
            f"We could not parse the JSON body of your request. ({exc})", code="invalid_json"
        ) from None


# --- canned reply pieces --------------------------------------------------------------------


def _error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> bytes:
    return _ENCODER.encode(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def _anthropic_error_body(message: str, type_: str) -> bytes:
    return _ENCODER.encode({"type": "error", "error": {"type": type_, "message": message}})


# The error `type` Anthropic's API sends with each status (its SDKs and edgeroute branch on it).
_ANTHROPIC_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


# The refusals faults `context_window` and `content_policy` answer with, per API, as each
# provider sends them (status, body): OpenAI's codes, Azure's content filter with its
# innererror, Anthropic's invalid_request_error wording.
_CONTEXT_MESSAGE: Final = (
    "This model's maximum context length is 128000 tokens. However, your messages resulted "
    "in 131072 tokens. Please reduce the length of the messages."
)
_OPENAI_CONTEXT: Final = _error_body(
    _CONTEXT_MESSAGE, "invalid_request_error", "messages", "context_length_exceeded"
)
_REFUSALS: Final[dict[str, dict[str, tuple[int, bytes]]]] = {
    "context_window": {
        "openai": (400, _OPENAI_CONTEXT),
        "azure": (400, _OPENAI_CONTEXT),
        "anthropic": (
            400,
            _anthropic_error_body(
                "prompt is too long: 210000 tokens > 200000 maximum", "invalid_request_error"
            ),
        ),
    },
    "content_policy": {
        "openai": (
            400,
            _error_body(
                "Your request was rejected as a result of our safety system. Your prompt may "
                "contain text that is not allowed by our safety system.",
                "invalid_request_error",
                code="content_policy_violation",
            ),
        ),
        "azure": (
            400,
            _ENCODER.encode(
                {
                    "error": {
                        "message": "The response was filtered due to the prompt triggering "
                        "Azure OpenAI's content management policy. Please modify your prompt "
                        "and retry.",
                        "type": None,
                        "param": "prompt",
                        "code": "content_filter",
                        "status": 400,
                        "innererror": {
                            "code": "ResponsibleAIPolicyViolation",
                            "content_filter_result": {
                                "hate": {"filtered": True, "severity": "high"},
                                "self_harm": {"filtered": False, "severity": "safe"},
                                "sexual": {"filtered": False, "severity": "safe"},
                                "violence": {"filtered": False, "severity": "safe"},
                            },
                        },
                    }
                }
            ),
        ),
        "anthropic": (
            400,
            _anthropic_error_body(
                "Output blocked by content filtering policy", "invalid_request_error"
            ),
        ),
    },
}


def _anthropic_error_type(status: int) -> str:
    default = "api_error" if status >= 500 else "invalid_request_error"
    return _ANTHROPIC_ERROR_TYPES.get(status, default)


def _sse_event(event: str, data: Mapping[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (event.encode(), _ENCODER.encode(data))


def _block_chars(content: str | list[_AnthropicBlock] | None) -> int:
    if isinstance(content, str):
        return len(content)
    return sum(len(block.text) for block in content or () if block.text)


def _status_error_kind(status: int) -> tuple[str, str | None]:
    """The (type, code) pair OpenAI uses for a status, so SDKs classify injected errors alike."""
    if status == 401:
        return "invalid_request_error", "invalid_api_key"
    if status == 404:
        return "invalid_request_error", "model_not_found"
    if status == 429:
        return "requests", "rate_limit_exceeded"
    if status >= 500:
        return "server_error", None
    return "invalid_request_error", None


def _format_seconds(value: float) -> str:
    # Retry-After is an integer in HTTP; keep whole seconds integral and fractions readable.
    return str(int(value)) if value == int(value) else f"{value:g}"


def _reply_words(name: str, model: str, min_words: int) -> list[str]:
    """The reply text, padded so a stream of `min_words` chunks has a word for each chunk."""
    words = f"Hello from {name} ({model}). This is a mock reply.".split(" ")
    if len(words) < min_words:
        words.extend(["la"] * (min_words - len(words)))
    return words


def _split_pieces(words: list[str], pieces: int) -> list[str]:
    """Split words into `pieces` deltas whose concatenation is the space-joined text."""
    size, extra = divmod(len(words), pieces)
    out: list[str] = []
    start = 0
    for i in range(pieces):
        end = start + size + (1 if i < extra else 0)
        text = " ".join(words[start:end])
        out.append(text if i == 0 else " " + text)
        start = end
    return out


def _tail(obj: Mapping[str, Any]) -> bytes:
    """Encode a static object without its opening brace, to follow a per-request prefix."""
    return _ENCODER.encode(obj)[1:]


def _usage_json(prompt_tokens: int, completion_tokens: int) -> bytes:
    return b'"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}' % (
        prompt_tokens,
        completion_tokens,
        prompt_tokens + completion_tokens,
    )


@dataclass(slots=True, frozen=True)
class _Canned:
    """Pre-encoded static parts of one kind of reply for one model.

    Every reply is `{"id":…,"created":…,[usage,]` + a cached tail, so per request the mock
    only formats a few integers instead of encoding the whole object.
    """

    completion_tokens: int
    body_tail: bytes  # non-streaming object, after the usage member
    chunk_tails: tuple[bytes, ...]  # streamed chunks (content chunks, then the finish chunk)
    usage_chunk_tail: bytes  # the include_usage chunk, after the usage member


def _canned_chat(name: str, model: str, chunks: int) -> _Canned:
    words = _reply_words(name, model, 0)
    stream_words = _reply_words(name, model, chunks)
    fingerprint = "fp_mock"
    body = {
        "object": "chat.completion",
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": " ".join(words), "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "system_fingerprint": fingerprint,
    }
    chunk_tails: list[bytes] = []
    for i, piece in enumerate(_split_pieces(stream_words, chunks)):
        delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
        chunk_tails.append(
            _tail(
                {
                    "object": "chat.completion.chunk",
                    "model": model,
                    "system_fingerprint": fingerprint,
                    "choices": [
                        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
                    ],
                }
            )
        )
    chunk_tails.append(
        _tail(
            {
                "object": "chat.completion.chunk",
                "model": model,
                "system_fingerprint": fingerprint,
                "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
            }
        )
    )
    usage_tail = _tail(
        {
            "object": "chat.completion.chunk",
            "model": model,
            "system_fingerprint": fingerprint,
            "choices": [],
        }
    )
    return _Canned(len(words), _tail(body), tuple(chunk_tails), usage_tail)


def _canned_completion(name: str, model: str, chunks: int) -> _Canned:
    words = _reply_words(name, model, 0)
    stream_words = _reply_words(name, model, chunks)
    body = {
        "object": "text_completion",
        "model": model,
        "choices": [
            {"text": " ".join(words), "index": 0, "logprobs": None, "finish_reason": "stop"}
        ],
    }

    def chunk(text: str, finish: str | None) -> bytes:
        return _tail(
            {
                "object": "text_completion",
                "model": model,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            }
        )

    chunk_tails = [chunk(piece, None) for piece in _split_pieces(stream_words, chunks)]
    chunk_tails.append(chunk("", "stop"))
    usage_tail = _tail({"object": "text_completion", "model": model, "choices": []})
    return _Canned(len(words), _tail(body), tuple(chunk_tails), usage_tail)


def _estimate_tokens(chars: int) -> int:
    return max(1, chars // 4)


def _message_chars(messages: list[_Message]) -> int:
    total = 0
    for message in messages:
        content = message.content
        if isinstance(content, str):
            total += len(content)
        elif content is not None:
            total += sum(len(part.text) for part in content if part.text)
    return total


def _prompt_tokens(prompt: str | list[Any]) -> int:
    """Estimate prompt tokens for any of the prompt shapes /v1/completions accepts."""
    if isinstance(prompt, str):
        return _estimate_tokens(len(prompt))
    chars = 0
    tokens = 0
    for item in prompt:
        if isinstance(item, str):
            chars += len(item)
        elif isinstance(item, list):
            tokens += len(item)
        else:  # a bare token id
            tokens += 1
    return max(1, tokens + chars // 4)


def _embedding_vector(item: Any, dims: int) -> list[float]:
    """A unit vector derived from a hash of `item`: deterministic across runs and processes."""
    data = item.encode() if isinstance(item, str) else _ENCODER.encode(item)
    raw: list[int] = []
    block = 0
    while len(raw) < dims:
        digest = hashlib.blake2b(data + block.to_bytes(4, "little"), digest_size=64).digest()
        raw.extend(struct.unpack("<32H", digest))
        block += 1
    values = [v / 32767.5 - 1.0 for v in raw[:dims]]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    # Round through float32 so "float" and "base64" (float32) encodings carry identical values.
    packed = struct.pack(f"<{dims}f", *(v / norm for v in values))
    return list(struct.unpack(f"<{dims}f", packed))


# --- the server -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Reply:
    """A rendered answer: one JSON body, or the SSE events of a stream in order."""

    stream: bool
    parts: list[bytes]
    content_chunks: int = 0  # streamed content events at the front of `parts`
    api: str = "openai"  # which API's error shapes faults use: openai, azure or anthropic


class MockProvider:
    """Holds one mock's settings and statistics and implements its HTTP handlers."""

    def __init__(self, settings: MockSettings, *, name: str = "mock") -> None:
        self.name = name
        # A private copy: runtime reconfiguration and fault countdown must not mutate the
        # caller's object (tests often reuse one MockSettings for several mocks).
        self.settings = msgspec.structs.replace(settings)
        self.rng = random.Random(settings.seed)
        self.requests = 0
        self.by_path: dict[str, int] = {}
        self.faults_served = 0
        self.in_flight = 0
        # The most inference requests it ever held at once: what a concurrency quota caps.
        self.peak_in_flight = 0
        self.last_authorization: str | None = None
        self.last_headers: Mapping[str, str] | None = None
        self.last_body: bytes | None = None
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(4).hex()
        self._chat_cache: dict[tuple[str, int], _Canned] = {}
        self._completion_cache: dict[tuple[str, int], _Canned] = {}
        self._json_headers = {"Content-Type": "application/json", "x-mock-name": name}
        self._sse_headers = {
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "x-mock-name": name,
        }
        self._server_error = _error_body(
            f"{name}: simulated server error (error_rate)", "server_error"
        )
        self._status_bodies: dict[int, bytes] = {}
        self._health_body = _ENCODER.encode({"status": "ok", "name": name})
        self._models_body = b""
        self._rate_limit_body = b""
        self._rate_limit_headers: dict[str, str] = {}
        self._rebuild_static()

    # -- configuration ------------------------------------------------------------------------

    def _rebuild_static(self) -> None:
        """Re-encode the bodies that depend only on settings; called whenever they change."""
        s = self.settings
        models = (s.model_name,) if s.model_name else _DEFAULT_MODELS
        self._models_body = _ENCODER.encode(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": self.name}
                    for m in models
                ],
            }
        )
        self._rate_limit_body = _error_body(
            f"{self.name}: rate limit reached (simulated); retry after "
            f"{_format_seconds(s.retry_after_s)}s",
            "requests",
            code="rate_limit_exceeded",
        )
        self._rate_limit_headers = {
            **self._json_headers,
            "Retry-After": _format_seconds(s.retry_after_s),
            # The OpenAI SDK prefers the millisecond header when both are present.
            "retry-after-ms": str(round(s.retry_after_s * 1000)),
        }
        self._chat_cache.clear()
        self._completion_cache.clear()

    def configure(self, changes: Mapping[str, Any]) -> MockSettings:
        """Replace the given settings fields; raises msgspec.ValidationError on bad input."""
        merged = msgspec.structs.asdict(self.settings)
        merged.update(changes)
        new = msgspec.convert(merged, MockSettings)
        self.settings = new
        if "seed" in changes:
            self.rng = random.Random(new.seed)
        self._rebuild_static()
        return new

    def reset_stats(self) -> None:
        # in_flight is live state, not history, so it survives a reset.
        self.requests = 0
        self.by_path = {}
        self.faults_served = 0
        self.peak_in_flight = self.in_flight
        self.last_authorization = None
        self.last_headers = None
        self.last_body = None

    def stats(self) -> dict[str, Any]:
        """What the mock saw; the last headers/body are decoded here, not on the hot path."""
        last_body: Any = None
        if self.last_body is not None:
            try:
                last_body = _ANY_DECODER.decode(self.last_body)
            except msgspec.DecodeError:
                last_body = self.last_body.decode("utf-8", "replace")
        return {
            "name": self.name,
            "requests": self.requests,
            "by_path": dict(self.by_path),
            "faults_served": self.faults_served,
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "last_authorization": self.last_authorization,
            "last_headers": dict(self.last_headers) if self.last_headers is not None else None,
            "last_body": last_body,
        }

    # -- per-request helpers ------------------------------------------------------------------

    def _record(self, request: web.Request, path: str, body: bytes | None) -> None:
        self.requests += 1
        self.by_path[path] = self.by_path.get(path, 0) + 1
        headers = request.headers
        # Keep the immutable header view itself; copying happens only when stats are read.
        self.last_headers = headers
        self.last_authorization = headers.get("Authorization")
        if body is not None:
            self.last_body = body

    def _take_fault(self, stream: bool) -> str:
        """Decide, synchronously, which fault this request gets, consuming `fault_count`.

        Deciding before any await keeps the countdown exact under concurrency.
        """
        s = self.settings
        fault = s.fault
        if fault == "none" or (fault in _STREAM_ONLY_FAULTS and not stream):
            if s.error_rate > 0 and self.rng.random() < s.error_rate:
                self.faults_served += 1
                return "error_rate"
            return "none"
        self.faults_served += 1
        if s.fault_count > 0:
            s.fault_count -= 1
            if s.fault_count == 0:
                s.fault = "none"
        return fault

    def _delay_s(self) -> float:
        s = self.settings
        delay = s.latency_ms
        if s.latency_jitter_ms:
            delay += self.rng.uniform(-s.latency_jitter_ms, s.latency_jitter_ms)
        return max(0.0, delay) / 1000

    def _next_id(self, prefix: str) -> bytes:
        return f"{prefix}-mock{self._id_prefix}{next(self._ids):x}".encode()

    def _json(self, body: bytes, status: int = 200) -> web.Response:
        return web.Response(body=body, status=status, headers=self._json_headers)

    def _bad_request(self, exc: _BadRequest) -> web.Response:
        return self._json(
            _error_body(exc.message, "invalid_request_error", exc.param, exc.code), 400
        )

    def _render(
        self,
        canned: _Canned,
        id_prefix: str,
        prompt_tokens: int,
        stream: bool,
        include_usage: bool,
    ) -> _Reply:
        head = b'{"id":"%s","created":%d,' % (self._next_id(id_prefix), int(time.time()))
        usage = _usage_json(prompt_tokens, canned.completion_tokens)
        if not stream:
            return _Reply(False, [head + usage + b"," + canned.body_tail])
        event_head = b"data: " + head
        parts = [event_head + tail + b"\n\n" for tail in canned.chunk_tails]
        if include_usage:
            parts.append(event_head + usage + b"," + canned.usage_chunk_tail + b"\n\n")
        parts.append(b"data: [DONE]\n\n")
        return _Reply(True, parts, content_chunks=len(canned.chunk_tails) - 1)

    def _canned(
        self,
        cache: dict[tuple[str, int], _Canned],
        build: Callable[[str, str, int], _Canned],
        requested_model: str,
    ) -> _Canned:
        s = self.settings
        key = (s.model_name or requested_model, s.stream_chunks)
        canned = cache.get(key)
        if canned is None:
            if len(cache) >= _CACHE_LIMIT:
                cache.clear()
            canned = cache[key] = build(self.name, key[0], key[1])
        return canned

    # -- request parsing ----------------------------------------------------------------------

    def _parse_chat(self, body: bytes) -> _Reply:
        req = _decode(_CHAT_DECODER, body)
        if not req.model:
            raise _missing("model")
        if req.messages is None:
            raise _missing("messages")
        if not req.messages:
            raise _BadRequest("'messages' must contain at least one message.", "messages")
        canned = self._canned(self._chat_cache, _canned_chat, req.model)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        prompt_tokens = _estimate_tokens(_message_chars(req.messages))
        return self._render(canned, "chatcmpl", prompt_tokens, bool(req.stream), include_usage)

    def _parse_completion(self, body: bytes) -> _Reply:
        req = _decode(_COMPLETION_DECODER, body)
        if not req.model:
            raise _missing("model")
        if req.prompt is None:
            raise _missing("prompt")
        canned = self._canned(self._completion_cache, _canned_completion, req.model)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        prompt_tokens = _prompt_tokens(req.prompt)
        return self._render(canned, "cmpl", prompt_tokens, bool(req.stream), include_usage)

    def _parse_messages(self, body: bytes) -> _Reply:
        """Anthropic's Messages API: a text reply, whole or as its event stream."""
        try:
            req = _MESSAGES_DECODER.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise _BadRequest(f"Invalid request: {exc}") from None
        for field in ("model", "max_tokens", "messages"):
            if getattr(req, field) is None:
                raise _BadRequest(f"{field}: Field required")
        assert req.model is not None and req.messages is not None and req.max_tokens is not None
        if not req.messages:
            raise _BadRequest("messages: at least one message is required")
        if req.max_tokens < 1:
            raise _BadRequest("max_tokens: must be at least 1")
        model = self.settings.model_name or req.model
        chars = _block_chars(req.system) + sum(_block_chars(m.content) for m in req.messages)
        input_tokens = _estimate_tokens(chars)
        message_id = "msg_" + self._next_id("mock").decode().replace("-", "")
        chunks = self.settings.stream_chunks
        words = _reply_words(self.name, model, chunks if req.stream else 0)
        output_tokens = len(words)
        message = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": " ".join(words)}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
        }
        if not req.stream:
            return _Reply(False, [_ENCODER.encode(message)], api="anthropic")
        start = {
            **message,
            "content": [],
            "stop_reason": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1},
        }
        deltas = [
            _sse_event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": piece},
                },
            )
            for piece in _split_pieces(words, chunks)
        ]
        # The preamble rides with the first delta, so `cut_after_chunks: N` sends N deltas.
        deltas[0] = (
            _sse_event("message_start", {"type": "message_start", "message": start})
            + _sse_event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            )
            + _sse_event("ping", {"type": "ping"})
            + deltas[0]
        )
        tail = [
            _sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _sse_event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": output_tokens},
                },
            ),
            _sse_event("message_stop", {"type": "message_stop"}),
        ]
        return _Reply(True, deltas + tail, content_chunks=len(deltas), api="anthropic")

    def _parse_embedding(self, body: bytes) -> _Reply:
        req = _decode(_EMBEDDING_DECODER, body)
        if not req.model:
            raise _missing("model")
        if req.input is None:
            raise _missing("input")
        items: list[Any]
        if isinstance(req.input, str) or (req.input and isinstance(req.input[0], int)):
            items = [req.input]  # one string, or one token list
        else:
            items = req.input
        if not items:
            raise _BadRequest("'input' must not be empty.", "input")
        dims = _DEFAULT_EMBEDDING_DIMS if req.dimensions is None else req.dimensions
        if not 1 <= dims <= _MAX_EMBEDDING_DIMS:
            raise _BadRequest(
                f"'dimensions' must be between 1 and {_MAX_EMBEDDING_DIMS}.", "dimensions"
            )
        fmt = req.encoding_format or "float"
        if fmt not in ("float", "base64"):
            raise _BadRequest("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
        data: list[dict[str, Any]] = []
        prompt_tokens = 0
        for index, item in enumerate(items):
            vector = _embedding_vector(item, dims)
            embedding: list[float] | str = vector
            if fmt == "base64":
                embedding = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
            prompt_tokens += _prompt_tokens(item if isinstance(item, str | list) else [item])
        model = self.settings.model_name or req.model
        body_out = _ENCODER.encode(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
            }
        )
        return _Reply(False, [body_out])

    # -- serving ------------------------------------------------------------------------------

    async def _inference(
        self,
        request: web.Request,
        path: str,
        parse: Callable[[bytes], _Reply],
        api: str = "openai",
    ) -> web.StreamResponse:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            body = await request.read()
            self._record(request, path, body)
            try:
                if api == "anthropic" and not request.headers.get("anthropic-version"):
                    raise _BadRequest("anthropic-version: header is required")
                reply = parse(body)
                if api == "azure":
                    reply.api = api
            except _BadRequest as exc:
                # A rejected request consumes no fault, so fault counts stay predictable.
                if api == "anthropic":
                    body_out = _anthropic_error_body(exc.message, "invalid_request_error")
                    return self._json(body_out, 400)
                return self._bad_request(exc)
            fault = self._take_fault(reply.stream)
            if fault == "hang":
                return await self._hang(request)
            delay = self._delay_s()
            if delay:
                await asyncio.sleep(delay)
            if fault == "none":
                return await self._send(request, reply)
            return await self._send_fault(request, reply, fault)
        finally:
            self.in_flight -= 1

    async def _send(self, request: web.Request, reply: _Reply) -> web.StreamResponse:
        if not reply.stream:
            return self._json(reply.parts[0])
        resp = web.StreamResponse(headers=self._sse_headers)
        # A client that leaves mid-stream is normal traffic, not an error worth a traceback.
        with contextlib.suppress(ConnectionResetError):
            await resp.prepare(request)
            await resp.write(b"".join(reply.parts))
            await resp.write_eof()
        return resp

    async def _send_fault(
        self, request: web.Request, reply: _Reply, fault: str
    ) -> web.StreamResponse:
        s = self.settings
        if fault in _REFUSALS:
            status, body = _REFUSALS[fault][reply.api]
            return self._json(body, status)
        if reply.api == "anthropic" and fault in ("error_rate", "rate_limit", "status"):
            return self._anthropic_fault(fault)
        if fault == "error_rate":
            return self._json(self._server_error, 500)
        if fault == "rate_limit":
            return web.Response(
                body=self._rate_limit_body, status=429, headers=self._rate_limit_headers
            )
        if fault == "status":
            return self._json(self._status_body(s.status), s.status)
        if fault == "slow_first_token":
            return await self._send_slow_first_token(request, reply, s.first_token_delay_ms)
        if fault == "reset":
            return await self._send_reset(request, reply)
        if fault == "cut_stream":
            return await self._send_cut(request, reply, s.cut_after_chunks)
        raise AssertionError(f"unhandled fault {fault!r}")  # pragma: no cover

    def _anthropic_fault(self, fault: str) -> web.Response:
        """An injected error in Anthropic's shape (`{"type": "error", "error": {...}}`)."""
        s = self.settings
        if fault == "rate_limit":
            retry = _format_seconds(s.retry_after_s)
            body = _anthropic_error_body(
                f"{self.name}: rate limit reached (simulated); retry after {retry}s",
                "rate_limit_error",
            )
            headers = {**self._json_headers, "retry-after": retry}
            return web.Response(body=body, status=429, headers=headers)
        status = 500 if fault == "error_rate" else s.status
        message = f"{self.name}: simulated upstream error (HTTP {status})"
        return self._json(_anthropic_error_body(message, _anthropic_error_type(status)), status)

    def _status_body(self, status: int) -> bytes:
        body = self._status_bodies.get(status)
        if body is None:
            type_, code = _status_error_kind(status)
            body = self._status_bodies[status] = _error_body(
                f"{self.name}: simulated upstream error (HTTP {status})", type_, code=code
            )
        return body

    async def _send_slow_first_token(
        self, request: web.Request, reply: _Reply, delay_ms: float
    ) -> web.StreamResponse:
        if not reply.stream:
            # Without a stream the first token arrives with the body: delay the whole answer.
            await asyncio.sleep(delay_ms / 1000)
            return self._json(reply.parts[0])
        resp = web.StreamResponse(headers=self._sse_headers)
        with contextlib.suppress(ConnectionResetError):
            # Headers go out at once (StreamResponse sends them on prepare), so the client sees
            # a live stream that is slow to produce its first token, not a slow connect.
            await resp.prepare(request)
            await asyncio.sleep(delay_ms / 1000)
            await resp.write(b"".join(reply.parts))
            await resp.write_eof()
        return resp

    async def _send_reset(self, request: web.Request, reply: _Reply) -> web.StreamResponse:
        """Promise a full answer, send part of it, then drop the connection."""
        first = reply.parts[0]
        if reply.stream:
            resp = web.StreamResponse(headers=self._sse_headers)
        else:
            resp = web.StreamResponse(headers=self._json_headers)
            resp.content_length = len(first)
        with contextlib.suppress(ConnectionResetError):
            await resp.prepare(request)
            await resp.write(first[: max(1, len(first) // 2)])
            self._close_transport(request)
        # aiohttp's final write_eof fails with ConnectionError on the closed transport and
        # treats it as a client disconnect, which is exactly the picture we want.
        return resp

    async def _send_cut(
        self, request: web.Request, reply: _Reply, after: int
    ) -> web.StreamResponse:
        """Send `after` content chunks of a stream, then close: no finish chunk, no [DONE]."""
        resp = web.StreamResponse(headers=self._sse_headers)
        with contextlib.suppress(ConnectionResetError):
            await resp.prepare(request)
            sent = reply.parts[: min(after, reply.content_chunks)]
            if sent:
                await resp.write(b"".join(sent))
            self._close_transport(request)
        return resp

    @staticmethod
    def _close_transport(request: web.Request) -> None:
        transport = request.transport
        if transport is not None:
            # close(), not abort(): buffered bytes are flushed first, so the client really
            # receives the headers and partial body before the connection goes away.
            transport.close()

    async def _hang(self, request: web.Request) -> web.StreamResponse:
        """Never answer; return once the client has gone so no handler outlives its socket."""
        # Polling, not an Event: aiohttp offers no public disconnect notification (see
        # _HANG_POLL_S), and only hanging requests ever pay for this loop.
        while (t := request.transport) is not None and not t.is_closing():  # noqa: ASYNC110
            await asyncio.sleep(_HANG_POLL_S)
        # Nobody is listening any more; aiohttp drops this quietly as a client disconnect.
        return web.Response(status=504, headers=self._json_headers)

    # -- handlers -----------------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, "/v1/chat/completions", self._parse_chat)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, "/v1/completions", self._parse_completion)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, "/v1/embeddings", self._parse_embedding)

    # Azure OpenAI: the deployment in the path, `api-version` in the query (not checked).
    async def azure_chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(
            request, "/openai/deployments/chat/completions", self._parse_chat, api="azure"
        )

    async def azure_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(
            request, "/openai/deployments/completions", self._parse_completion, api="azure"
        )

    async def azure_embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(
            request, "/openai/deployments/embeddings", self._parse_embedding, api="azure"
        )

    async def messages(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, "/v1/messages", self._parse_messages, api="anthropic")

    async def models(self, request: web.Request) -> web.StreamResponse:
        self._record(request, "/v1/models", None)
        return self._json(self._models_body)

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        self._record(request, "/healthz", None)
        return self._json(self._health_body)

    # Control-plane requests are deliberately not counted: tests poll them.

    async def get_stats(self, request: web.Request) -> web.StreamResponse:
        return self._json(_ENCODER.encode(self.stats()))

    async def post_reset_stats(self, request: web.Request) -> web.StreamResponse:
        self.reset_stats()
        return self._json(_ENCODER.encode(self.stats()))

    async def get_config(self, request: web.Request) -> web.StreamResponse:
        return self._json(_ENCODER.encode(self.settings))

    async def post_config(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            changes = _ANY_DECODER.decode(body) if body.strip() else {}
        except msgspec.DecodeError as exc:
            return self._bad_request(_BadRequest(f"Invalid JSON: {exc}", code="invalid_json"))
        if not isinstance(changes, dict):
            return self._bad_request(_BadRequest("The config body must be a JSON object."))
        try:
            new = self.configure(changes)
        except msgspec.ValidationError as exc:
            # Type errors carry a `$.field` path; unknown fields and __post_init__ errors
            # name the field only in their text.
            match = _ERROR_PATH_RE.search(str(exc)) or _CONFIG_FIELD_RE.search(str(exc))
            param = next((g for g in match.groups() if g), None) if match else None
            return self._bad_request(_BadRequest(f"Invalid mock config: {exc}", param=param))
        return self._json(_ENCODER.encode(new))


MOCK_PROVIDER: Final = web.AppKey("mock_provider", MockProvider)


def create_mock_app(settings: MockSettings, *, name: str = "mock") -> web.Application:
    """Build the aiohttp application of one mock upstream named `name`.

    The MockProvider behind it is available as `app[MOCK_PROVIDER]` for in-process tests.
    """
    provider = MockProvider(settings, name=name)
    app = web.Application(client_max_size=_CLIENT_MAX_SIZE)
    app[MOCK_PROVIDER] = provider
    router = app.router
    router.add_post("/v1/chat/completions", provider.chat_completions)
    router.add_post("/v1/completions", provider.completions)
    router.add_post("/v1/embeddings", provider.embeddings)
    router.add_post("/v1/messages", provider.messages)
    azure = "/openai/deployments/{deployment}"
    router.add_post(f"{azure}/chat/completions", provider.azure_chat_completions)
    router.add_post(f"{azure}/completions", provider.azure_completions)
    router.add_post(f"{azure}/embeddings", provider.azure_embeddings)
    router.add_get("/v1/models", provider.models)
    router.add_get("/healthz", provider.healthz)
    router.add_get("/_mock/stats", provider.get_stats)
    router.add_post("/_mock/reset_stats", provider.post_reset_stats)
    router.add_get("/_mock/config", provider.get_config)
    router.add_post("/_mock/config", provider.post_config)
    return app


async def run_mock_provider(
    host: str,
    port: int,
    settings: MockSettings,
    *,
    name: str = "mock",
    on_ready: Callable[[str, int], None] | None = None,
) -> None:
    """Serve one mock on host:port until cancelled.

    `on_ready(host, port)` is called once the socket listens, with the real port (useful
    when `port` is 0).
    """
    app = create_mock_app(settings, name=name)
    # handler_cancellation: a hanging handler ends the moment its client disconnects.
    # A short shutdown_timeout: a mock has nothing worth draining, and a `hang` in flight
    # must not hold up SIGTERM for aiohttp's default 60 s.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        if on_ready is not None:
            bound_port = runner.addresses[0][1] if runner.addresses else port
            on_ready(host, bound_port)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def serve_mock_provider(host: str, port: int, settings: MockSettings, name: str = "mock") -> None:
    """Blocking entry point for the CLI: serve until SIGINT/SIGTERM, then return normally."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is an optional extra
        pass
    else:
        loop_factory = uvloop.new_event_loop

    def ready(bound_host: str, bound_port: int) -> None:
        print(f"mock-provider {name} listening on http://{bound_host}:{bound_port}/v1", flush=True)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows
                loop.add_signal_handler(sig, stop.set)
        server = asyncio.create_task(
            run_mock_provider(host, port, settings, name=name, on_ready=ready)
        )
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({server, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if server.done():
            server.result()  # a bind error or similar: let it propagate
            return
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve())


class _OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single readable line (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


_HELP_EPILOG = """\
endpoints:
  POST /v1/chat/completions, /v1/completions, /v1/embeddings; GET /v1/models   OpenAI API
  POST /openai/deployments/{deployment}/chat/completions (also completions, embeddings)
                      Azure OpenAI (kind: azure; base_url without /v1)
  POST /v1/messages   Anthropic Messages API (needs an anthropic-version header; any key)
  GET /healthz

runtime control (not counted in stats):
  GET  /_mock/stats         requests, by_path, faults_served, in_flight, last headers/body
  POST /_mock/reset_stats
  GET  /_mock/config        the settings below
  POST /_mock/config        change any of them, e.g. -d '{"fault": "rate_limit", "fault_count": 2}'

settings (flags above; same names in /_mock/config):
  latency_ms, latency_jitter_ms  delay of every reply, +/- uniform jitter
  error_rate          fraction of requests answered 500 (0..1)
  stream_chunks       content chunks per streamed reply
  model_name          report this model (null: echo the request's)
  fault               none | status | rate_limit | reset | hang | slow_first_token | cut_stream
                      | context_window | content_policy:
                        status            answer `status` with an error body of the right API
                        rate_limit        429 with Retry-After: `retry_after_s`
                        reset             send half the reply, then drop the connection
                        hang              never answer
                        slow_first_token  wait `first_token_delay_ms` before the first byte
                        cut_stream        stream `cut_after_chunks` chunks, then close
                        context_window    400: the prompt is too long for the model, as the
                                          API called says it (OpenAI/Azure code
                                          context_length_exceeded, Anthropic "prompt is too
                                          long: ...")
                        content_policy    400: refused by the content filter (OpenAI
                                          content_policy_violation, Azure content_filter with
                                          innererror ResponsibleAIPolicyViolation, Anthropic
                                          "Output blocked by content filtering policy")
  fault_count         faulty requests before `fault` returns to none (0: every request)
  status              HTTP status for fault `status` (400-599, default 500)
  retry_after_s       Retry-After of fault `rate_limit` (default 1)
  first_token_delay_ms  delay of fault `slow_first_token`
  cut_after_chunks    chunks sent before fault `cut_stream` closes (default 0)
  seed                seed for error_rate and jitter (reproducible runs)
"""


def build_arg_parser(prog: str = "mock-provider") -> argparse.ArgumentParser:
    """The mock's command-line options; the edgeroute CLI reuses this parser."""
    parser = _OneLineErrorParser(
        prog=prog,
        description="Run a fake LLM upstream speaking the OpenAI API and Anthropic's "
        "Messages API (no API keys needed), with faults to inject.",
        epilog=_HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--port", type=int, required=True, help="TCP port (0 = any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--name", default="mock", help="name reported in replies and headers")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay per reply")
    parser.add_argument("--latency-jitter-ms", type=float, default=0.0, help="± uniform jitter")
    parser.add_argument("--error-rate", type=float, default=0.0, help="fraction answered 500")
    parser.add_argument("--stream-chunks", type=int, default=5, help="content chunks per stream")
    parser.add_argument("--model-name", default=None, help="report this model instead of echoing")
    parser.add_argument("--fault", default="none", choices=FAULTS, help="injected fault")
    parser.add_argument("--fault-count", type=int, default=0, help="faulty requests (0 = all)")
    parser.add_argument("--status", type=int, default=500, help="HTTP status of fault `status`")
    parser.add_argument(
        "--retry-after-s", type=float, default=1.0, help="Retry-After of fault `rate_limit`"
    )
    parser.add_argument(
        "--first-token-delay-ms", type=float, default=0.0, help="delay of `slow_first_token`"
    )
    parser.add_argument(
        "--cut-after-chunks", type=int, default=0, help="chunks sent before `cut_stream` closes"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for error_rate and jitter")
    return parser


def settings_from_args(args: argparse.Namespace) -> MockSettings:
    """MockSettings from parsed build_arg_parser() options; raises ValueError when invalid."""
    return MockSettings(
        latency_ms=args.latency_ms,
        latency_jitter_ms=args.latency_jitter_ms,
        error_rate=args.error_rate,
        stream_chunks=args.stream_chunks,
        model_name=args.model_name,
        fault=args.fault,
        fault_count=args.fault_count,
        status=args.status,
        retry_after_s=args.retry_after_s,
        first_token_delay_ms=args.first_token_delay_ms,
        cut_after_chunks=args.cut_after_chunks,
        seed=args.seed,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        serve_mock_provider(args.host, args.port, settings, args.name)
    except OSError as exc:
        print(
            f"{parser.prog}: error: cannot listen on {args.host}:{args.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
