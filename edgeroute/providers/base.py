"""What every provider adapter speaks: requests in, replies or streams out, classified errors.

The proxy never looks inside an upstream's API: it hands an adapter the client's request
(top-level JSON fields kept as raw bytes, so nothing it does not touch is re-encoded) and
gets back either a complete OpenAI-shaped reply, an OpenAI-shaped SSE stream, or an
UpstreamError that says how the failure counts.
"""

from __future__ import annotations

import email.utils
import enum
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Literal, Protocol

import msgspec

from edgeroute.failover import Cause
from edgeroute.types import OutcomeKind

Endpoint = Literal["chat", "completions", "embeddings"]
ENDPOINT_PATHS: dict[str, str] = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
}


class ErrorClass(enum.Enum):
    CONNECT = "connect_error"
    TIMEOUT = "timeout"
    SERVER = "server_error"
    RATE_LIMITED = "rate_limited"
    CLIENT = "client_error"
    REJECTED = "upstream_rejected"  # 401/403/404: our key or deployment is wrong, not the client
    STREAM = "stream_error"
    BAD_RESPONSE = "bad_response"
    TOO_LARGE = "response_too_large"  # a body or one SSE event over the provider's bound
    # Client errors an adapter recognises in the upstream's error body: the prompt is too
    # long for this model, or the provider's content filter refused it. Another route may
    # take them (routes[].context_window_fallbacks / content_policy_fallbacks).
    CONTEXT_WINDOW = "context_window_exceeded"
    CONTENT_POLICY = "content_policy_violation"


_OUTCOMES = {
    ErrorClass.RATE_LIMITED: OutcomeKind.RATE_LIMITED,
    # The request's fault, not the target's: a breaker never hears of them.
    ErrorClass.CLIENT: OutcomeKind.NEUTRAL,
    ErrorClass.CONTEXT_WINDOW: OutcomeKind.NEUTRAL,
    ErrorClass.CONTENT_POLICY: OutcomeKind.NEUTRAL,
}
_CAUSES: dict[ErrorClass, Cause] = {
    ErrorClass.CONTEXT_WINDOW: "context_window",
    ErrorClass.CONTENT_POLICY: "content_policy",
}


class UpstreamError(Exception):
    """An attempt failed. `status`/`body` are the upstream's when it answered at all."""

    def __init__(
        self,
        error_class: ErrorClass,
        message: str,
        *,
        status: int | None = None,
        body: bytes | None = None,
        content_type: str = "application/json",
        retry_after_s: float = 0.0,
        limit_reset_s: float = 0.0,
    ) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.message = message
        self.status = status
        self.body = body
        self.content_type = content_type
        self.retry_after_s = retry_after_s
        # The provider's rate-limit headers said 0 remaining, refilled in this many seconds.
        self.limit_reset_s = limit_reset_s

    @property
    def retryable(self) -> bool:
        """A client error is the client's to fix: another target of the route would not help
        (a fallback route named for its cause may: see `fallback`)."""
        return self.error_class not in (
            ErrorClass.CLIENT,
            ErrorClass.CONTEXT_WINDOW,
            ErrorClass.CONTENT_POLICY,
        )

    @property
    def outcome(self) -> OutcomeKind:
        return _OUTCOMES.get(self.error_class, OutcomeKind.FAILURE)

    @property
    def fallback(self) -> Cause | None:
        """The fallback list that may take this request elsewhere, if any."""
        return _CAUSES.get(self.error_class)

    def recognise(self, read: Callable[[bytes], ErrorClass | None]) -> None:
        """Reclassify a client error by what the adapter's `read` finds in its body (None:
        nothing it knows). Status and body stay the upstream's: without a fallback for the
        new class the client still gets them unchanged."""
        if self.error_class is ErrorClass.CLIENT and self.body:
            found = read(self.body)
            if found is not None:
                self.error_class = found


# Token counts feed Prometheus counters and cost sums: a negative or non-integer count from
# an upstream is a malformed answer, refused when decoded rather than crashing later.
# An upper bound no real answer reaches (a billion tokens in one request): beyond it the counts
# would overflow the integers Lua keeps in Redis, or empty a client's budget at once.
MAX_USAGE_TOKENS = 10**9
TokenCount = Annotated[int, msgspec.Meta(ge=0, le=MAX_USAGE_TOKENS)]


class Usage(msgspec.Struct, omit_defaults=True):
    prompt_tokens: TokenCount = 0
    completion_tokens: TokenCount = 0


class UsageOnly(msgspec.Struct):
    """Decodes just `usage` out of a whole response: msgspec skips the rest unparsed."""

    usage: Usage | None = None


@dataclass(slots=True)
class UpstreamRequest:
    endpoint: Endpoint
    fields: dict[str, msgspec.Raw]  # the client's top-level JSON fields, raw
    model: str  # the target's model name, replacing the client's route name
    stream: bool
    client_wants_usage: bool
    request_id: str
    # Headers for this attempt only, e.g. the W3C `traceparent` of its span (tracing on).
    extra_headers: dict[str, str] | None = None
    # Encoded bodies by target model: a failover to a target of the same model reuses one.
    _bodies: dict[str, bytes] = field(default_factory=dict)

    def body(self, **overrides: object) -> bytes:
        """The client's body with `model` (and `overrides`) replaced; the rest byte for byte.

        Re-encoding the object around the raw values (rather than splicing the model into
        the client's bytes) is what keeps odd JSON valid: duplicate keys collapse to one,
        escaped keys are written plainly, and `model` appears exactly once."""
        if not overrides:
            cached = self._bodies.get(self.model)
            if cached is None:
                cached = self._bodies[self.model] = self._encode(overrides)
            return cached
        return self._encode(overrides)

    def _encode(self, overrides: dict[str, object]) -> bytes:
        fields: dict[str, object] = dict(self.fields)
        fields["model"] = self.model
        fields.update(overrides)
        return msgspec.json.encode(fields)


@dataclass(slots=True)
class UpstreamReply:
    status: int
    body: bytes
    content_type: str
    usage: Usage = field(default_factory=Usage)
    limit_reset_s: float = 0.0  # see parse_limit_reset


class UpstreamStream(Protocol):
    """An OpenAI-shaped SSE stream, already past its first chunk (which it holds)."""

    status: int
    usage: Usage
    limit_reset_s: float  # see parse_limit_reset

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class ProviderAdapter(Protocol):
    name: str
    kind: str

    async def send(self, request: UpstreamRequest) -> UpstreamReply | UpstreamStream:
        """Perform one attempt; raise UpstreamError (classified) when it fails."""
        ...


# The longest wait an upstream's header may ask for (Retry-After, a rate-limit reset). The
# state bounds a cooldown further (`max_cooldown_ms`); this bound keeps the seconds finite
# and sane before they get there: "inf", "1e999" or a reset in the year 9999 is a day.
MAX_RESET_S = 86_400.0


def _bounded(seconds: float) -> float:
    """0..MAX_RESET_S; NaN (no wait anyone can read) is 0."""
    if math.isnan(seconds):
        return 0.0
    return min(max(0.0, seconds), MAX_RESET_S)


def parse_retry_after(value: str | None, value_ms: str | None = None) -> float:
    """Seconds from `retry-after-ms`, `Retry-After: <seconds>` or an HTTP date; 0 if absent."""
    if value_ms:
        try:
            return _bounded(float(value_ms) / 1000.0)
        except ValueError:
            pass
    if not value:
        return 0.0
    try:
        return _bounded(float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):
        return 0.0
    return _bounded(when.timestamp() - time.time())


MAX_RESET_S = 86_400.0
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
# Which headers say a provider's budget is spent, and when it refills, per API family:
# (remaining header, reset header). OpenAI and Azure send durations ("6m0s", "1s", "20ms");
# Anthropic sends RFC 3339 instants.
_LIMIT_HEADERS = (
    ("x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"),
    ("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"),
    ("anthropic-ratelimit-requests-remaining", "anthropic-ratelimit-requests-reset"),
    ("anthropic-ratelimit-tokens-remaining", "anthropic-ratelimit-tokens-reset"),
    ("anthropic-ratelimit-input-tokens-remaining", "anthropic-ratelimit-input-tokens-reset"),
    ("anthropic-ratelimit-output-tokens-remaining", "anthropic-ratelimit-output-tokens-reset"),
)
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_reset(value: str, now: float | None = None) -> float:
    """Seconds until a rate-limit reset: an OpenAI duration ("6m0s", "1.5s", "20ms"), plain
    seconds, or an RFC 3339 instant (Anthropic); 0 when it cannot be read."""
    value = value.strip()
    try:
        return _bounded(float(value))
    except ValueError:
        pass
    parts = _DURATION.findall(value)
    if parts and "".join(n + u for n, u in parts) == value:
        return _bounded(sum(float(n) * _UNITS[u] for n, u in parts))
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, OverflowError):
        return 0.0
    if when.tzinfo is None:
        return 0.0
    return _bounded(when.timestamp() - (time.time() if now is None else now))


def parse_limit_reset(headers: Mapping[str, str], now: float | None = None) -> float:
    """How long the provider says its budget stays spent: the latest reset among the limits
    whose remaining count is 0 (a request needs all of them), or 0 when none is spent."""
    longest = 0.0
    for remaining_name, reset_name in _LIMIT_HEADERS:
        remaining = headers.get(remaining_name)
        if remaining is None or remaining.strip() != "0":
            continue
        reset = headers.get(reset_name)
        if reset is not None:
            longest = max(longest, parse_reset(reset, now))
    return longest


def classify_status(status: int) -> ErrorClass:
    if status == 429:
        return ErrorClass.RATE_LIMITED
    if status in (401, 403, 404):
        # The client's credentials never travel upstream and the path is ours: a refusal
        # here is a provider misconfiguration, and another provider may well succeed.
        return ErrorClass.REJECTED
    if status in (408, 409) or status >= 500:
        # 408/409 are the upstream's trouble (timeouts, overload on some vLLM builds).
        return ErrorClass.SERVER
    return ErrorClass.CLIENT
