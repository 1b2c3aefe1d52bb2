"""Fallback chains (`routes[].fallbacks`) and error-class fallbacks
(`context_window_fallbacks`, `content_policy_fallbacks`), end to end: `edgeroute serve` as a
real process, mock upstreams on loopback, the official OpenAI SDK as the client. What the
client got (status, `x-edgeroute-*` headers) is checked against what each upstream received,
what explain says, the metrics and the access line; the library's `Router.call` walks the
same chains.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from edgeroute.config import ConfigErrors, parse_config
from edgeroute.mock_provider import MockSettings
from edgeroute.router import AttemptFailed, Router
from edgeroute.strategy import Candidate
from edgeroute.types import OutcomeKind
from tests.support.backends import GATEWAY_KINDS, gateway_state, table
from tests.support.gateway import (
    GatewayProcess,
    gateway_config,
    gateway_process,
    get_json,
    mock_upstreams,
)

pytestmark = pytest.mark.slow

MESSAGES: list[Any] = [{"role": "user", "content": "fall back, please"}]


def route(name: str, *providers: str, **extra: Any) -> dict[str, Any]:
    """A cost route over one target per provider (config order: no prices, ties keep it)."""
    return {
        "model": name,
        "strategy": "cost",
        "targets": [{"provider": p, "model": f"{p}-model", "id": p} for p in providers],
        **extra,
    }


@pytest.fixture(params=table(GATEWAY_KINDS))
def state_section(request: pytest.FixtureRequest) -> dict[str, Any]:
    return gateway_state(request, "fallbacks")


def client(process: GatewayProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{process.url}/v1", api_key="k", max_retries=0, timeout=30)


async def metric(process: GatewayProcess, name: str, **labels: str) -> float:
    """One sample of the gateway's /metrics (0 when the child does not exist yet)."""
    async with aiohttp.ClientSession() as session, session.get(f"{process.url}/metrics") as r:
        text = await r.text()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{"):
            sample, value = line.rsplit(" ", 1)
            got = sample[len(name) + 1 : -1].split(",")
            if ",".join(sorted(got)) == want:
                return float(value)
    return 0.0


def access_lines(process: GatewayProcess) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for line in process.log().splitlines()
        if line.startswith("{") and '"request_id"' in line
    ]


async def access_line(process: GatewayProcess, request_id: str) -> dict[str, Any]:
    """The access line of `request_id`: a writer thread writes them off the event loop, so
    the line may land a moment after the response."""
    deadline = time.monotonic() + 10.0
    while True:
        for line in access_lines(process):
            if line["request_id"] == request_id:
                return line
        assert time.monotonic() < deadline, f"no access line for {request_id}"
        await asyncio.sleep(0.02)


async def explain(process: GatewayProcess, name: str) -> dict[str, Any]:
    status, body = await get_json(f"{process.url}/v1/routes/{name}/explain")
    assert status == 200, body
    result: dict[str, Any] = body
    return result


# ---- item 2: a chain of routes ------------------------------------------------------------


async def test_chain_of_three_routes_exhausts_into_the_third(
    tmp_path: Path, state_section: dict[str, Any]
) -> None:
    sick = MockSettings(error_rate=1.0)
    async with mock_upstreams(a1=sick, a2=sick, b1=sick, c1=MockSettings()) as mocks:
        document = gateway_config(
            mocks,
            [
                route("a", "a1", "a2", fallbacks=["b"]),
                route("b", "b1", fallbacks=["c"]),
                route("c", "c1"),
            ],
            breaker={"failure_threshold": 2, "open_timeout_s": 120},
            **state_section,
        )
        async with gateway_process(document, tmp_path) as process:
            raw = await client(process).chat.completions.with_raw_response.create(
                model="a", messages=MESSAGES, extra_headers={"x-request-id": "chain-1"}
            )
            assert raw.http_response.status_code == 200
            assert raw.headers["x-edgeroute-route"] == "c"
            assert raw.headers["x-edgeroute-provider"] == "c1"
            # a1, a2 (route a's round), b1, then c1 answered: every attempt of the chain.
            assert raw.headers["x-edgeroute-attempts"] == "4"
            assert "c1" in (raw.parse().choices[0].message.content or "")
            assert [await mocks[m].requests() for m in ("a1", "a2", "b1", "c1")] == [1, 1, 1, 1]

            assert (
                await metric(
                    process, "edgeroute_fallbacks_total", route="a", to_route="b", cause="exhausted"
                )
                == 1
            )
            assert (
                await metric(
                    process, "edgeroute_fallbacks_total", route="b", to_route="c", cause="exhausted"
                )
                == 1
            )
            assert (
                await metric(
                    process,
                    "edgeroute_requests_total",
                    route="c",
                    provider="c1",
                    model="c1-model",
                    outcome="success",
                )
                == 1
            )

            # Route a's targets have failed twice now (threshold 2) after a second request:
            # then a and b are skipped without an attempt, straight to c.
            await client(process).chat.completions.create(model="a", messages=MESSAGES)
            raw = await client(process).chat.completions.with_raw_response.create(
                model="a", messages=MESSAGES
            )
            assert raw.headers["x-edgeroute-route"] == "c"
            assert raw.headers["x-edgeroute-attempts"] == "1"
            assert [await mocks[m].requests() for m in ("a1", "a2", "b1", "c1")] == [2, 2, 2, 3]

            served = await access_line(process, "chain-1")
            assert served["route"] == "c"
            assert served["requested_route"] == "a"
            assert served["attempts"] == 4
            assert served["provider"] == "c1"

            # Explain shows the lists and the order an exhausted request walks.
            explained = await explain(process, "a")
            assert explained["fallbacks"] == {
                "fallbacks": ["b"],
                "context_window_fallbacks": [],
                "content_policy_fallbacks": [],
            }
            assert explained["fallback_chain"] == ["a", "b", "c"]
            assert (await explain(process, "c"))["fallback_chain"] == ["c"]


async def test_chain_exhausted_everywhere_is_one_502_listing_every_attempt(
    tmp_path: Path,
) -> None:
    sick = MockSettings(error_rate=1.0)
    async with mock_upstreams(a1=sick, b1=sick) as mocks:
        document = gateway_config(
            mocks,
            [route("a", "a1", fallbacks=["b"]), route("b", "b1")],
            server={"max_attempts": 2},
        )
        async with gateway_process(document, tmp_path) as process:
            with pytest.raises(openai.APIStatusError) as caught:
                await client(process).chat.completions.create(model="a", messages=MESSAGES)
            error = caught.value
            assert error.status_code == 502
            # a1 once (a moves on rather than retrying), then b1 with its own budget of 2.
            assert error.response.headers["x-edgeroute-attempts"] == "3"
            assert error.response.headers["x-edgeroute-route"] == "b"
            body = error.response.json()["error"]
            assert body["code"] == "all_providers_failed"
            assert [a["provider"] for a in body["attempts"]] == ["a1", "b1", "b1"]
            assert [await mocks[m].requests() for m in ("a1", "b1")] == [1, 2]


async def test_streaming_request_falls_back_before_the_first_byte(tmp_path: Path) -> None:
    async with mock_upstreams(a1=MockSettings(error_rate=1.0), b1=MockSettings()) as mocks:
        document = gateway_config(mocks, [route("a", "a1", fallbacks=["b"]), route("b", "b1")])
        async with gateway_process(document, tmp_path) as process:
            async with client(process).chat.completions.with_streaming_response.create(
                model="a", messages=MESSAGES, stream=True
            ) as response:
                assert response.headers["x-edgeroute-route"] == "b"
                assert response.headers["x-edgeroute-attempts"] == "2"
                text = ""
                async for chunk in await response.parse():
                    if chunk.choices:
                        text += chunk.choices[0].delta.content or ""
            assert text.startswith("Hello from b1")
            assert [await mocks[m].requests() for m in ("a1", "b1")] == [1, 1]


async def test_a_route_at_its_quota_falls_back(
    tmp_path: Path, state_section: dict[str, Any]
) -> None:
    """A target at its rpm quota is excluded like an open breaker: with nothing else
    admissible on its route, the request goes down the chain instead of a 429."""
    async with mock_upstreams(a1=MockSettings(), b1=MockSettings()) as mocks:
        quota_route = route("a", "a1", fallbacks=["b"])
        quota_route["targets"][0]["rpm"] = 1
        document = gateway_config(mocks, [quota_route, route("b", "b1")], **state_section)
        async with gateway_process(document, tmp_path) as process:
            gpt = client(process)
            first = await gpt.chat.completions.with_raw_response.create(
                model="a", messages=MESSAGES
            )
            assert first.headers["x-edgeroute-route"] == "a"
            second = await gpt.chat.completions.with_raw_response.create(
                model="a", messages=MESSAGES
            )
            assert second.headers["x-edgeroute-route"] == "b"
            assert second.headers["x-edgeroute-attempts"] == "1"
            assert [await mocks[m].requests() for m in ("a1", "b1")] == [1, 1]
            assert (await explain(process, "a"))["targets"][0]["excluded"] == "quota_rpm"


# ---- config errors -------------------------------------------------------------------------


def _document(*routes: dict[str, Any]) -> dict[str, Any]:
    provider = {"name": "p", "base_url": "http://127.0.0.1:9/v1"}
    return {"providers": [provider], "routes": list(routes)}


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        pytest.param(
            [route("a", "p", fallbacks=["b", "nope"]), route("b", "p")],
            r"$.routes[0].fallbacks[1] (route a): unknown route 'nope'; known routes: a, b",
            id="unknown",
        ),
        pytest.param(
            [route("a", "p", context_window_fallbacks=["a"])],
            r"$.routes[0].context_window_fallbacks[0] (route a): "
            "route 'a' cannot fall back to itself",
            id="self",
        ),
        pytest.param(
            [
                route("a", "p", fallbacks=["b"]),
                route("b", "p", fallbacks=["c"]),
                route("c", "p", fallbacks=["a"]),
            ],
            r"$.routes[0].fallbacks[0] (route a): fallbacks go round in a cycle: a → b → c → a",
            id="cycle",
        ),
        pytest.param(
            [route("a", "p"), route("b", "p", content_policy_fallbacks=["a", "a"])],
            r"$.routes[1].content_policy_fallbacks[1] (route b): route 'a' is listed twice",
            id="twice",
        ),
    ],
)
def test_bad_fallbacks_are_config_errors_with_their_path(
    routes: list[dict[str, Any]], expected: str
) -> None:
    with pytest.raises(ConfigErrors) as caught:
        parse_config(_document(*routes), env={})
    assert caught.value.errors == (expected,)


def test_a_cycle_is_reported_at_its_routes_own_place() -> None:
    """A route with a problem of its own (no `model`) still takes its place in $.routes."""
    nameless = {"targets": [{"provider": "p", "model": "x"}]}
    document = _document(
        nameless, route("a", "p", fallbacks=["b"]), route("b", "p", fallbacks=["a"])
    )
    with pytest.raises(ConfigErrors) as caught:
        parse_config(document, env={})
    assert caught.value.errors == (
        "$.routes[0]: missing required field `model`",
        "$.routes[1].fallbacks[0] (route a): fallbacks go round in a cycle: a → b → a",
    )


def test_fallbacks_across_kinds_may_point_back() -> None:
    """`a` falls back to `b` when down; `b` sends prompts too long for it to `a`: no loop
    (a request never visits a route twice), so not a cycle."""
    config = parse_config(
        _document(
            route("a", "p", fallbacks=["b"]), route("b", "p", context_window_fallbacks=["a"])
        ),
        env={},
    )
    assert config.route("a").fallbacks == ["b"]


# ---- the library API -------------------------------------------------------------------------


async def test_router_call_walks_the_chain() -> None:
    config = parse_config(
        _document(
            route("a", "p", fallbacks=["b", "c"]),
            route("b", "p", fallbacks=["d"]),
            route("c", "p"),
            route("d", "p"),
        ),
        env={},
    )
    router = Router(config)
    seen: list[str] = []

    async def attempt(candidate: Candidate) -> str:
        seen.append(candidate.target.id)
        if len(seen) < 4:
            raise AttemptFailed(OutcomeKind.FAILURE, "boom")
        return f"answer {len(seen)}"

    try:
        # a, b, then b's own fallback d (depth first), then c answers.
        assert router.chain("a") == ["a", "b", "d", "c"]
        assert await router.call("a", attempt) == "answer 4"
        assert len(seen) == 4
        snapshots = {name: await router.snapshot(name) for name in ("a", "b", "c", "d")}
        assert [snapshots[n].targets[0].failures for n in ("a", "b", "d")] == [1, 1, 1]
        assert snapshots["c"].targets[0].successes == 1
    finally:
        await router.close()


async def test_router_call_takes_an_error_class_fallback() -> None:
    config = parse_config(
        _document(
            route("small", "p", fallbacks=["other"], context_window_fallbacks=["large"]),
            route("other", "p"),
            route("large", "p"),
        ),
        env={},
    )
    router = Router(config)
    calls = 0

    async def attempt(candidate: Candidate) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise AttemptFailed(
                OutcomeKind.NEUTRAL,
                "context_window_exceeded",
                retryable=False,
                fallback="context_window",
            )
        return calls

    try:
        assert await router.call("small", attempt) == 2
        small = await router.snapshot("small")
        assert small.targets[0].failures == 0  # NEUTRAL: not the target's fault
        assert (await router.snapshot("large")).targets[0].successes == 1
        assert (await router.snapshot("other")).targets[0].successes == 0
    finally:
        await router.close()


# ---- item 3: error-class fallbacks ---------------------------------------------------------

KINDS = ("openai", "azure", "anthropic")


def providers_by_kind(mocks: dict[str, Any]) -> list[dict[str, Any]]:
    """One provider per adapter kind, each on its own mock (`openai`, `azure`, `anthropic`),
    plus the plain OpenAI-compatible `large` and `safe` the fallback routes use."""
    out: list[dict[str, Any]] = []
    for name, mock in mocks.items():
        provider: dict[str, Any] = {"name": name, "base_url": mock.base_url, "api_key": "sk-x"}
        if name == "azure":
            provider.update(kind="azure", base_url=mock.url, api_version="2024-10-21")
        elif name == "anthropic":
            provider["kind"] = "anthropic"
        out.append(provider)
    return out


async def test_error_class_fallbacks_from_every_adapter_kind_spare_the_breaker(
    tmp_path: Path, state_section: dict[str, Any]
) -> None:
    settings = {name: MockSettings() for name in (*KINDS, "large", "safe")}
    async with mock_upstreams(**settings) as mocks:
        routes = [
            route(
                kind,
                kind,
                context_window_fallbacks=["large"],
                content_policy_fallbacks=["safe"],
                fallbacks=["safe"],
            )
            for kind in KINDS
        ]
        document = {
            "providers": providers_by_kind(mocks),
            "routes": [*routes, route("large", "large"), route("safe", "safe")],
            # One failure would open a breaker: these must not count as one.
            "breaker": {"failure_threshold": 1, "open_timeout_s": 120},
            **state_section,
        }
        async with gateway_process(document, tmp_path) as process:
            gpt = client(process)
            for kind in KINDS:
                for fault, landing in (("context_window", "large"), ("content_policy", "safe")):
                    await mocks[kind].configure(fault=fault, fault_count=1)
                    stream = kind == "azure"  # a stream falls back before its first byte too
                    if stream:
                        async with gpt.chat.completions.with_streaming_response.create(
                            model=kind, messages=MESSAGES, stream=True
                        ) as response:
                            headers = response.headers
                            chunks = [c async for c in await response.parse()]
                        text = "".join(
                            c.choices[0].delta.content or "" for c in chunks if c.choices
                        )
                    else:
                        raw = await gpt.chat.completions.with_raw_response.create(
                            model=kind, messages=MESSAGES
                        )
                        headers = raw.headers
                        text = raw.parse().choices[0].message.content or ""
                    where = f"{kind}/{fault}"
                    assert headers["x-edgeroute-route"] == landing, where
                    assert headers["x-edgeroute-provider"] == landing, where
                    assert headers["x-edgeroute-attempts"] == "2", where
                    assert text.startswith(f"Hello from {landing}"), where
                    assert (await mocks[kind].stats())["faults_served"] >= 1, where
                    assert (
                        await metric(
                            process,
                            "edgeroute_fallbacks_total",
                            route=kind,
                            to_route=landing,
                            cause=fault,
                        )
                        == 1
                    ), where
                # The refusing target's breaker never heard of either refusal.
                target = (await explain(process, kind))["targets"][0]
                assert target["breaker"] == "closed", kind
                assert target["consecutive_failures"] == 0, kind
                assert target["window"]["failures"] == 0, kind
                assert target["admissible"], kind
            # Each refusing upstream was asked twice, once per fault; each landing route
            # served one request per kind; the exhaustion fallback never fired.
            assert [await mocks[k].requests() for k in KINDS] == [2, 2, 2]
            assert await mocks["large"].requests() == 3
            assert await mocks["safe"].requests() == 3
            for kind in KINDS:
                assert (
                    await metric(
                        process,
                        "edgeroute_fallbacks_total",
                        route=kind,
                        to_route="safe",
                        cause="exhausted",
                    )
                    == 0
                )


async def test_without_a_fallback_refusals_pass_through_unchanged(tmp_path: Path) -> None:
    async with mock_upstreams(**{kind: MockSettings() for kind in KINDS}) as mocks:
        document = {
            "providers": providers_by_kind(mocks),
            # A general fallback is not a context-window or content-policy fallback.
            "routes": [route(kind, kind, fallbacks=["spare"]) for kind in KINDS]
            + [route("spare", "openai")],
            "breaker": {"failure_threshold": 1, "open_timeout_s": 120},
        }
        async with gateway_process(document, tmp_path) as process:
            gpt = client(process)
            expected = {
                ("openai", "context_window"): ("context_length_exceeded", "maximum context"),
                ("openai", "content_policy"): ("content_policy_violation", "safety system"),
                ("azure", "context_window"): ("context_length_exceeded", "maximum context"),
                ("azure", "content_policy"): ("content_filter", "content management policy"),
                # Anthropic's error, in OpenAI's shape as every Anthropic error is.
                ("anthropic", "context_window"): ("context_length_exceeded", "prompt is too long"),
                ("anthropic", "content_policy"): (None, "content filtering policy"),
            }
            for (kind, fault), (code, words) in expected.items():
                await mocks[kind].configure(fault=fault, fault_count=1)
                with pytest.raises(openai.BadRequestError) as caught:
                    await gpt.chat.completions.create(model=kind, messages=MESSAGES)
                error = caught.value
                where = f"{kind}/{fault}"
                assert error.response.headers["x-edgeroute-route"] == kind, where
                assert error.response.headers["x-edgeroute-attempts"] == "1", where
                body = error.response.json()["error"]
                assert body["code"] == code, where
                assert words in body["message"], where
                if kind == "azure" and fault == "content_policy":
                    assert body["innererror"]["code"] == "ResponsibleAIPolicyViolation"
            assert await mocks["openai"].requests() == 2  # never the spare route
            for kind in KINDS:
                target = (await explain(process, kind))["targets"][0]
                assert (target["breaker"], target["window"]["failures"]) == ("closed", 0), kind


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # vLLM's OpenAI server, older (top-level) and newer ({"error": ...}) shapes.
        (
            b'{"object":"error","message":"This model\'s maximum context length is 4096 tokens.'
            b" However, you requested 5000 tokens (4000 in the messages, 1000 in the completion)."
            b' Please reduce the length of the messages or completion.","type":"BadRequestError",'
            b'"param":null,"code":400}',
            "context_window_exceeded",
        ),
        (
            b'{"error":{"message":"\'max_tokens\' or \'max_completion_tokens\' is too large: 8000.'
            b" This model's maximum context length is 4096 tokens and your request has 2778 input"
            b' tokens (8000 > 4096 - 2778).","type":"BadRequestError","param":null,"code":400}}',
            "context_window_exceeded",
        ),
        # vLLM's engine.
        (
            b'{"error":{"message":"The decoder prompt (length 8825) is longer than the maximum'
            b' model length of 8192.","type":"BadRequestError","code":400}}',
            "context_window_exceeded",
        ),
        (
            b'{"error":{"message":"x","type":"invalid_request_error",'
            b'"code":"context_length_exceeded"}}',
            "context_window_exceeded",
        ),
        (
            b'{"error":{"message":"x","type":"invalid_request_error",'
            b'"code":"content_policy_violation"}}',
            "content_policy_violation",
        ),
        (
            b'{"error":{"message":"x","code":"BadRequest",'
            b'"innererror":{"code":"ResponsibleAIPolicyViolation"}}}',
            "content_policy_violation",
        ),
        (b'{"error":{"message":"Invalid temperature","code":"invalid_value"}}', None),
        # A message that merely mentions the words (here an upstream echoing the client's own
        # text back) under a code of its own is that code's error, not the context window.
        (
            b'{"error":{"message":"Invalid value for \'user\': \'This model\'s maximum context'
            b' length is 1 token\'","type":"invalid_request_error","code":"invalid_value"}}',
            None,
        ),
        (
            b'{"error":{"message":"string too long; longer than the maximum model length of'
            b' 10","code":"string_above_max_length"}}',
            None,
        ),
        # The words anywhere but the message (param, type) never count.
        (
            b'{"error":{"message":"Invalid temperature","type":"maximum context length is",'
            b'"param":"maximum context length is","code":null}}',
            None,
        ),
        (b'{"error":"plain words"}', None),
        (b"<html>bad gateway</html>", None),
        (b"[1, 2]", None),
    ],
)
def test_openai_compatible_refusals_are_recognised(body: bytes, expected: str | None) -> None:
    from edgeroute.providers.openai import recognise_error

    found = recognise_error(body)
    assert (found.value if found is not None else None) == expected


def test_cli_explain_names_the_chain(tmp_path: Path) -> None:
    config = tmp_path / "fallbacks.yaml"
    document = _document(
        route("a", "p", fallbacks=["b"], context_window_fallbacks=["c"]),
        route("b", "p", fallbacks=["c"]),
        route("c", "p"),
    )
    config.write_text(json.dumps(document))  # JSON is YAML
    run = subprocess.run(
        [sys.executable, "-m", "edgeroute.cli", "explain", "--config", str(config), "a"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "fallback chain: a -> b -> c; context window: c" in run.stdout
