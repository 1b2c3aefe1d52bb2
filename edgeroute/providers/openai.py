"""OpenAI-compatible upstreams: OpenAI, vLLM, Ollama, Groq, Together, OpenRouter, and Azure."""

from __future__ import annotations

from typing import Any

import aiohttp
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
    classify_status,
    parse_retry_after,
)
from edgeroute.providers.sse import PrimedStream, event_data, split_events

_INCLUDE_USAGE = msgspec.Raw(b'{"include_usage":true}')
_USAGE_DECODER = msgspec.json.Decoder(UsageOnly)


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    client_timeout: aiohttp.ClientTimeout,
) -> aiohttp.ClientResponse:
    """POST and classify transport failures; an HTTP error status is raised as UpstreamError."""
    try:
        response = await session.post(url, data=body, headers=headers, timeout=client_timeout)
    except TimeoutError:
        raise UpstreamError(ErrorClass.TIMEOUT, "upstream timed out before answering") from None
    except aiohttp.ClientError as exc:
        raise UpstreamError(
            ErrorClass.CONNECT, f"cannot reach upstream: {type(exc).__name__}"
        ) from None
    if response.status >= 400:
        try:
            data = await response.read()
        except (aiohttp.ClientError, TimeoutError):
            data = b""
        finally:
            response.release()
        raise UpstreamError(
            classify_status(response.status),
            f"upstream answered {response.status}",
            status=response.status,
            body=data,
            content_type=response.headers.get("Content-Type", "application/json"),
            retry_after_s=parse_retry_after(
                response.headers.get("Retry-After"), response.headers.get("retry-after-ms")
            ),
        )
    return response


async def read_body(response: aiohttp.ClientResponse) -> bytes:
    try:
        return await response.read()
    except TimeoutError:
        raise UpstreamError(ErrorClass.TIMEOUT, "upstream stalled mid-response") from None
    except aiohttp.ClientError as exc:
        raise UpstreamError(
            ErrorClass.STREAM, f"upstream response broke: {type(exc).__name__}"
        ) from None
    finally:
        response.release()


class OpenAIStream(PrimedStream):
    """Passes OpenAI SSE through, reading usage from the final chunk on the way.

    When edgeroute (not the client) asked for usage, the usage-only chunk is dropped so
    the client sees exactly the stream it asked for.
    """

    def __init__(self, response: aiohttp.ClientResponse, *, strip_usage_chunk: bool) -> None:
        super().__init__(response)
        self._strip = strip_usage_chunk
        self._done = False

    async def _next(self) -> bytes | None:
        while True:
            block = await self._reader.read_block()
            if block is None:
                if not self._done:
                    raise UpstreamError(ErrorClass.STREAM, "upstream stream ended without [DONE]")
                return None
            if b'"usage":{' in block or b'"usage": {' in block or b"[DONE]" in block:
                block = self._inspect(block)
            if block:
                return block

    def _inspect(self, block: bytes) -> bytes:
        kept = []
        for event in split_events(block):
            data = event_data(event)
            if data == b"[DONE]":
                self._done = True
            elif b'"usage"' in data:
                try:
                    usage = _USAGE_DECODER.decode(data).usage
                except msgspec.DecodeError:
                    usage = None
                if usage is not None:
                    self.usage = usage
                    if self._strip and (b'"choices":[]' in data or b'"choices": []' in data):
                        continue
            kept.append(event)
        return b"".join(event + b"\n\n" for event in kept)


class OpenAIAdapter:
    """Any OpenAI-compatible base URL: the body goes out as the client sent it, model swapped."""

    kind = "openai"

    def __init__(self, config: ProviderConfig, session: aiohttp.ClientSession) -> None:
        self.name = config.name
        self.config = config
        self._session = session
        self._base = config.base_url.rstrip("/")
        self._headers = {"Content-Type": "application/json", **self._auth_headers(config)}
        self._headers.update(config.headers)
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.connect_timeout_s, sock_read=config.timeout_s
        )

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
        headers = self._headers
        if request.stream:
            headers = {**headers, "Accept": "text/event-stream"}
        response = await post(
            self._session, self.url(request), request.body(**overrides), headers, self._timeout
        )
        if request.stream:
            stream = OpenAIStream(response, strip_usage_chunk=bool(inject_usage))
            try:
                await stream.prime()
            except BaseException:
                await stream.aclose()
                raise
            return stream
        data = await read_body(response)
        try:
            usage = _USAGE_DECODER.decode(data).usage or Usage()
        except msgspec.DecodeError:
            raise UpstreamError(
                ErrorClass.BAD_RESPONSE, "upstream answered 2xx with a body that is not JSON"
            ) from None
        return UpstreamReply(
            response.status, data, response.headers.get("Content-Type", "application/json"), usage
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
