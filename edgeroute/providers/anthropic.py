"""Anthropic's Messages API behind the OpenAI chat completions interface."""

from __future__ import annotations

from typing import Any

import aiohttp
import msgspec

from edgeroute.config import ProviderConfig
from edgeroute.providers.anthropic_translate import (
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
)
from edgeroute.providers.openai import post, read_body
from edgeroute.providers.sse import PrimedStream, event_data, event_name, split_events

ANTHROPIC_VERSION = "2023-06-01"
_encode = msgspec.json.encode
_decode = msgspec.json.decode


def _client_error(message: str, param: str | None = None) -> UpstreamError:
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    }
    return UpstreamError(ErrorClass.CLIENT, message, status=400, body=_encode(body))


class AnthropicStream(PrimedStream):
    """Translates Anthropic stream events into OpenAI chunks, ending with `[DONE]`."""

    def __init__(
        self, response: aiohttp.ClientResponse, translator: MessagesStreamTranslator
    ) -> None:
        super().__init__(response)
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
                except msgspec.DecodeError:
                    raise UpstreamError(
                        ErrorClass.BAD_RESPONSE, "upstream sent an event that is not JSON"
                    ) from None
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

    def __init__(self, config: ProviderConfig, session: aiohttp.ClientSession) -> None:
        self.name = config.name
        self.config = config
        self._session = session
        self._url = config.base_url.rstrip("/") + "/messages"
        self._headers = {
            "Content-Type": "application/json",
            "anthropic-version": ANTHROPIC_VERSION,
        }
        if config.api_key:
            self._headers["x-api-key"] = config.api_key
        self._headers.update(config.headers)
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.connect_timeout_s, sock_read=config.timeout_s
        )

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
        headers = self._headers
        if request.stream:
            headers = {**headers, "Accept": "text/event-stream"}
        try:
            response = await post(self._session, self._url, _encode(body), headers, self._timeout)
        except UpstreamError as exc:
            if exc.body:
                try:
                    exc.body = _encode(
                        anthropic_error_to_openai(exc.status or 500, _decode(exc.body))
                    )
                    exc.content_type = "application/json"
                except msgspec.DecodeError:
                    pass
            raise
        if request.stream:
            translator = MessagesStreamTranslator(
                model=request.model, include_usage=request.client_wants_usage
            )
            stream = AnthropicStream(response, translator)
            try:
                await stream.prime()
            except BaseException:
                await stream.aclose()
                raise
            return stream
        data = await read_body(response)
        try:
            chat = messages_response_to_chat(
                _decode(data), model=request.model, request_id=request.request_id
            )
        except (msgspec.DecodeError, KeyError, TypeError, ValueError):
            raise UpstreamError(
                ErrorClass.BAD_RESPONSE, "upstream answered 2xx with an unexpected body"
            ) from None
        usage = chat.get("usage") or {}
        return UpstreamReply(
            200,
            _encode(chat),
            "application/json",
            Usage(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)),
        )
