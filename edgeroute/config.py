"""Configuration: YAML → frozen msgspec Structs, with `${ENV}` interpolation and `$.path` errors.

The shape here is a contract with users and with the rest of the code: fields get added,
never renamed. Everything that can be checked without I/O is checked at load time, so a
config that loads is a config the gateway can run.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
import yaml

from edgeroute.errors import ConfigError

# Names end up inside Redis keys (`{prefix:route}` hash tags), hash fields separated by `|`,
# URL paths and metric labels: braces, `|`, whitespace and control characters are refused.
_NAME = r"[A-Za-z0-9][A-Za-z0-9._:/@+=-]{0,127}"
NAME_RE = re.compile(_NAME)
_PROVIDER_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_PREFIX = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}"
# `\Z`, not `$`: msgspec searches with `re`, where `$` also matches before a trailing newline.
_NAME_PATTERN = f"^{_NAME}\\Z"
_PROVIDER_NAME_PATTERN = f"^{_PROVIDER_NAME}\\Z"
_PREFIX_PATTERN = f"^{_PREFIX}\\Z"
# What msgspec's "matching regex '...'" means, for error messages people can act on.
_START = "starting with a letter or digit"
_PATTERN_HELP = {
    _NAME_PATTERN: f"1-128 letters, digits or ._:/@+=- characters, {_START}",
    _PROVIDER_NAME_PATTERN: f"1-64 letters, digits or ._- characters, {_START}",
    _PREFIX_PATTERN: f"1-64 letters, digits or ._:- characters, {_START}",
}

RouteName = Annotated[str, msgspec.Meta(pattern=_NAME_PATTERN)]
ProviderName = Annotated[str, msgspec.Meta(pattern=_PROVIDER_NAME_PATTERN)]
Weight = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
PositiveSeconds = Annotated[float, msgspec.Meta(gt=0.0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0.0)]
StrategyName = Literal["cost", "latency", "hybrid", "round_robin", "least_busy"]
ProviderKind = Literal["openai", "azure", "anthropic"]


class _Base(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Frozen, keyword-only, and strict about unknown fields: a typo is an error, not a no-op."""


class ServerConfig(_Base, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    # Secrets are never empty: `${X}` with X="" would otherwise accept an empty header.
    admin_token: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    api_keys: list[Annotated[str, msgspec.Meta(min_length=1)]] = []
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1)] = 4 * 1024 * 1024
    shutdown_timeout_s: NonNegative = 20.0
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] = 3
    request_timeout_s: PositiveSeconds = 600.0


class StateConfig(_Base, frozen=True, kw_only=True):
    redis_url: str | None = None
    key_prefix: Annotated[str, msgspec.Meta(pattern=_PREFIX_PATTERN)] = "edgeroute"
    cluster: bool = False
    timeout_ms: Annotated[float, msgspec.Meta(gt=0.0)] = 50.0
    # An in-flight lease outlives the longest request; it only matters when a replica dies.
    lease_ttl_s: PositiveSeconds = 900.0
    # Keys of a route nobody uses disappear after this long.
    idle_ttl_s: PositiveSeconds = 3600.0


class BreakerConfig(_Base, frozen=True, kw_only=True):
    failure_threshold: Annotated[int, msgspec.Meta(ge=1)] = 3
    open_timeout_s: PositiveSeconds = 30.0
    success_threshold: Annotated[int, msgspec.Meta(ge=1)] = 3
    half_open_max_probes: Annotated[int, msgspec.Meta(ge=1)] = 1
    max_open_timeout_s: PositiveSeconds = 300.0
    # A probe reservation a replica never reports back (it crashed) frees itself after this.
    probe_ttl_s: PositiveSeconds = 30.0


class LatencyConfig(_Base, frozen=True, kw_only=True):
    window_s: PositiveSeconds = 60.0
    buckets: Annotated[int, msgspec.Meta(ge=1, le=600)] = 12


class WeightsConfig(_Base, frozen=True, kw_only=True):
    cost: Weight = 0.4
    latency: Weight = 0.4
    reliability: Weight = 0.2


class ProviderConfig(_Base, frozen=True, kw_only=True):
    name: ProviderName
    kind: ProviderKind = "openai"
    base_url: str
    api_key: str | None = None
    api_version: str | None = None
    headers: dict[str, str] = {}
    timeout_s: PositiveSeconds = 600.0
    connect_timeout_s: PositiveSeconds = 5.0
    # Ask OpenAI-compatible upstreams for usage on streams (hidden from clients that did not).
    stream_usage: bool = True


class TargetConfig(_Base, frozen=True, kw_only=True):
    provider: ProviderName
    model: Annotated[str, msgspec.Meta(min_length=1)]
    # Stable identity of the target in shared state and admin URLs; `provider:model` if unset.
    id: RouteName | None = None
    input_cost_per_mtok: NonNegative = 0.0
    output_cost_per_mtok: NonNegative = 0.0

    @property
    def target_id(self) -> str:
        return self.id if self.id is not None else f"{self.provider}:{self.model}"

    @property
    def price_per_mtok(self) -> float:
        """The single number cost-based routing ranks by: input plus output price."""
        return self.input_cost_per_mtok + self.output_cost_per_mtok


class RouteConfig(_Base, frozen=True, kw_only=True):
    model: RouteName
    strategy: StrategyName = "hybrid"
    weights: WeightsConfig | None = None
    targets: Annotated[list[TargetConfig], msgspec.Meta(min_length=1)]
    breaker: BreakerConfig | None = None
    latency: LatencyConfig | None = None


class Config(_Base, frozen=True, kw_only=True):
    server: ServerConfig = ServerConfig()
    state: StateConfig = StateConfig()
    breaker: BreakerConfig = BreakerConfig()
    latency: LatencyConfig = LatencyConfig()
    providers: list[ProviderConfig] = []
    routes: list[RouteConfig] = []

    def provider(self, name: str) -> ProviderConfig:
        for provider in self.providers:
            if provider.name == name:
                return provider
        raise KeyError(name)

    def route(self, name: str) -> RouteConfig:
        for route in self.routes:
            if route.model == name:
                return route
        raise KeyError(name)


_ENV_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(value: str, path: str, env: Mapping[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in env and (env[name] != "" or default is None):
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"{_printable(path)}: environment variable {name} is not set")

    return _ENV_RE.sub(substitute, value)


def _walk(node: Any, path: str, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return _interpolate(node, path, env) if "$" in node else node
    if isinstance(node, dict):
        return {key: _walk(value, f"{path}.{key}", env) for key, value in node.items()}
    if isinstance(node, list):
        return [_walk(item, f"{path}[{i}]", env) for i, item in enumerate(node)]
    if isinstance(node, float) and not math.isfinite(node):
        # YAML spells these .inf/.nan; no duration, price or weight can be one.
        raise ConfigError(f"{_printable(path)}: expected a finite number, got {node}")
    return node


def _merge_route_defaults(raw: dict[str, Any]) -> None:
    """Per-route `breaker`/`latency` blocks override the global ones field by field."""
    routes = raw.get("routes")
    if not isinstance(routes, list):
        return
    for section in ("breaker", "latency"):
        base = raw.get(section)
        base = base if isinstance(base, dict) else {}
        for route in routes:
            if isinstance(route, dict) and isinstance(route.get(section), dict):
                route[section] = {**base, **route[section]}


def _check_semantics(config: Config) -> Config:
    providers: dict[str, ProviderConfig] = {}
    for i, key in enumerate(config.server.api_keys):
        if key.startswith("sha256:") and not re.fullmatch(r"[0-9a-fA-F]{64}", key[7:]):
            raise ConfigError(f"$.server.api_keys[{i}]: sha256: must be followed by 64 hex digits")
    for i, provider in enumerate(config.providers):
        if provider.name in providers:
            raise ConfigError(f"$.providers[{i}].name: duplicate provider name {provider.name!r}")
        if not provider.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"$.providers[{i}].base_url: must start with http:// or https://")
        if not _is_plain_url(provider.base_url):
            raise ConfigError(
                f"$.providers[{i}].base_url: needs a host and no spaces or control characters"
            )
        if provider.kind == "azure" and not provider.api_version:
            raise ConfigError(f"$.providers[{i}].api_version: required for kind azure")
        providers[provider.name] = provider
    seen_routes: set[str] = set()
    for i, route in enumerate(config.routes):
        where = f"$.routes[{i}]"
        if route.model in seen_routes:
            raise ConfigError(f"{where}.model: duplicate route {route.model!r}")
        seen_routes.add(route.model)
        if route.weights is not None:
            if route.strategy != "hybrid":
                raise ConfigError(f"{where}.weights: weights only apply to strategy hybrid")
            w = route.weights
            if w.cost + w.latency + w.reliability <= 0.0:
                raise ConfigError(f"{where}.weights: all weights are zero")
        seen_targets: set[str] = set()
        for j, target in enumerate(route.targets):
            twhere = f"{where}.targets[{j}]"
            if target.provider not in providers:
                raise ConfigError(f"{twhere}.provider: unknown provider {target.provider!r}")
            target_id = target.target_id
            if target.id is None and not NAME_RE.fullmatch(target_id):
                raise ConfigError(
                    f"{twhere}.model: {target_id!r} is not a safe target id; set `id` explicitly"
                )
            if target_id in seen_targets:
                raise ConfigError(f"{twhere}: duplicate target id {target_id!r}; set `id`")
            seen_targets.add(target_id)
    return config


def _is_plain_url(url: str) -> bool:
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        return False
    try:
        return bool(urlsplit(url).hostname)
    except ValueError:  # e.g. an unbalanced IPv6 bracket
        return False


def parse_config(raw: Any, *, env: Mapping[str, str] | None = None) -> Config:
    """Validate an already-parsed YAML/JSON document and return the Config."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("$: expected a mapping at the top level")
    expanded = _walk(raw, "$", os.environ if env is None else env)
    _merge_route_defaults(expanded)
    try:
        config = msgspec.convert(expanded, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_one_line(str(exc))) from None
    return _check_semantics(config)


def _one_line(message: str) -> str:
    # msgspec says "Expected `int`, got `str` - at `$.server.port`"; lead with the path.
    # A bad mapping key reads "... - at `key` in `$.server`".
    text, sep, path = message.rpartition(" - at ")
    for pattern, help_text in _PATTERN_HELP.items():
        text = text.replace(f"Expected `str` matching regex {pattern!r}", f"expected {help_text}")
    if sep:
        key, in_sep, parent = path.partition("` in `")
        if in_sep and key == "`key":
            return _printable(f"{parent.strip('`')}: mapping key: {text}")
        return _printable(f"{path.strip('`')}: {text}")
    return _printable(f"$: {message}")


def _printable(text: str) -> str:
    """Escape control characters so an error stays ONE line whatever the input contained."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], text)


def load_config(path: str | Path, *, env: Mapping[str, str] | None = None) -> Config:
    """Read, interpolate and validate a YAML config file; raises ConfigError (one line)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(_printable(f"$: cannot read {file}: {exc.strerror or exc}")) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            _printable(f"$: cannot read {file}: not UTF-8 (byte offset {exc.start})")
        ) from None
    return loads_config(text, source=str(file), env=env)


def loads_config(
    text: str, *, source: str = "<config>", env: Mapping[str, str] | None = None
) -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(_printable(f"$: invalid YAML at {where}: {problem}")) from None
    config = parse_config(raw, env=env)
    return apply_env_overrides(config, os.environ if env is None else env)


def apply_env_overrides(config: Config, env: Mapping[str, str]) -> Config:
    """EDGEROUTE_REDIS_URL wins over `state.redis_url` so one image serves every environment."""
    url = env.get("EDGEROUTE_REDIS_URL")
    if url:
        return msgspec.structs.replace(
            config, state=msgspec.structs.replace(config.state, redis_url=url)
        )
    return config


def effective_breaker(config: Config, route: RouteConfig) -> BreakerConfig:
    return route.breaker if route.breaker is not None else config.breaker


def effective_latency(config: Config, route: RouteConfig) -> LatencyConfig:
    return route.latency if route.latency is not None else config.latency
