"""edgeroute.config: loading, defaults, interpolation, overrides and one-line `$.path` errors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from edgeroute.clients import compile_clients
from edgeroute.config import (
    BreakerConfig,
    Config,
    ConfigErrors,
    LatencyConfig,
    StateConfig,
    config_from_models,
    effective_breaker,
    effective_latency,
    load_config,
    loads_config,
    parse_config,
    require_routes,
)
from edgeroute.errors import ConfigError
from edgeroute.router import compile_route

DOCUMENTED_EXAMPLE = """\
server: {host: 127.0.0.1, port: 8080}
state:
  redis_url: redis://127.0.0.1:6379/0
  key_prefix: edgeroute
breaker: {failure_threshold: 3, open_timeout_s: 30, success_threshold: 3, half_open_max_probes: 1}
latency: {window_s: 60, buckets: 12}
providers:
  - {name: openai, kind: openai, base_url: "https://api.openai.com/v1", api_key: "${OPENAI_API_KEY}"}
routes:
  - model: chat
    strategy: hybrid
    weights: {cost: 0.4, latency: 0.4, reliability: 0.2}
    targets:
      - {provider: openai, model: gpt-4o-mini, input_cost_per_mtok: 0.15, output_cost_per_mtok: 0.60}
"""  # noqa: E501 - the documented example, verbatim

ENV = {"OPENAI_API_KEY": "sk-test"}


def minimal(**route: Any) -> dict[str, Any]:
    """A valid document with one provider `p` and one route `r`; `route` overrides its keys."""
    return {
        "providers": [{"name": "p", "base_url": "http://127.0.0.1:9101/v1"}],
        "routes": [{"model": "r", "targets": [{"provider": "p", "model": "m"}], **route}],
    }


def config_error(raw: Any, *, env: dict[str, str] | None = None) -> str:
    """parse_config's error message for `raw`, checked to be ONE line starting with `$`."""
    with pytest.raises(ConfigError) as info:
        parse_config(raw, env={} if env is None else env)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    assert message.startswith("$"), message
    return message


def text_error(text: str, *, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        loads_config(text, env={} if env is None else env)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith("$"), message
    return message


# --- the documented example and defaults ---------------------------------------------------


def test_documented_example_loads() -> None:
    config = loads_config(DOCUMENTED_EXAMPLE, env=ENV)
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8080
    assert config.state.redis_url == "redis://127.0.0.1:6379/0"
    assert config.state.key_prefix == "edgeroute"
    assert config.breaker.failure_threshold == 3
    assert config.breaker.open_timeout_s == 30.0
    assert config.latency == LatencyConfig(window_s=60, buckets=12)
    (provider,) = config.providers
    assert provider.name == "openai"
    assert provider.kind == "openai"
    assert provider.api_key == "sk-test"
    route = config.route("chat")
    assert route.strategy == "hybrid"
    assert route.weights is not None
    assert (route.weights.cost, route.weights.latency, route.weights.reliability) == (0.4, 0.4, 0.2)
    (target,) = route.targets
    assert target.target_id == "openai:gpt-4o-mini"
    assert target.price_per_mtok == pytest.approx(0.75)
    assert config.provider("openai") is provider


def test_documented_example_loads_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "edgeroute.yaml"
    path.write_text(DOCUMENTED_EXAMPLE, encoding="utf-8")
    assert load_config(path, env=ENV) == loads_config(DOCUMENTED_EXAMPLE, env=ENV)
    assert load_config(str(path), env=ENV).providers[0].api_key == "sk-test"


def test_empty_document_is_all_defaults() -> None:
    for text in ("", "# nothing\n", "{}\n"):
        config = loads_config(text, env={})
        assert config == Config()
    config = Config()
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8080
    assert config.server.max_attempts == 3
    assert config.server.api_keys == []
    assert config.state == StateConfig()
    assert config.state.redis_url is None
    assert config.state.key_prefix == "edgeroute"
    assert config.breaker == BreakerConfig(
        failure_threshold=3, open_timeout_s=30.0, success_threshold=3, half_open_max_probes=1
    )
    assert config.latency == LatencyConfig(window_s=60.0, buckets=12)
    assert config.providers == [] and config.routes == []


def test_route_and_provider_defaults() -> None:
    config = parse_config(minimal(), env={})
    provider = config.provider("p")
    assert provider.kind == "openai"
    assert provider.api_key is None
    assert provider.headers == {}
    route = config.route("r")
    assert route.strategy == "hybrid"
    assert route.weights is None
    assert route.breaker is None and route.latency is None
    target = route.targets[0]
    assert target.id is None
    assert target.target_id == "p:m"
    assert target.price_per_mtok == 0.0
    with pytest.raises(KeyError):
        config.route("nope")
    with pytest.raises(KeyError):
        config.provider("nope")


def test_explicit_target_id_wins() -> None:
    raw = minimal(targets=[{"provider": "p", "model": "weird model name", "id": "p-weird"}])
    assert parse_config(raw, env={}).routes[0].targets[0].target_id == "p-weird"


def test_config_is_frozen() -> None:
    config = parse_config(minimal(), env={})
    with pytest.raises(AttributeError):
        config.server.port = 1  # type: ignore[misc]


@pytest.mark.parametrize("strategy", ["cost", "latency", "hybrid", "round_robin", "least_busy"])
def test_every_strategy_is_accepted(strategy: str) -> None:
    assert parse_config(minimal(strategy=strategy), env={}).routes[0].strategy == strategy


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_provider_kinds(kind: str) -> None:
    raw = {"providers": [{"name": "p", "kind": kind, "base_url": "https://x.example/v1"}]}
    assert parse_config(raw, env={}).providers[0].kind == kind


def test_azure_with_api_version_loads() -> None:
    raw = {
        "providers": [
            {
                "name": "az",
                "kind": "azure",
                "base_url": "https://r.openai.azure.com",
                "api_version": "2024-10-21",
            }
        ]
    }
    assert parse_config(raw, env={}).providers[0].api_version == "2024-10-21"


# --- ${ENV} interpolation ------------------------------------------------------------------


def test_env_interpolation() -> None:
    raw = {
        "providers": [{"name": "p", "base_url": "https://${HOST}/v1", "api_key": "${KEY}-${KEY}"}]
    }
    provider = parse_config(raw, env={"HOST": "api.example", "KEY": "k1"}).providers[0]
    assert provider.base_url == "https://api.example/v1"
    assert provider.api_key == "k1-k1"


def test_env_default_used_when_unset_or_empty() -> None:
    raw = {"state": {"key_prefix": "${PREFIX:-edge}"}}
    assert parse_config(raw, env={}).state.key_prefix == "edge"
    assert parse_config(raw, env={"PREFIX": ""}).state.key_prefix == "edge"
    assert parse_config(raw, env={"PREFIX": "fleet-a"}).state.key_prefix == "fleet-a"


def test_env_default_may_be_empty() -> None:
    raw = {"providers": [{"name": "p", "base_url": "http://x", "api_key": "${KEY:-}"}]}
    assert parse_config(raw, env={}).providers[0].api_key == ""


def test_env_set_to_empty_without_default_is_empty() -> None:
    raw = {"providers": [{"name": "p", "base_url": "http://x", "api_key": "${KEY}"}]}
    assert parse_config(raw, env={"KEY": ""}).providers[0].api_key == ""


def test_env_values_are_converted_to_the_field_type() -> None:
    raw = {"server": {"port": "${PORT:-9000}", "max_attempts": "${ATTEMPTS}"}}
    server = parse_config(raw, env={"ATTEMPTS": "5"}).server
    assert server.port == 9000
    assert server.max_attempts == 5
    message = config_error({"server": {"port": "${PORT}"}}, env={"PORT": "eighty"})
    assert message.startswith("$.server.port: ")


def test_env_interpolation_in_lists() -> None:
    raw = {"server": {"api_keys": ["${A}", "literal", "${B:-b}"]}}
    assert parse_config(raw, env={"A": "a"}).server.api_keys == ["a", "literal", "b"]


def test_dollar_dollar_escapes() -> None:
    raw = {
        "providers": [{"name": "p", "base_url": "http://x", "api_key": "pa$$word-$${NOT_A_VAR}"}]
    }
    provider = parse_config(raw, env={"NOT_A_VAR": "oops"}).providers[0]
    assert provider.api_key == "pa$word-${NOT_A_VAR}"


def test_lone_dollar_is_kept() -> None:
    raw = {"providers": [{"name": "p", "base_url": "http://x", "api_key": "a$b $ c"}]}
    assert parse_config(raw, env={}).providers[0].api_key == "a$b $ c"


def test_interpolation_does_not_recurse() -> None:
    raw = {"providers": [{"name": "p", "base_url": "http://x", "api_key": "${A}"}]}
    assert parse_config(raw, env={"A": "${B}", "B": "no"}).providers[0].api_key == "${B}"


def test_missing_env_var_names_the_path() -> None:
    message = text_error(DOCUMENTED_EXAMPLE, env={})
    assert re.match(r"\$\.providers\[0\]\.api_key \(provider [^)]+\): .*OPENAI_API_KEY", message), (
        message
    )
    with pytest.raises(
        ConfigError, match=r"^\$\.providers\[0\]\.api_key \(provider [^)]+\): .*OPENAI_API_KEY"
    ):
        loads_config(DOCUMENTED_EXAMPLE, env={})


def test_missing_env_var_deep_in_a_list() -> None:
    raw = {"server": {"api_keys": ["ok", "${CLIENT_KEY}"]}}
    with pytest.raises(ConfigError, match=r"^\$\.server\.api_keys\[1\]: .*CLIENT_KEY"):
        parse_config(raw, env={})


def test_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "from-process")
    monkeypatch.delenv("EDGEROUTE_REDIS_URL", raising=False)
    assert loads_config(DOCUMENTED_EXAMPLE).providers[0].api_key == "from-process"
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ConfigError, match=r"^\$\.providers\[0\]\.api_key \(provider [^)]+\): "):
        loads_config(DOCUMENTED_EXAMPLE)


# --- EDGEROUTE_REDIS_URL -------------------------------------------------------------------


def test_edgeroute_redis_url_overrides_state_redis_url() -> None:
    env = {**ENV, "EDGEROUTE_REDIS_URL": "rediss://fleet.example:6380/2"}
    config = loads_config(DOCUMENTED_EXAMPLE, env=env)
    assert config.state.redis_url == "rediss://fleet.example:6380/2"
    assert config.state.key_prefix == "edgeroute"  # the rest of `state` is untouched


def test_edgeroute_redis_url_enables_redis_without_state_block() -> None:
    config = loads_config("{}", env={"EDGEROUTE_REDIS_URL": "redis://r:6379/0"})
    assert config.state.redis_url == "redis://r:6379/0"


def test_empty_edgeroute_redis_url_is_ignored() -> None:
    config = loads_config(DOCUMENTED_EXAMPLE, env={**ENV, "EDGEROUTE_REDIS_URL": ""})
    assert config.state.redis_url == "redis://127.0.0.1:6379/0"
    assert loads_config("{}", env={}).state.redis_url is None


def test_edgeroute_redis_url_from_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    monkeypatch.setenv("EDGEROUTE_REDIS_URL", "redis://from-env:6379/0")
    assert loads_config(DOCUMENTED_EXAMPLE).state.redis_url == "redis://from-env:6379/0"


# --- per-route breaker / latency overrides -------------------------------------------------


def test_route_without_overrides_uses_the_global_blocks() -> None:
    raw = {
        **minimal(),
        "breaker": {"failure_threshold": 7},
        "latency": {"window_s": 120},
    }
    config = parse_config(raw, env={})
    route = config.route("r")
    assert effective_breaker(config, route) is config.breaker
    assert effective_breaker(config, route).failure_threshold == 7
    assert effective_latency(config, route) == LatencyConfig(window_s=120.0, buckets=12)


def test_route_blocks_override_global_field_by_field() -> None:
    raw = {
        **minimal(
            breaker={"failure_threshold": 2, "open_timeout_s": 5},
            latency={"buckets": 6},
        ),
        "breaker": {"failure_threshold": 9, "success_threshold": 4, "half_open_max_probes": 2},
        "latency": {"window_s": 30, "buckets": 3},
    }
    config = parse_config(raw, env={})
    route = config.route("r")
    breaker = effective_breaker(config, route)
    assert breaker == BreakerConfig(
        failure_threshold=2,  # route
        open_timeout_s=5.0,  # route
        success_threshold=4,  # global
        half_open_max_probes=2,  # global
        max_open_timeout_s=300.0,  # default
        probe_ttl_s=30.0,  # default
    )
    assert effective_latency(config, route) == LatencyConfig(window_s=30.0, buckets=6)
    # The global blocks themselves are unchanged.
    assert config.breaker.failure_threshold == 9
    assert config.latency.buckets == 3


def test_route_override_without_global_block_uses_defaults() -> None:
    config = parse_config(minimal(latency={"window_s": 10}), env={})
    assert effective_latency(config, config.route("r")) == LatencyConfig(window_s=10.0, buckets=12)
    assert effective_breaker(config, config.route("r")) == BreakerConfig()


def test_routes_override_independently() -> None:
    raw: dict[str, Any] = minimal(breaker={"failure_threshold": 1})
    raw["routes"].append({"model": "other", "targets": [{"provider": "p", "model": "m"}]})
    raw["breaker"] = {"failure_threshold": 5, "open_timeout_s": 60}
    config = parse_config(raw, env={})
    first = effective_breaker(config, config.route("r"))
    other = effective_breaker(config, config.route("other"))
    assert (first.failure_threshold, first.open_timeout_s) == (1, 60.0)
    assert (other.failure_threshold, other.open_timeout_s) == (5, 60.0)


def test_bad_route_override_names_the_route_path() -> None:
    message = config_error(minimal(breaker={"failure_threshold": 0}))
    assert message.startswith("$.routes[0].breaker.failure_threshold (route r): ")
    message = config_error(minimal(latency={"windows": 10}))
    assert message.startswith("$.routes[0].latency (route r): ") and "windows" in message


# --- one-line errors that start with the $.path --------------------------------------------


@pytest.mark.parametrize(
    ("raw", "pattern"),
    [
        pytest.param({"bogus": 1}, r"^\$: .*unknown field `bogus`", id="unknown-top-level"),
        pytest.param(
            {"server": {"hots": "x"}}, r"^\$\.server: .*unknown field `hots`", id="unknown-nested"
        ),
        pytest.param(
            {"providers": [{"name": "p", "base_url": "http://x", "apikey": "k"}]},
            r"^\$\.providers\[0\] \(provider [^)]+\): .*unknown field `apikey`",
            id="unknown-in-provider",
        ),
        pytest.param(
            minimal(targets=[{"provider": "p", "model": "m", "price": 1}]),
            r"^\$\.routes\[0\]\.targets\[0\] \(route r\): .*unknown field `price`",
            id="unknown-in-target",
        ),
        pytest.param(
            {"server": {"port": "eighty"}}, r"^\$\.server\.port: Expected `int`", id="wrong-type"
        ),
        pytest.param(
            {"server": {"port": 80.5}}, r"^\$\.server\.port: Expected `int`", id="float-port"
        ),
        pytest.param(
            {"server": {"port": True}}, r"^\$\.server\.port: Expected `int`", id="bool-port"
        ),
        pytest.param(
            {"server": "0.0.0.0:80"}, r"^\$\.server: Expected `object`", id="section-not-mapping"
        ),
        pytest.param(
            {"server": {"port": 65536}}, r"^\$\.server\.port: .*<= 65535", id="port-too-high"
        ),
        pytest.param({"server": {"port": -1}}, r"^\$\.server\.port: .*>= 0", id="port-negative"),
        pytest.param(
            {"routes": {"model": "r"}}, r"^\$\.routes: Expected `array`", id="routes-not-list"
        ),
        pytest.param(
            {"breaker": {"open_timeout_s": 0}}, r"^\$\.breaker\.open_timeout_s: ", id="zero-timeout"
        ),
        pytest.param(
            {"breaker": {"open_timeout_s": float("inf")}},
            r"^\$\.breaker\.open_timeout_s: .*finite",
            id="infinite-timeout",
        ),
        pytest.param({"latency": {"buckets": 0}}, r"^\$\.latency\.buckets: ", id="zero-buckets"),
        pytest.param(
            minimal(weights={"cost": 1.5}),
            r"^\$\.routes\[0\]\.weights\.cost \(route r\): .*1\.0",
            id="weight-above-1",
        ),
        pytest.param(
            minimal(weights={"latency": -0.1}),
            r"^\$\.routes\[0\]\.weights\.latency \(route r\): .*0\.0",
            id="weight-below-0",
        ),
        pytest.param(
            minimal(weights={"cost": float("nan")}),
            r"^\$\.routes\[0\]\.weights\.cost \(route r\): ",
            id="weight-nan",
        ),
        pytest.param(
            minimal(weights={"cost": 0, "latency": 0, "reliability": 0}),
            r"^\$\.routes\[0\]\.weights \(route r\): all weights are zero",
            id="weights-all-zero",
        ),
        pytest.param(
            minimal(strategy="round_robin", weights={"cost": 1}),
            r"^\$\.routes\[0\]\.weights \(route r\): .*hybrid",
            id="weights-non-hybrid",
        ),
        pytest.param(
            minimal(strategy="cost", weights={"cost": 1}),
            r"^\$\.routes\[0\]\.weights \(route r\): .*hybrid",
            id="weights-cost-strategy",
        ),
        pytest.param(
            minimal(strategy="fastest"),
            r"^\$\.routes\[0\]\.strategy \(route r\): .*'fastest'",
            id="unknown-strategy",
        ),
        pytest.param(
            minimal(targets=[{"provider": "nope", "model": "m"}]),
            r"^\$\.routes\[0\]\.targets\[0\]\.provider \(route r\): unknown provider 'nope'",
            id="missing-provider",
        ),
        pytest.param(
            minimal(targets=[]),
            r"^\$\.routes\[0\]\.targets \(route r\): .*length >= 1",
            id="empty-targets",
        ),
        pytest.param(
            {"routes": [{"model": "r"}]},
            r"^\$\.routes\[0\] \(route r\): .*missing required field `targets`",
            id="no-targets",
        ),
        pytest.param(
            minimal(targets=[{"provider": "p", "model": ""}]),
            r"^\$\.routes\[0\]\.targets\[0\]\.model \(route r\): ",
            id="empty-target-model",
        ),
        pytest.param(
            {"providers": [{"name": "p"}]},
            r"^\$\.providers\[0\] \(provider [^)]+\): .*missing required field `base_url`",
            id="missing-base-url",
        ),
        pytest.param(
            {"providers": [{"name": "p", "kind": "cohere", "base_url": "http://x"}]},
            r"^\$\.providers\[0\]\.kind \(provider [^)]+\): .*'cohere'",
            id="unknown-kind",
        ),
        pytest.param(
            {"providers": [{"name": "az", "kind": "azure", "base_url": "https://x"}]},
            r"^\$\.providers\[0\]\.api_version \(provider [^)]+\): required for kind azure",
            id="azure-without-api-version",
        ),
        pytest.param(
            {"providers": [{"name": "p", "base_url": "ftp://x"}]},
            r"^\$\.providers\[0\]\.base_url \(provider [^)]+\): must start with http:// or https://",
            id="base-url-ftp",
        ),
        pytest.param(
            {"providers": [{"name": "p", "base_url": "api.openai.com/v1"}]},
            r"^\$\.providers\[0\]\.base_url \(provider [^)]+\): must start with http",
            id="base-url-bare",
        ),
        pytest.param(
            {"providers": [{"name": "p", "base_url": "https://"}]},
            r"^\$\.providers\[0\]\.base_url \(provider [^)]+\): needs a host",
            id="base-url-no-host",
        ),
        pytest.param(
            {"providers": [{"name": "p", "base_url": "http://a b/v1"}]},
            r"^\$\.providers\[0\]\.base_url \(provider [^)]+\): .*spaces",
            id="base-url-space",
        ),
        pytest.param(
            {"providers": [{"name": "p", "base_url": "http://x", "headers": ["a"]}]},
            r"^\$\.providers\[0\]\.headers \(provider [^)]+\): Expected `object`",
            id="headers-list",
        ),
        pytest.param({1: "x"}, r"^\$: mapping key: Expected `str`", id="non-string-key"),
    ],
)
def test_bad_input_is_one_line_naming_the_path(raw: Any, pattern: str) -> None:
    message = config_error(raw)
    assert re.search(pattern, message), message
    with pytest.raises(ConfigError, match=pattern):
        parse_config(raw, env={})


@pytest.mark.parametrize(
    ("raw", "pattern"),
    [
        pytest.param(
            {
                "providers": [
                    {"name": "p", "base_url": "http://x"},
                    {"name": "p", "base_url": "http://y"},
                ]
            },
            r"^\$\.providers\[1\]\.name: duplicate provider name 'p'",
            id="provider",
        ),
        pytest.param(
            {**minimal(), "routes": [*minimal()["routes"], *minimal()["routes"]]},
            r"^\$\.routes\[1\]\.model: duplicate route 'r'",
            id="route",
        ),
        pytest.param(
            minimal(targets=[{"provider": "p", "model": "m"}, {"provider": "p", "model": "m"}]),
            r"^\$\.routes\[0\]\.targets\[1\] \(route r\): duplicate target id 'p:m'",
            id="target-default-id",
        ),
        pytest.param(
            minimal(
                targets=[
                    {"provider": "p", "model": "a", "id": "t"},
                    {"provider": "p", "model": "b", "id": "t"},
                ]
            ),
            r"^\$\.routes\[0\]\.targets\[1\] \(route r\): duplicate target id 't'",
            id="target-explicit-id",
        ),
        pytest.param(
            minimal(
                targets=[
                    {"provider": "p", "model": "m", "id": "p:x"},
                    {"provider": "p", "model": "x"},
                ]
            ),
            r"^\$\.routes\[0\]\.targets\[1\] \(route r\): duplicate target id 'p:x'",
            id="explicit-id-vs-default-id",
        ),
    ],
)
def test_duplicate_names(raw: Any, pattern: str) -> None:
    assert re.search(pattern, config_error(raw))


def test_same_target_in_two_routes_is_fine() -> None:
    raw: dict[str, Any] = minimal()
    raw["routes"].append({"model": "r2", "targets": [{"provider": "p", "model": "m"}]})
    assert [route.model for route in parse_config(raw, env={}).routes] == ["r", "r2"]


UNSAFE_NAMES = ["a{b}", "a}", "{a", "a|b", "a b", " a", "a\tb", "a\nb", "a\n", "", "-a", "é"]


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_unsafe_route_names(name: str) -> None:
    message = config_error(minimal(model=name))
    assert message.startswith("$.routes[0].model: "), message


@pytest.mark.parametrize("name", [*UNSAFE_NAMES, "a:b", "a/b"])
def test_unsafe_provider_names(name: str) -> None:
    raw = {"providers": [{"name": name, "base_url": "http://x"}]}
    assert config_error(raw).startswith("$.providers[0].name: ")


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_unsafe_target_ids(name: str) -> None:
    raw = minimal(targets=[{"provider": "p", "model": "m", "id": name}])
    assert config_error(raw).startswith("$.routes[0].targets[0].id (route r): ")


@pytest.mark.parametrize("model", ["gpt 4o", "a|b", "x{y}", "m\n"])
def test_unsafe_model_without_id_asks_for_an_id(model: str) -> None:
    raw = minimal(targets=[{"provider": "p", "model": model}])
    message = config_error(raw)
    assert message.startswith("$.routes[0].targets[0].model (route r): ")
    assert "`id`" in message


def test_unsafe_model_with_safe_id_is_fine() -> None:
    raw = minimal(targets=[{"provider": "p", "model": "gpt 4o|x", "id": "safe"}])
    assert parse_config(raw, env={}).routes[0].targets[0].target_id == "safe"


@pytest.mark.parametrize("prefix", [*UNSAFE_NAMES, "a/b", "a@b"])
def test_unsafe_key_prefix(prefix: str) -> None:
    assert config_error({"state": {"key_prefix": prefix}}).startswith("$.state.key_prefix: ")


@pytest.mark.parametrize(
    "name", ["chat", "gpt-4o-mini", "org/model:v1.2", "a@b+c=d", "A9._:-/@+=", "x" * 128]
)
def test_safe_route_names(name: str) -> None:
    assert parse_config(minimal(model=name), env={}).routes[0].model == name


def test_over_long_names_are_refused() -> None:
    assert config_error(minimal(model="x" * 129)).startswith("$.routes[0].model: ")
    raw = {"providers": [{"name": "p" * 65, "base_url": "http://x"}]}
    assert config_error(raw).startswith("$.providers[0].name: ")


def test_name_errors_say_what_is_allowed() -> None:
    message = config_error(minimal(model="a|b"))
    assert "letters, digits" in message
    assert "regex" not in message


def test_control_characters_never_break_the_line() -> None:
    message = config_error({"a\nb": 1})
    assert message.startswith("$: ") and "a\\nb" in message
    message = config_error({"server": {"x\r\ny": 1}})
    assert message.startswith("$.server: ")
    message = config_error({"providers": [{"name": "p", "kind": "x\ny", "base_url": "http://x"}]})
    assert message.startswith("$.providers[0].kind (provider p): ")


def test_semantic_checks_run_on_top_of_valid_types() -> None:
    # A route naming a missing provider is found even when everything else is well typed.
    raw: dict[str, Any] = minimal()
    raw["routes"].append({"model": "r2", "targets": [{"provider": "ghost", "model": "m"}]})
    assert config_error(raw).startswith(
        "$.routes[1].targets[0].provider (route r2): unknown provider"
    )


# --- YAML, top level and files -------------------------------------------------------------


def test_invalid_yaml_reports_line_and_column() -> None:
    text = "server:\n  port: 8080\n  host: [unclosed\n"
    message = text_error(text)
    assert re.match(r"^\$: invalid YAML at <config>:\d+:\d+: ", message), message
    message = text_error("a: b: c\n")
    assert message == "$: invalid YAML at <config>:1:5: mapping values are not allowed here"
    with pytest.raises(ConfigError, match=r"^\$: invalid YAML at <config>:1:5: "):
        loads_config("a: b: c\n", env={})


def test_invalid_yaml_in_a_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("server:\n\tport: 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^\$: invalid YAML at {re.escape(str(path))}:2:1: "):
        load_config(path, env={})


def test_source_names_the_document() -> None:
    with pytest.raises(ConfigError, match=r"^\$: invalid YAML at inline:1:5: "):
        loads_config("a: b: c\n", source="inline", env={})


@pytest.mark.parametrize("text", ["- a\n- b\n", "42\n", "just a string\n", "[]\n"])
def test_non_mapping_top_level(text: str) -> None:
    assert text_error(text) == "$: expected a mapping at the top level"


@pytest.mark.parametrize("raw", [[1, 2], "x", 3, 1.5, True])
def test_parse_config_non_mapping(raw: Any) -> None:
    assert config_error(raw) == "$: expected a mapping at the top level"


def test_parse_config_none_is_defaults() -> None:
    assert parse_config(None, env={}) == Config()


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match=r"^\$: cannot read .*absent\.yaml: No such file"):
        load_config(path)


def test_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^\$: cannot read "):
        load_config(tmp_path)


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.yaml"
    path.write_text("{}\n", encoding="utf-8")
    path.chmod(0)
    try:
        try:
            path.read_text()
        except PermissionError:
            pass
        else:
            pytest.skip("running with privileges that ignore file permissions")
        with pytest.raises(ConfigError, match=r"^\$: cannot read .*secret\.yaml: Permission"):
            load_config(path)
    finally:
        path.chmod(0o600)


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"server: {host: \xff}\n")
    with pytest.raises(ConfigError, match=r"^\$: cannot read .*latin1\.yaml: not UTF-8"):
        load_config(path)


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"^\$"):
        parse_config({"bogus": 1}, env={})


def test_errors_do_not_echo_secrets() -> None:
    secret = "sk-live-very-secret"
    raw = {"providers": [{"name": "p", "base_url": "ftp://x", "api_key": secret}]}
    assert secret not in config_error(raw)
    raw_list: dict[str, Any] = {
        "providers": [{"name": "p", "base_url": "http://x", "api_key": ["${K}"]}]
    }
    assert secret not in config_error(raw_list, env={"K": secret})


def test_round_trip_through_msgspec() -> None:
    config = loads_config(DOCUMENTED_EXAMPLE, env=ENV)
    assert parse_config(msgspec.to_builtins(config), env={}) == config


# --- every problem at once, with suggestions -----------------------------------------------


def all_errors(raw: Any, *, env: dict[str, str] | None = None, **kwargs: Any) -> list[str]:
    """Every problem parse_config reports for `raw`, each checked to be one `$` line."""
    with pytest.raises(ConfigErrors) as info:
        parse_config(raw, env={} if env is None else env, **kwargs)
    for message in info.value.errors:
        assert "\n" not in message and message.startswith("$"), message
    return list(info.value.errors)


def test_every_problem_is_reported_at_once() -> None:
    raw: dict[str, Any] = {
        "server": {"port": "8080", "admin_token": "${ADMIN}"},
        "breaker": {"failure_treshold": 2},
        "providers": [
            {"name": "openai", "base_url": "ftp://x", "api_key": "${OPENAI_KEY}"},
            {"name": "claude", "kind": "antropic", "base_url": "https://api.anthropic.com/v1"},
        ],
        "routes": [
            {"model": "chat", "strategy": "fastest", "targets": [{"provider": "p", "model": "m"}]},
            {"model": "cheap", "targets": [{"provider": "opnai", "model": "gpt-4o-mini"}]},
        ],
    }
    errors = all_errors(raw)
    # In document order; names next to indexes; near names and valid values suggested.
    assert errors == [
        "$.server.port: Expected `int`, got `str`",
        "$.server.admin_token: environment variable ADMIN is not set",
        "$.breaker: unknown field `failure_treshold`; did you mean `failure_threshold`?",
        "$.providers[0].base_url (provider openai): must start with http:// or https://",
        "$.providers[0].api_key (provider openai): environment variable OPENAI_KEY is not set",
        "$.providers[1].kind (provider claude): unknown value 'antropic'; "
        "expected one of: openai, azure, anthropic; did you mean `anthropic`?",
        "$.routes[0].strategy (route chat): unknown value 'fastest'; "
        "expected one of: cost, latency, hybrid, round_robin, least_busy, priority, weighted",
        "$.routes[0].targets[0].provider (route chat): unknown provider 'p'; "
        "known providers: openai, claude",
        "$.routes[1].targets[0].provider (route cheap): unknown provider 'opnai'; "
        "known providers: openai, claude; did you mean `openai`?",
    ]
    with pytest.raises(ConfigError) as info:
        parse_config(raw, env={})
    assert str(info.value) == f"{errors[0]} (and 8 more errors)"


def test_a_route_with_a_bad_field_still_has_its_targets_checked_by_provider() -> None:
    # A provider with its own problem still exists for the routes that name it.
    raw = minimal()
    raw["providers"][0]["timeout_s"] = -1
    assert all_errors(raw) == [
        "$.providers[0].timeout_s (provider p): Expected `float` > 0.0",
    ]


def test_unknown_provider_when_none_are_configured() -> None:
    (error,) = all_errors(
        {"routes": [{"model": "r", "targets": [{"provider": "x", "model": "m"}]}]}
    )
    assert error.endswith(
        "unknown provider 'x'; no providers are configured (add them under `providers:`)"
    )


def test_no_suggestion_for_unrelated_names() -> None:
    (error,) = all_errors(minimal(targets=[{"provider": "p", "model": "m", "price": 1}]))
    assert error == "$.routes[0].targets[0] (route r): unknown field `price`"


def test_enum_of_the_wrong_type_lists_the_values() -> None:
    (error,) = all_errors(minimal(strategy=3))
    assert error == (
        "$.routes[0].strategy (route r): expected one of: "
        "cost, latency, hybrid, round_robin, least_busy, priority, weighted; got a int"
    )


@pytest.mark.parametrize(
    ("section", "value"),
    [("port", "8080"), ("max_attempts", "3"), ("request_timeout_s", "60")],
)
def test_numbers_written_as_text_are_refused(section: str, value: str) -> None:
    (error,) = all_errors({"server": {section: value}})
    assert error.startswith(f"$.server.{section}: Expected ")
    assert error.endswith("got `str`")


def test_numbers_from_the_environment_are_converted() -> None:
    raw = {"server": {"port": "${PORT}", "request_timeout_s": "${T:-60}"}}
    server = parse_config(raw, env={"PORT": "9000"}).server
    assert (server.port, server.request_timeout_s) == (9000, 60.0)
    (error,) = all_errors(raw, env={"PORT": "ninety"})
    assert error == "$.server.port: Expected `int`, got `str`"


def test_a_missing_variable_is_reported_once_not_again_as_a_bad_value() -> None:
    raw = {
        "providers": [
            {"name": "az", "kind": "azure", "base_url": "${AZ_URL}", "api_version": "v"},
        ],
        "server": {"port": "${PORT}"},
    }
    assert all_errors(raw) == [
        "$.providers[0].base_url (provider az): environment variable AZ_URL is not set",
        "$.server.port: environment variable PORT is not set",
    ]


def test_state_only_loads_without_upstream_and_client_secrets() -> None:
    raw = minimal()
    raw["server"] = {"admin_token": "${ADMIN}", "api_keys": ["${CLIENT}"], "port": "${PORT}"}
    raw["providers"][0].update(api_key="${KEY}", base_url="${URL}", headers={"x-team": "${TEAM}"})
    config = parse_config(raw, env={}, state_only=True)
    assert config.routes[0].targets[0].provider == "p"
    assert config.server.admin_token == "<unset ADMIN>"
    # Fields state and explain read are still checked, variables there still required.
    raw["routes"][0]["targets"][0]["model"] = "${MODEL}"
    (error,) = all_errors(raw, state_only=True)
    assert error == "$.routes[0].targets[0].model (route r): environment variable MODEL is not set"


def test_require_routes_refuses_an_empty_config() -> None:
    require_routes(parse_config(minimal(), env={}))
    with pytest.raises(ConfigError, match=r"^\$\.routes: no routes configured"):
        require_routes(parse_config({}, env={}))


# --- a config from model names (`edgeroute serve --model`) ----------------------------------


def test_config_from_models_picks_providers_and_adds_a_fallback_route() -> None:
    env = {"OPENAI_API_KEY": "sk-o", "ANTHROPIC_API_KEY": "sk-a"}
    config = config_from_models(["gpt-4o-mini", "claude-3-5-haiku-latest", "gpt-4o-mini"], env)
    assert {p.name: (p.kind, p.base_url, p.api_key) for p in config.providers} == {
        "openai": ("openai", "https://api.openai.com/v1", "sk-o"),
        "anthropic": ("anthropic", "https://api.anthropic.com/v1", "sk-a"),
    }
    assert [r.model for r in config.routes] == ["gpt-4o-mini", "claude-3-5-haiku-latest", "auto"]
    assert [t.target_id for t in config.route("auto").targets] == [
        "openai:gpt-4o-mini",
        "anthropic:claude-3-5-haiku-latest",
    ]
    assert config.server.admin_token is None and config.server.api_keys == []
    assert config.state.redis_url is None


def test_config_from_models_reads_base_urls_tokens_and_prefixes() -> None:
    env = {
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:9/v1",  # no key needed for a local server
        "OPENAI_API_KEY": "sk-$weird",
        "EDGEROUTE_ADMIN_TOKEN": "admin-t",
        "EDGEROUTE_CLIENT_KEY": "client-k",
        "EDGEROUTE_REDIS_URL": "redis://r:6379/0",
    }
    config = config_from_models(["anthropic:my-model", "openai:o1"], env)
    assert config.provider("anthropic").base_url == "http://127.0.0.1:9/v1"
    assert config.provider("anthropic").api_key is None
    assert config.provider("openai").api_key == "sk-$weird"
    assert [r.model for r in config.routes] == ["my-model", "o1", "auto"]
    assert (config.server.admin_token, config.server.api_keys) == ("admin-t", ["client-k"])
    assert config.state.redis_url == "redis://r:6379/0"


def test_config_from_models_names_the_missing_key() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_models(["claude-3-5-haiku-latest"], {"OPENAI_API_KEY": "sk"})
    assert str(info.value) == (
        "--model claude-3-5-haiku-latest: set ANTHROPIC_API_KEY (or ANTHROPIC_BASE_URL, "
        "for an anthropic-compatible server that needs no key)"
    )


def test_problems_inside_mappings_and_lists_of_values_keep_their_place() -> None:
    # msgspec names a bad mapping value `[...]`: still one line, still in document order.
    raw = minimal()
    raw["server"] = {"api_keys": ["ok", 5]}
    raw["providers"][0]["headers"] = {"a": 1, "b.c": 2}
    assert all_errors(raw) == [  # `server` comes last in this document
        "$.providers[0].headers[...] (provider p): Expected `str`, got `int`",
        "$.server.api_keys[1]: Expected `str`, got `int`",
    ]


# ---- limits: target quotas, client keys, on_state_loss --------------------------------------


def with_client(**client: Any) -> dict[str, Any]:
    return {**minimal(), "server": {"clients": [{"name": "team", "key": "k", **client}]}}


@pytest.mark.parametrize(
    ("raw", "pattern"),
    [
        pytest.param(
            minimal(targets=[{"provider": "p", "model": "m", "rpm": 0}]),
            r"^\$\.routes\[0\]\.targets\[0\]\.rpm \(route r\): Expected `int` >= 1",
            id="target-rpm-zero",
        ),
        pytest.param(
            minimal(targets=[{"provider": "p", "model": "m", "tpm": "lots"}]),
            r"^\$\.routes\[0\]\.targets\[0\]\.tpm \(route r\): Expected `int \| null`",
            id="target-tpm-type",
        ),
        pytest.param(
            minimal(targets=[{"provider": "p", "model": "m", "on_state_loss": "panic"}]),
            r"^\$\.routes\[0\]\.targets\[0\]\.on_state_loss \(route r\): unknown value .panic.",
            id="target-policy",
        ),
        pytest.param(
            with_client(budget={"usd": 5, "period": "week"}),
            r"^\$\.server\.clients\[0\]\.budget\.period: ",
            id="budget-period",
        ),
        pytest.param(
            with_client(budget={"usd": 0}),
            r"^\$\.server\.clients\[0\]\.budget\.usd: Expected `float` > 0",
            id="budget-zero",
        ),
        pytest.param(
            with_client(key="sha256:abc"),
            r"^\$\.server\.clients\[0\]\.key: sha256: must be followed by 64 hex digits",
            id="client-bad-digest",
        ),
        pytest.param(
            with_client(routes=["r", "nope"]),
            r"^\$\.server\.clients\[0\]\.routes\[1\]: unknown route 'nope'",
            id="client-unknown-route",
        ),
        pytest.param(
            {
                **minimal(),
                "server": {"clients": [{"name": "a", "key": "k1"}, {"name": "a", "key": "k2"}]},
            },
            r"^\$\.server\.clients\[1\]\.name: duplicate client name 'a'",
            id="client-duplicate",
        ),
        pytest.param(
            {**minimal(), "state": {"on_state_loss": "sometimes"}},
            r"^\$\.state\.on_state_loss: ",
            id="state-policy",
        ),
    ],
)
def test_bad_limits_name_their_path(raw: Any, pattern: str) -> None:
    message = config_error(raw)
    assert re.search(pattern, message), message


def test_limits_compile_into_the_route_and_clients() -> None:
    config = parse_config(
        {
            **minimal(targets=[{"provider": "p", "model": "m", "tpm": 30000, "rpm": 180}]),
            "state": {"on_state_loss": "fail_open"},
            "server": {
                "clients": [
                    {
                        "name": "team",
                        "key": "k",
                        "budget": {"usd": 50},
                        "on_state_loss": "fail_closed",
                    }
                ]
            },
        },
        env={},
    )
    target = compile_route(config, config.routes[0]).targets[0]
    assert (target.rpm, target.tpm, target.max_concurrency) == (180, 30000, 0)
    assert target.on_state_loss == "fail_open"
    (client,) = compile_clients(config)
    assert (client.budget_micro, client.period, client.on_state_loss) == (
        50_000_000,
        "day",
        "fail_closed",
    )


# --- traffic policies (issue 11) -------------------------------------------------------------


def _targets(*extra: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"provider": "p", "model": f"m{i}", **item} for i, item in enumerate(extra)]


def test_policy_keys_load_and_compile() -> None:
    from edgeroute.router import compile_route

    raw = minimal(
        strategy="priority",
        within="hybrid",
        weights={"cost": 1.0, "latency": 0.0, "reliability": 0.0},
        targets=_targets({"priority": 1}, {"priority": 0}),
        breaker={"scope": "provider"},
        affinity={"key": "header:x-session-id", "ttl_s": 60, "max_pins": 5},
    )
    config = parse_config(raw, env={})
    route = config.routes[0]
    assert route.breaker is not None and route.breaker.scope == "provider"
    assert route.affinity is not None and route.affinity.key == "header:x-session-id"
    spec = compile_route(config, route)
    assert spec.strategy.kind == "priority" and spec.strategy.within == "hybrid"
    assert spec.strategy.cost_weight == 1.0
    assert [t.priority for t in spec.targets] == [1, 0]
    # No priority anywhere: configuration order, one target per group.
    plain = parse_config(minimal(strategy="priority", targets=_targets({}, {}, {})), env={})
    assert [t.priority for t in compile_route(plain, plain.routes[0]).targets] == [0, 1, 2]
    weighted = parse_config(
        minimal(strategy="weighted", targets=_targets({"weight": 95}, {})), env={}
    )
    assert [t.weight for t in compile_route(weighted, weighted.routes[0]).targets] == [95, 1]


def test_policy_config_errors_name_their_path() -> None:
    raw: dict[str, Any] = {
        "providers": [{"name": "p", "base_url": "http://127.0.0.1:9101/v1"}],
        "breaker": {"scope": "region"},
        "routes": [
            {
                "model": "w",
                "strategy": "weighted",
                "targets": _targets({"weight": 0}, {"weight": -3}, {"weight": 1.5}),
            },
            {
                "model": "p",
                "strategy": "priority",
                "within": "fastest",
                "targets": _targets({"priority": 1}, {}),
            },
            {
                "model": "c",
                "strategy": "cost",
                "within": "cost",
                "weights": {"cost": 1},
                "targets": _targets({"priority": 0}, {"weight": 2}),
                "affinity": {"key": "cookie:session", "ttl_s": 0},
            },
        ],
    }
    assert all_errors(raw) == [
        "$.breaker.scope: unknown value 'region'; expected one of: target, provider",
        "$.routes[0].targets[0].weight (route w): must be a whole number above 0, got 0",
        "$.routes[0].targets[1].weight (route w): must be a whole number above 0, got -3",
        "$.routes[0].targets[2].weight (route w): Expected `int | null`, got `float`",
        "$.routes[1].within (route p): unknown value 'fastest'; "
        "expected one of: round_robin, latency, cost, hybrid, least_busy",
        "$.routes[1].targets[1].priority (route p): set priority on every target of the route "
        "or on none (none: config order)",
        "$.routes[2].within (route c): within only applies to strategy priority",
        "$.routes[2].weights (route c): weights only apply to strategy hybrid "
        "(or priority with within: hybrid)",
        "$.routes[2].targets[0].priority (route c): priority only applies to strategy priority",
        "$.routes[2].targets[1].weight (route c): weight only applies to strategy weighted",
        "$.routes[2].affinity.key (route c): 'cookie:session' is not header:NAME or body:FIELD "
        "(e.g. header:x-session-id, body:user)",
        "$.routes[2].affinity.ttl_s (route c): Expected `float` > 0.0",
    ]


def test_breaker_groups_join_routes_sharing_a_provider() -> None:
    from edgeroute.router import breaker_groups

    providers = [{"name": n, "base_url": "http://127.0.0.1:9101/v1"} for n in "abcd"]

    def route(name: str, *names: str, scope: str = "provider") -> dict[str, Any]:
        return {
            "model": name,
            "targets": [{"provider": n, "model": "m"} for n in names],
            "breaker": {"scope": scope},
        }

    config = parse_config(
        {
            "providers": providers,
            "routes": [
                route("r1", "a"),
                route("r2", "b"),
                route("r3", "b", "a"),  # joins r1 and r2
                route("r4", "c"),
                route("r5", "a", scope="target"),  # its own breakers: no group
            ],
        },
        env={},
    )
    assert breaker_groups(config) == {"r1": "r1", "r2": "r1", "r3": "r1", "r4": "r4"}


def test_a_client_key_used_twice_is_an_error_that_never_shows_the_key() -> None:
    """Two clients with one key would share whichever limits matched last, and a client key
    that is also in api_keys would be limited or not by accident: both are errors, naming the
    paths only (the key, plain or hashed, stays out of the message)."""
    import hashlib

    secret = "sk-shared-secret-key"
    hashed = "sha256:" + hashlib.sha256(secret.encode()).hexdigest()
    message = config_error(
        {
            **minimal(),
            "server": {
                "api_keys": ["sk-other", "sha256:" + hashed[7:].upper()],
                "clients": [{"name": "a", "key": secret}],
            },
        }
    )
    assert message == "$.server.clients[0].key: the same key as $.server.api_keys[1]"
    both = [{"name": "a", "key": secret}, {"name": "b", "key": hashed}]
    message = config_error({**minimal(), "server": {"clients": both}})
    assert message == "$.server.clients[1].key: the same key as $.server.clients[0] (client a)"
