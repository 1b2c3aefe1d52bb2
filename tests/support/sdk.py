"""The official openai SDK as a test client: one code path per mode, sync in a worker thread.

The sync client blocks, so it runs in `asyncio.to_thread` while the gateway and the mock
upstreams keep serving on the test's event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal, Protocol

import openai

Mode = Literal["sync", "async"]


class Clients(Protocol):
    def sync_client(self) -> openai.OpenAI: ...

    def async_client(self) -> openai.AsyncOpenAI: ...


async def chat(clients: Clients, mode: Mode, **kwargs: Any) -> tuple[Any, dict[str, str]]:
    """A non-streaming chat completion: (parsed ChatCompletion, response headers)."""
    if mode == "sync":

        def call() -> tuple[Any, dict[str, str]]:
            with clients.sync_client() as client:
                raw = client.chat.completions.with_raw_response.create(**kwargs)
                return raw.parse(), dict(raw.headers)

        return await asyncio.to_thread(call)
    async with clients.async_client() as client:
        raw = await client.chat.completions.with_raw_response.create(**kwargs)
        return raw.parse(), dict(raw.headers)


async def stream(clients: Clients, mode: Mode, **kwargs: Any) -> tuple[list[Any], dict[str, str]]:
    """A streamed chat completion, fully consumed: (chunks, response headers)."""
    kwargs["stream"] = True
    if mode == "sync":

        def call() -> tuple[list[Any], dict[str, str]]:
            with clients.sync_client() as client:
                raw = client.chat.completions.with_raw_response.create(**kwargs)
                return list(raw.parse()), dict(raw.headers)

        return await asyncio.to_thread(call)
    async with clients.async_client() as client:
        raw = await client.chat.completions.with_raw_response.create(**kwargs)
        return [chunk async for chunk in raw.parse()], dict(raw.headers)
