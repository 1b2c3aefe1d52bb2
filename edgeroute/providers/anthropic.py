"""Anthropic's Messages API behind the OpenAI chat completions interface."""

from __future__ import annotations

from typing import Any

import msgspec

from edgeroute.config import ProviderConfig
from edgeroute.providers.anthropic_translate import (
    CONTENT_FILTER_MARKERS,
    CONTEXT_LENGTH_MARKERS,
    MalformedUpstream,
    MessagesStreamTranslator,
    TranslationError,
    UpstreamStreamError,
    anthropic_error_to_openai,
    chat_request_to_messages,
    messages_response_to_chat,
)
from edgeroute.providers.base import (
    ErrorClass,
    UpstreamError,
    UpstreamReply,
    UpstreamRequest,
    Usage,
    parse_limit_reset,
)
from edgeroute.providers.http1 import Response, Timeouts, UpstreamClient
from edgeroute.providers.sse import (
    PrimedStream,
    StreamLimits,
    event_data,
    event_name,
    split_events,
)
from edgeroute.providers.transport import (
    expect_event_stream,
    post,
    read_body,
    request_headers,
)

ANTHROPIC_VERSION = "2023-06-01"
_encode = msgspec.json.encode
_decode = msgspec.json.decode
# msgspec recurses while decoding: too deep a document is RecursionError, not DecodeError.
_UNDECODABLE = (msgspec.DecodeError, RecursionError)


def _bad(message: str) -> UpstreamError:
    return UpstreamError(ErrorClass.BAD_RESPONSE, message)


class _ErrorDetail(msgspec.Struct):
    type: str | None = None
    message: str | None = None


class _ErrorBody(msgspec.Struct):
    error: _ErrorDetail | None = None


_ERROR_DECODER = msgspec.json.Decoder(_ErrorBody)


def recognise_error(body: bytes) -> ErrorClass | None:
    """Anthropic's 400 invalid_request_error says "prompt is too long: 210000 tokens >
    200000 maximum" for the context window and "Output blocked by content filtering
    policy" when its filter refuses."""
    try:
        detail = _ERROR_DECODER.decode(body).error
    except (msgspec.DecodeError, RecursionError):
        return None
    text = (detail.message or "").lower() if detail is not None else ""
    if any(marker in text for marker in CONTEXT_LENGTH_MARKERS):
        return ErrorClass.CONTEXT_WINDOW
    if any(marker in text for marker in CONTENT_FILTER_MARKERS):
        return ErrorClass.CONTENT_POLICY
    return None


def _client_error(message: str, param: str | None = None) -> UpstreamError:
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    }
    return UpstreamError(ErrorClass.CLIENT, message, status=400, body=_encode(body))


class AnthropicStream(PrimedStream):
    """Translates Anthropic stream events into OpenAI chunks, ending with `[DONE]`."""

    def __init__(
        self,
        response: Response,
        limits: StreamLimits,
        translator: MessagesStreamTranslator,
    ) -> None:
        super().__init__(response, limits)
        self._translator = translator
        self._done = False

    async def _next(self) -> bytes | None:
        while not self._done:
            block = await self._reader.read_block()
            if block is None:
                raise UpstreamError(ErrorClass.STREAM, "upstream stream ended before message_stop")
            out = bytearray()
            for event in split_events(block):
                name = event_name(event)
                try:
                    data = _decode(event_data(event) or b"{}")
                    chunks = self._translator.feed(name, data)
                except UpstreamStreamError as exc:
                    raise UpstreamError(
                        ErrorClass.STREAM, f"upstream stream error: {exc}"
                    ) from None
                except _UNDECODABLE:
                    raise _bad("upstream sent an event that is not JSON") from None
                except MalformedUpstream as exc:
                    raise _bad(f"upstream sent a malformed {name} event: {exc}") from None
                for chunk in chunks:
                    out += b"data: " + _encode(chunk) + b"\n\n"
                if name == "message_stop":
                    self._done = True
                    usage = self._translator.usage
                    self.usage = Usage(usage.prompt_tokens, usage.completion_tokens)
                    out += b"data: [DONE]\n\n"
                    break
            if out:
                return bytes(out)
        return None


class AnthropicAdapter:
    kind = "anthropic"

    def __init__(self, config: ProviderConfig, session: UpstreamClient) -> None:
        self.name = config.name
        self.config = config
        self._session = session
        self._url = config.base_url.rstrip("/") + "/messages"
        base = {"Content-Type": "application/json", "anthropic-version": ANTHROPIC_VERSION}
        if config.api_key:
            base["x-api-key"] = config.api_key
        self._headers, self._stream_headers = request_headers(base, config.headers)
        self._timeout = Timeouts(config.connect_timeout_s, config.timeout_s)
        self._limits = StreamLimits.of(config)

    async def send(self, request: UpstreamRequest) -> UpstreamReply | AnthropicStream:
        if request.endpoint != "chat":
            raise _client_error(
                f"provider {self.name!r} (anthropic) serves only /v1/chat/completions"
            )
        try:
            client_body: dict[str, Any] = {k: _decode(v) for k, v in request.fields.items()}
            body = chat_request_to_messages(client_body, model=request.model)
        except TranslationError as exc:
            raise UpstreamError(
                ErrorClass.CLIENT, str(exc), status=400, body=_encode(exc.to_openai())
            ) from None
        except RecursionError:
            # The gateway's parser bounds nesting; this is the backstop if that bound grows.
            raise _client_error("request JSON is nested too deeply") from None
        headers = self._stream_headers if request.stream else self._headers
        if request.extra_headers:
            headers = headers.with_extra(request.extra_headers)
        try:
            response = await post(self._session, self._url, _encode(body), headers, self._timeout)
        except UpstreamError as exc:
            exc.recognise(recognise_error)
            if exc.body:
                try:
                    exc.body = _encode(
                        anthropic_error_to_openai(exc.status or 500, _decode(exc.body))
                    )
                    exc.content_type = "application/json"
                except _UNDECODABLE:
                    pass
            raise
        if request.stream:
            translator = MessagesStreamTranslator(
                model=request.model, include_usage=request.client_wants_usage
            )
            expect_event_stream(response)
            stream = AnthropicStream(response, self._limits, translator)
            try:
                await stream.prime()
            except BaseException:
                await stream.aclose()
                raise
            return stream
        data = await read_body(response, self.config.max_response_bytes)
        try:
            chat = messages_response_to_chat(
                _decode(data), model=request.model, request_id=request.request_id
            )
        except _UNDECODABLE:
            raise _bad("upstream answered 2xx with a body that is not JSON") from None
        except MalformedUpstream as exc:
            raise _bad(f"upstream answered 2xx with a malformed message: {exc}") from None
        usage = chat["usage"]  # built by the translation: non-negative ints
        return UpstreamReply(
            200,
            _encode(chat),
            "application/json",
            Usage(usage["prompt_tokens"], usage["completion_tokens"]),
            parse_limit_reset(response.headers),
        )
