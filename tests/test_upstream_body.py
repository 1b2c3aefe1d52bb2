"""The body that goes upstream: the client's JSON with `model` replaced, valid whatever came in.

The gateway keeps the client's top-level fields raw and re-encodes only the object around
them, once per target model (a failover to a target of the same model sends the same bytes).
Odd but legal JSON must still leave as one valid object naming the target's model exactly
once: duplicate keys, escaped keys and values, whitespace. Real HTTP on loopback both ways.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from edgeroute.providers.base import UpstreamRequest
from tests.support.gateway import running_app, running_gateway

REPLY = {
    "id": "c",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


class Upstream:
    """Records each raw body; the first `fail_first` requests get a 500."""

    def __init__(self, fail_first: int = 0) -> None:
        self.bodies: list[bytes] = []
        self.fail_first = fail_first

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.read())
        if len(self.bodies) <= self.fail_first:
            return web.json_response({"error": {"message": "boom"}}, status=500)
        return web.json_response(REPLY)


@asynccontextmanager
async def gateway(*upstreams: Upstream, model: str = "target-m") -> AsyncIterator[str]:
    """One route `chat` over one target per upstream, all serving `model`, in order."""
    apps = []
    for upstream in upstreams:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", upstream.handle)
        apps.append(app)
    async with _serve(apps) as urls:
        document = {
            "providers": [{"name": f"p{i}", "base_url": f"{url}/v1"} for i, url in enumerate(urls)],
            "routes": [
                {
                    "model": "chat",
                    "strategy": "cost",
                    "targets": [
                        {
                            "provider": f"p{i}",
                            "model": model,
                            "id": f"t{i}",
                            "input_cost_per_mtok": i + 1,
                        }
                        for i in range(len(urls))
                    ],
                }
            ],
        }
        async with running_gateway(document) as (url, _app):
            yield url


@asynccontextmanager
async def _serve(apps: list[web.Application]) -> AsyncIterator[list[str]]:
    if not apps:
        yield []
        return
    async with running_app(apps[0]) as url, _serve(apps[1:]) as rest:
        yield [url, *rest]


async def post(url: str, body: bytes) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{url}/v1/chat/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        ) as response,
    ):
        await response.read()
        return response.status


def pairs(body: bytes) -> list[tuple[str, Any]]:
    """Every top-level key/value pair as sent, duplicates kept."""
    found: list[tuple[str, Any]] = []

    def hook(items: list[tuple[str, Any]]) -> dict[str, Any]:
        found[:] = items  # the outermost object is decoded last
        return dict(items)

    json.loads(body, object_pairs_hook=hook)
    return found


ODD_BODIES = {
    "duplicate-model": b'{"model":"nope","messages":[{"role":"user","content":"hi"}],'
    b'"model":"chat"}',
    "escaped-value": b'{"messages":[{"role":"user","content":"hi"}],"model":"\\u0063hat"}',
    "escaped-key": b'{"messages":[{"role":"user","content":"hi"}],"mod\\u0065l":"chat"}',
    "whitespace": b' {\n "model" : "chat" ,\t"messages":[{"role":"user","content":"hi"}] }\n',
    "model-in-content": b'{"messages":[{"role":"user","content":"\\"model\\":\\"x\\""}],'
    b'"model":"chat","metadata":{"model":"inner"}}',
}


@pytest.mark.parametrize("name", sorted(ODD_BODIES))
async def test_odd_json_leaves_as_one_valid_object_with_the_targets_model(name: str) -> None:
    upstream = Upstream()
    async with gateway(upstream, model='target "m" \u00e9') as url:
        assert await post(url, ODD_BODIES[name]) == 200
    (sent,) = upstream.bodies
    sent_pairs = pairs(sent)
    keys = [key for key, _ in sent_pairs]
    assert keys.count("model") == 1
    assert dict(sent_pairs)["model"] == 'target "m" \u00e9'
    client = json.loads(ODD_BODIES[name])
    assert {k: v for k, v in sent_pairs if k != "model"} == {
        k: v for k, v in client.items() if k != "model"
    }


async def test_a_failover_to_the_same_model_sends_the_same_bytes() -> None:
    first, second = Upstream(fail_first=1), Upstream()
    body = b'{"messages":[{"role":"user","content":"caf\\u00e9"}],"model":"chat","n":1}'
    async with gateway(first, second) as url:
        assert await post(url, body) == 200
    assert len(first.bodies) == 1
    assert second.bodies == first.bodies
    assert json.loads(first.bodies[0]) == {
        "messages": [{"role": "user", "content": "caf\u00e9"}],
        "model": "target-m",
        "n": 1,
    }


def test_the_body_is_encoded_once_per_target_model() -> None:
    raw = b'{"model":"chat","messages":[],"model":"chat2"}'
    fields = msgspec.json.decode(raw, type=dict[str, msgspec.Raw])
    request = UpstreamRequest("chat", fields, "a", False, False, "id")
    first = request.body()
    assert request.body() is first
    request.model = "b"
    assert json.loads(request.body()) == {"model": "b", "messages": []}
    request.model = "a"
    assert request.body() is first
    with_override = request.body(stream_options=msgspec.Raw(b'{"include_usage":true}'))
    assert json.loads(with_override)["stream_options"] == {"include_usage": True}
    assert request.body() is first
