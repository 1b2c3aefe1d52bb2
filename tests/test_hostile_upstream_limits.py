"""A hostile or broken upstream against the limits: rate-limit headers and `usage` values
that are negative, huge, non-finite or not numbers at all. Nothing an upstream sends may
crash a request, keep a target out for an absurd time, or corrupt a client's counts."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from edgeroute.providers.base import (
    MAX_RESET_S,
    MAX_USAGE_TOKENS,
    Usage,
    UsageOnly,
    parse_limit_reset,
    parse_reset,
    parse_retry_after,
)
from tests.support.backends import GATEWAY_KINDS, gateway_state, table
from tests.support.gateway import get_json, running_app, running_gateway
from tests.test_learned_limits import _completion as completion

HOSTILE_TIMES = [
    "inf",
    "Infinity",
    "-inf",
    "nan",
    "1e999",
    "1e308",
    "-5",
    "99999999999h",
    "1h2m3s",
    "9999-12-31T23:59:59Z",
    "0001-01-01T00:00:00Z",
    "2027-13-45T99:99:99Z",
    "",
    "  ",
    "1_000_000_000",
    "\x00",
    "6m0s" * 1000,
]


@pytest.mark.parametrize("value", HOSTILE_TIMES)
def test_hostile_reset_and_retry_after_values_are_finite_and_capped(value: str) -> None:
    for seconds in (
        parse_reset(value),
        parse_retry_after(value),
        parse_retry_after(None, value),
        parse_limit_reset(
            {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": value}
        ),
        parse_limit_reset(
            {
                "anthropic-ratelimit-tokens-remaining": "0",
                "anthropic-ratelimit-tokens-reset": value,
            }
        ),
    ):
        assert math.isfinite(seconds) and 0.0 <= seconds <= MAX_RESET_S, (value, seconds)


def test_a_reset_within_the_cap_is_kept_as_said() -> None:
    assert parse_reset("1h2m3s") == 3723.0
    assert parse_retry_after("30") == 30.0


@pytest.mark.parametrize(
    "count",
    [b"-1", b"1e30", b'"12"', b"1.5", b"18446744073709551615", b"9" * 40, b"true"],
)
def test_usage_that_is_not_a_plausible_token_count_is_malformed(count: bytes) -> None:
    import msgspec

    body = b'{"usage":{"prompt_tokens":' + count + b',"completion_tokens":1}}'
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(body, type=UsageOnly)


def test_the_largest_plausible_usage_is_accepted() -> None:
    import msgspec

    body = b'{"usage":{"prompt_tokens":%d,"completion_tokens":0}}' % MAX_USAGE_TOKENS
    usage = msgspec.json.decode(body, type=UsageOnly).usage
    assert usage == Usage(MAX_USAGE_TOKENS, 0)


def _completion(model: str, usage: Any) -> dict[str, Any]:
    return {**completion(model), "usage": usage}


@asynccontextmanager
async def upstream(
    status: int, headers: Mapping[str, str], usage: Any, served: list[str], name: str
) -> AsyncIterator[str]:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        served.append(name)
        if status >= 400:
            return web.json_response(
                {"error": {"message": "slow down", "type": "requests", "code": None}},
                status=status,
                headers=headers,
            )
        return web.json_response(_completion(body["model"], usage), headers=headers)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    async with running_app(app) as url:
        yield f"{url}/v1"


@pytest.fixture(params=table(GATEWAY_KINDS))
def state_section(request: pytest.FixtureRequest) -> dict[str, Any]:
    return gateway_state(request, "hostile")


def _document(limited: str, spare: str, state: dict[str, Any]) -> dict[str, Any]:
    return {
        "providers": [
            {"name": "limited", "base_url": limited, "api_key": "k"},
            {"name": "spare", "base_url": spare, "api_key": "k"},
        ],
        "routes": [
            {
                "model": "chat",
                "strategy": "cost",
                "targets": [
                    {"provider": "limited", "model": "m", "id": "limited"},
                    {"provider": "spare", "model": "m", "id": "spare", "input_cost_per_mtok": 1},
                ],
            }
        ],
        **state,
    }


BODY = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
USAGE = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (429, {"Retry-After": "inf"}),
        (429, {"retry-after-ms": "1e999"}),
        (200, {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "Infinity"}),
        (
            200,
            {
                "anthropic-ratelimit-requests-remaining": "0",
                "anthropic-ratelimit-requests-reset": "9999-12-31T23:59:59Z",
            },
        ),
    ],
    ids=["retry-after-inf", "retry-after-ms-1e999", "reset-infinity", "reset-year-9999"],
)
async def test_an_absurd_limit_header_keeps_a_target_out_for_at_most_the_cap(
    status: int, headers: dict[str, str], state_section: dict[str, Any]
) -> None:
    served: list[str] = []
    async with (
        upstream(status, headers, USAGE, served, "limited") as limited,
        upstream(200, {}, USAGE, served, "spare") as spare,
        running_gateway(_document(limited, spare, state_section)) as (url, _),
        aiohttp.ClientSession() as session,
    ):
        statuses = []
        for _ in range(3):
            async with session.post(f"{url}/v1/chat/completions", json=BODY) as response:
                await response.read()
                statuses.append(response.status)
        assert statuses == [200, 200, 200]
        assert served[0] == "limited" and served[-1] == "spare"
        for _ in range(200):
            code, explained = await get_json(f"{url}/v1/routes/chat/explain")
            assert code == 200
            row = next(t for t in explained["targets"] if t["target"] == "limited")
            if row["excluded"] is not None:
                break
        assert row["excluded"] in ("learned_limit", "rate_limited", "retry_after"), row
        assert 0 < row["excluded_for_ms"] <= MAX_RESET_S * 1000, row


@pytest.mark.parametrize("usage", [{"prompt_tokens": 18446744073709551615}, {"prompt_tokens": -4}])
async def test_absurd_usage_fails_over_instead_of_being_counted(
    usage: dict[str, Any], state_section: dict[str, Any]
) -> None:
    served: list[str] = []
    async with (
        upstream(200, {}, usage, served, "limited") as limited,
        upstream(200, {}, USAGE, served, "spare") as spare,
        running_gateway(_document(limited, spare, state_section)) as (url, _),
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/chat/completions", json=BODY) as response,
    ):
        assert response.status == 200, await response.text()
        assert response.headers["x-edgeroute-provider"] == "spare"
        assert served == ["limited", "spare"]


@pytest.mark.parametrize("count", [-1, MAX_USAGE_TOKENS + 1, 10**40, "12", 1.5, True])
def test_anthropic_usage_out_of_range_is_malformed(count: Any) -> None:
    from edgeroute.providers.anthropic_translate import MalformedUpstream, messages_response_to_chat

    response = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude",
        "content": [{"type": "text", "text": "ok"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": count, "output_tokens": 1},
    }
    with pytest.raises(MalformedUpstream):
        messages_response_to_chat(response, model="claude", request_id="r")


@pytest.mark.parametrize(
    "max_tokens",
    [18446744073709551615, 10**30, -5, 1e30, "many", None, [1], 2.5],
    ids=["u64max", "1e30-int", "negative", "1e30-float", "string", "null", "list", "fraction"],
)
async def test_hostile_max_tokens_never_break_the_token_estimate(
    max_tokens: Any, state_section: dict[str, Any]
) -> None:
    """The estimate reserves against a target's and a client's tpm; whatever the client puts
    in max_tokens, the request is decided (the provider judges the value), and an estimate
    above a whole quota reserves that quota, as documented."""
    served: list[str] = []
    async with (
        upstream(200, {}, USAGE, served, "limited") as limited,
        upstream(200, {}, USAGE, served, "spare") as spare,
    ):
        document = _document(limited, spare, state_section)
        document["routes"][0]["targets"][0]["tpm"] = 1000
        document["server"] = {"clients": [{"name": "team", "key": "sk-team", "tpm": 5000}]}
        async with running_gateway(document) as (url, _), aiohttp.ClientSession() as session:
            body = {**BODY, "max_tokens": max_tokens}
            async with session.post(
                f"{url}/v1/chat/completions",
                json=body,
                headers={"Authorization": "Bearer sk-team"},
            ) as response:
                assert response.status == 200, await response.text()
        assert served == ["limited"]
