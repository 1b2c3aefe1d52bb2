"""OpenAI-compatible upstreams: OpenAI, vLLM, Ollama, Groq, Together, OpenRouter, and Azure."""

from __future__ import annotations

from typing import Any

import msgspec

from edgeroute.config import ProviderConfig
from edgeroute.providers.base import (
    ENDPOINT_PATHS,
    ErrorClass,
    UpstreamError,
    UpstreamReply,
    UpstreamRequest,
    Usage,
    UsageOnly,
    parse_limit_reset,
)
from edgeroute.providers.http1 import Response, Timeouts, UpstreamClient
from edgeroute.providers.sse import PrimedStream, StreamLimits, event_data, split_events
from edgeroute.providers.transport import (
    expect_event_stream,
    post,
    read_body,
    request_headers,
)

_INCLUDE_USAGE = msgspec.Raw(b'{"include_usage":true}')
_USAGE_DECODER = msgspec.json.Decoder(UsageOnly)
# What decoding an upstream's JSON can raise besides DecodeError: msgspec recurses, so a
# document nested deeper than the interpreter allows is RecursionError.
_MALFORMED = (msgspec.DecodeError, RecursionError)
_SSE_FIELDS = (b"data:", b"event:", b"id:", b"retry:", b":")


def _bad(message: str) -> UpstreamError:
    return UpstreamError(ErrorClass.BAD_RESPONSE, message)


class _InnerError(msgspec.Struct):
    code: str | None = None


class _ErrorDetail(msgspec.Struct):
    message: str | None = None
    code: str | int | None = None  # vLLM puts the HTTP status here
    innererror: _InnerError | None = None


class _ErrorBody(msgspec.Struct):
    """{"error": {...}} (OpenAI, Azure, vLLM); older vLLM has message and code at the top."""

    error: _ErrorDetail | str | None = None
    message: str | None = None


_ERROR_DECODER = msgspec.json.Decoder(_ErrorBody)
# How OpenAI-compatible servers say the prompt does not fit: OpenAI and Azure by code, vLLM
# only in words ("This model's maximum context length is 4096 tokens. However, you
# requested ..." from its OpenAI server; "The decoder prompt (length 5000) is longer than the
# maximum model length of 4096." from its engine).
_CONTEXT_CODES = frozenset({"context_length_exceeded"})
_CONTEXT_PHRASES = ("maximum context length is", "longer than the maximum model length")
# A refusal by the content filter: OpenAI's `content_policy_violation`, Azure's
# `content_filter` with innererror `ResponsibleAIPolicyViolation`.
_CONTENT_CODES = frozenset({"content_filter", "content_policy_violation"})
_CONTENT_INNER_CODES = frozenset({"ResponsibleAIPolicyViolation"})


def recognise_error(body: bytes) -> ErrorClass | None:
    """A context-window or content-policy refusal in an OpenAI-compatible error body."""
    try:
        document = _ERROR_DECODER.decode(body)
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        return None
    detail = document.error if isinstance(document.error, _ErrorDetail) else None
    code = detail.code if detail is not None else None
    inner = detail.innererror.code if detail is not None and detail.innererror else None
    message = detail.message if detail is not None else None
    if isinstance(document.error, str):
        message = document.error
    text = (message or document.message or "").lower()
    if code in _CONTEXT_CODES:
        return ErrorClass.CONTEXT_WINDOW
    # The words count only where the error has no code of its own (vLLM puts the HTTP status
    # there): a message under another code may merely quote them, e.g. echoing the client's
    # own text, and must not send the request down the context-window chain.
    if not isinstance(code, str) and any(phrase in text for phrase in _CONTEXT_PHRASES):
        return ErrorClass.CONTEXT_WINDOW
    if code in _CONTENT_CODES or inner in _CONTENT_INNER_CODES:
        return ErrorClass.CONTENT_POLICY
    return None


class OpenAIStream(PrimedStream):
    """Passes OpenAI SSE through, reading usage from the final chunk on the way.

    When edgeroute (not the client) asked for usage, the usage-only chunk is dropped so
    the client sees exactly the stream it asked for.
    """

    def __init__(
        self, response: Response, limits: StreamLimits, *, strip_usage_chunk: bool
    ) -> None:
        super().__init__(response, limits)
        self._strip = strip_usage_chunk
        self._done = False
        self._checked_first = False

    async def _next(self) -> bytes | None:
        while True:
            block = await self._reader.read_block()
            if block is None:
                if not self._done:
                    raise UpstreamError(ErrorClass.STREAM, "upstream stream ended without [DONE]")
                return None
            if not self._checked_first:
                # Before the first byte goes out: is this OpenAI's stream at all? (A JSON
                # document or an HTML page relabelled as SSE fails over here.)
                self._check_first(block)
            elif b"data: [" in block or b"data:[" in block:
                self._check_arrays(block)
            if b'"usage":{' in block or b'"usage": {' in block or b"[DONE]" in block:
                block = self._inspect(block)
            if block:
                return block

    def _check_first(self, block: bytes) -> None:
        for event in split_events(block):
            for line in event.split(b"\n"):
                if line and not line.startswith(_SSE_FIELDS):
                    raise _bad("upstream stream is not Server-Sent Events")
            data = event_data(event)
            if not data:
                continue  # a comment or a keep-alive: nothing to judge yet
            if data != b"[DONE]":
                try:
                    msgspec.json.decode(data, type=dict[str, msgspec.Raw])
                except _MALFORMED:
                    raise _bad("upstream stream data is not a JSON object") from None
            self._checked_first = True
            return

    def _check_arrays(self, block: bytes) -> None:
        """Chunks are passed through unparsed; one that is a JSON array is refused."""
        for event in split_events(block):
            data = event_data(event)
            if data.startswith(b"[") and data != b"[DONE]":
                raise _bad("upstream stream data is a JSON array, not a chunk object")

    def _inspect(self, block: bytes) -> bytes:
        kept = []
        for event in split_events(block):
            data = event_data(event)
            if data == b"[DONE]":
                self._done = True
            elif b'"usage"' in data:
                try:
                    usage = _USAGE_DECODER.decode(data).usage
                except _MALFORMED:
                    # Token counts feed metrics, cost and TPM quotas: garbage here is an
                    # upstream fault, not something to count as zero.
                    raise _bad("upstream stream chunk with malformed usage") from None
                if usage is not None:
                    self.usage = usage
                    if self._strip and (b'"choices":[]' in data or b'"choices": []' in data):
                        continue
            kept.append(event)
        return b"".join(event + b"\n\n" for event in kept)


class OpenAIAdapter:
    """Any OpenAI-compatible base URL: the body goes out as the client sent it, model swapped."""

    kind = "openai"

    def __init__(self, config: ProviderConfig, session: UpstreamClient) -> None:
        self.name = config.name
        self.config = config
        self._session = session
        self._base = config.base_url.rstrip("/")
        self._headers, self._stream_headers = request_headers(
            {"Content-Type": "application/json", **self._auth_headers(config)}, config.headers
        )
        self._timeout = Timeouts(config.connect_timeout_s, config.timeout_s)
        self._limits = StreamLimits.of(config)

    @staticmethod
    def _auth_headers(config: ProviderConfig) -> dict[str, str]:
        return {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}

    def url(self, request: UpstreamRequest) -> str:
        return self._base + ENDPOINT_PATHS[request.endpoint]

    async def send(self, request: UpstreamRequest) -> UpstreamReply | OpenAIStream:
        overrides: dict[str, Any] = {}
        inject_usage = (
            request.stream
            and self.config.stream_usage
            and request.endpoint != "embeddings"
            and "stream_options" not in request.fields
        )
        if inject_usage:
            overrides["stream_options"] = _INCLUDE_USAGE
        headers = self._stream_headers if request.stream else self._headers
        if request.extra_headers:
            headers = headers.with_extra(request.extra_headers)
        try:
            response = await post(
                self._session, self.url(request), request.body(**overrides), headers, self._timeout
            )
        except UpstreamError as exc:
            exc.recognise(recognise_error)
            raise
        if request.stream:
            expect_event_stream(response)
            stream = OpenAIStream(response, self._limits, strip_usage_chunk=bool(inject_usage))
            try:
                await stream.prime()
            except BaseException:
                await stream.aclose()
                raise
            return stream
        data = await read_body(response, self.config.max_response_bytes)
        try:
            usage = _USAGE_DECODER.decode(data).usage or Usage()
        except _MALFORMED:
            raise _bad(
                "upstream answered 2xx with a body that is not a JSON object with valid usage"
            ) from None
        return UpstreamReply(
            response.status,
            data,
            response.headers.get("Content-Type", "application/json"),
            usage,
            parse_limit_reset(response.headers),
        )


class AzureAdapter(OpenAIAdapter):
    """Azure OpenAI: deployment URLs, `api-version`, and an `api-key` header."""

    kind = "azure"

    @staticmethod
    def _auth_headers(config: ProviderConfig) -> dict[str, str]:
        return {"api-key": config.api_key} if config.api_key else {}

    def url(self, request: UpstreamRequest) -> str:
        return (
            f"{self._base}/openai/deployments/{request.model}{ENDPOINT_PATHS[request.endpoint]}"
            f"?api-version={self.config.api_version}"
        )
