"""Configuration: YAML → frozen msgspec Structs, with `${ENV}` interpolation and `$.path` errors.

The shape here is a contract with users and with the rest of the code: fields get added,
never renamed. Everything that can be checked without I/O is checked at load time, so a
config that loads is a config the gateway can run.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin
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
StrategyName = Literal[
    "cost", "latency", "hybrid", "round_robin", "least_busy", "priority", "weighted"
]
WithinName = Literal["round_robin", "latency", "cost", "hybrid", "least_busy"]
BreakerScope = Literal["target", "provider"]
# routes[].affinity.key: a request header, or a top-level string field of the JSON body.
AFFINITY_KEY_RE = re.compile(r"(header):([A-Za-z0-9!#$%&'*+.^_`|~-]+)|(body):([A-Za-z0-9_.-]+)")
ProviderKind = Literal["openai", "azure", "anthropic"]
StateLossPolicy = Literal["fail_open", "fail_closed", "local_share"]
_T = TypeVar("_T")


class _Base(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Frozen, keyword-only, and strict about unknown fields: a typo is an error, not a no-op."""


class BudgetConfig(_Base, frozen=True, kw_only=True):
    usd: Annotated[float, msgspec.Meta(gt=0.0)]
    period: Literal["day", "month"] = "day"  # UTC calendar days / months, Redis time


class ClientConfig(_Base, frozen=True, kw_only=True):
    """A client key with limits, held fleet-wide. `key` is plain or `sha256:<hex>`."""

    name: Annotated[str, msgspec.Meta(pattern=_PROVIDER_NAME_PATTERN)]
    key: Annotated[str, msgspec.Meta(min_length=1)]
    rpm: Annotated[int, msgspec.Meta(ge=1)] | None = None
    tpm: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_concurrency: Annotated[int, msgspec.Meta(ge=1)] | None = None
    budget: BudgetConfig | None = None
    routes: list[str] = []  # empty: every route
    on_state_loss: StateLossPolicy | None = None  # unset: state.on_state_loss


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
    # Connection hygiene (see docs/operations.md): a client must finish its request headers
    # this long after connecting or after starting a request, and its body this long after
    # the headers; an idle keep-alive connection is closed after keepalive_timeout_s.
    header_timeout_s: PositiveSeconds = 10.0
    body_timeout_s: PositiveSeconds = 60.0
    keepalive_timeout_s: PositiveSeconds = 75.0
    # Open client connections beyond this (or beyond what the fd limit leaves room for,
    # counting one upstream socket per client) are answered 503 and closed at once.
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 4096
    clients: list[ClientConfig] = []


class StateConfig(_Base, frozen=True, kw_only=True):
    redis_url: str | None = None
    key_prefix: Annotated[str, msgspec.Meta(pattern=_PREFIX_PATTERN)] = "edgeroute"
    cluster: bool = False
    timeout_ms: Annotated[float, msgspec.Meta(gt=0.0)] = 50.0
    # An in-flight lease outlives the longest request; it only matters when a replica dies.
    lease_ttl_s: PositiveSeconds = 900.0
    # Keys of a route nobody uses disappear after this long.
    idle_ttl_s: PositiveSeconds = 3600.0
    # What quotas and client limits do while Redis is unreachable (edgeroute/replicas.py).
    on_state_loss: StateLossPolicy = "local_share"


class BreakerConfig(_Base, frozen=True, kw_only=True):
    failure_threshold: Annotated[int, msgspec.Meta(ge=1)] = 3
    open_timeout_s: PositiveSeconds = 30.0
    success_threshold: Annotated[int, msgspec.Meta(ge=1)] = 3
    half_open_max_probes: Annotated[int, msgspec.Meta(ge=1)] = 1
    max_open_timeout_s: PositiveSeconds = 300.0
    # A probe reservation a replica never reports back (it crashed) frees itself after this.
    probe_ttl_s: PositiveSeconds = 30.0
    # target: one breaker per target of each route; provider: one per provider, shared by
    # every route with scope provider that sends to it.
    scope: BreakerScope = "target"


class LatencyConfig(_Base, frozen=True, kw_only=True):
    # The bucket window: statistics and explain (success/failure counts, tokens).
    window_s: PositiveSeconds = 60.0
    buckets: Annotated[int, msgspec.Meta(ge=1, le=600)] = 12
    # What latency and hybrid rank by: latency and error rate, exponentially time-weighted
    # with this half-life (decayed by the state's clock), so a change shows within seconds.
    half_life_s: PositiveSeconds = 0.5
    # An estimate older than this (or none) is re-measured through the exploration budget:
    # at most explore_max_in_flight explorations per target, at most explore_share of the
    # route's requests; a reservation nobody reports back frees itself after explore_ttl_s.
    explore_after_s: PositiveSeconds = 3.0
    explore_max_in_flight: Annotated[int, msgspec.Meta(ge=1, le=100)] = 1
    explore_share: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.05
    explore_ttl_s: PositiveSeconds = 30.0
    # Expected latency = estimate x (1 + load_penalty x in-flight) (1.0: classic peak-EWMA).
    load_penalty: NonNegative = 0.1
    # Targets within this fraction of the best score take turns (no herding).
    tolerance: NonNegative = 0.1
    # Non-streamed successes count as upstream time per output token (streams: time to
    # first token either way), so long answers do not make a provider look slow.
    per_output_token: bool = False


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
    # Bounds on what an upstream may send, counted after decompression: a whole non-streamed
    # body, and one SSE event. Over either, the attempt fails (502, a breaker failure).
    max_response_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 32 * 1024 * 1024
    max_event_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 8 * 1024 * 1024
    # Longest wait for the next complete SSE event (None: timeout_s), and an optional cap
    # on a whole stream: a trickling upstream must not hold a client and a lease forever.
    stream_idle_timeout_s: PositiveSeconds | None = None
    stream_timeout_s: PositiveSeconds | None = None

    def __post_init__(self) -> None:
        # aiohttp turns `user:pass@` into a Basic Authorization header and refuses to send
        # it next to another one: say so at load time instead of failing every request.
        if "@" in self.base_url and _has_userinfo(self.base_url):
            bearer = self.kind == "openai" and bool(self.api_key)
            header = any(name.lower() == "authorization" for name in self.headers)
            if bearer or header:
                clash = "api_key (sent as Authorization: Bearer)" if bearer else "headers"
                raise ValueError(
                    f"base_url: credentials in the URL (user:pass@) become an Authorization "
                    f"header, which clashes with {clash}; keep only one of them"
                )

    @property
    def stream_idle_s(self) -> float:
        return (
            self.stream_idle_timeout_s if self.stream_idle_timeout_s is not None else self.timeout_s
        )


class TargetConfig(_Base, frozen=True, kw_only=True):
    provider: ProviderName
    model: Annotated[str, msgspec.Meta(min_length=1)]
    # Stable identity of the target in shared state and admin URLs; `provider:model` if unset.
    id: RouteName | None = None
    input_cost_per_mtok: NonNegative = 0.0
    output_cost_per_mtok: NonNegative = 0.0
    # The provider's quotas for this deployment, held fleet-wide (unset: none): requests per
    # minute, tokens per minute (estimated at admission, corrected with the real usage), and
    # requests in flight at once.
    rpm: Annotated[int, msgspec.Meta(ge=1)] | None = None
    tpm: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_concurrency: Annotated[int, msgspec.Meta(ge=1)] | None = None
    on_state_loss: StateLossPolicy | None = None  # unset: state.on_state_loss
    # strategy priority: the target's group, lower first (unset on every target: config
    # order, one target per group); strategy weighted: its share of the route's traffic.
    priority: Annotated[int, msgspec.Meta(ge=0)] | None = None
    weight: int | None = None

    @property
    def target_id(self) -> str:
        return self.id if self.id is not None else f"{self.provider}:{self.model}"

    @property
    def price_per_mtok(self) -> float:
        """The single number cost-based routing ranks by: input plus output price."""
        return self.input_cost_per_mtok + self.output_cost_per_mtok


class AffinityConfig(_Base, frozen=True, kw_only=True):
    # Where the session id comes from: `header:NAME` or `body:FIELD` (a top-level string).
    key: str
    # A pin not used for this long is gone (each use starts it again).
    ttl_s: PositiveSeconds = 600.0
    # The most pins the route keeps; past it the least recently used one is dropped.
    max_pins: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 100_000


class RouteConfig(_Base, frozen=True, kw_only=True):
    model: RouteName
    strategy: StrategyName = "hybrid"
    # strategy priority: what orders the targets inside one priority group.
    within: WithinName | None = None
    weights: WeightsConfig | None = None
    targets: Annotated[list[TargetConfig], msgspec.Meta(min_length=1)]
    breaker: BreakerConfig | None = None
    latency: LatencyConfig | None = None
    # Routes a request continues on, in order, when this one cannot serve it: every target
    # excluded or failed (`fallbacks`), the prompt too long for a target, or a target's
    # content filter refusing it. See docs/routing.md, "Fallback chains".
    fallbacks: list[RouteName] = []
    context_window_fallbacks: list[RouteName] = []
    content_policy_fallbacks: list[RouteName] = []
    affinity: AffinityConfig | None = None


# The fallback lists of a route, each checked the same way (known routes, no cycles).
FALLBACK_FIELDS = ("fallbacks", "context_window_fallbacks", "content_policy_fallbacks")


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

# Fields `edgeroute state` / `explain` never use: they read shared state, and talk to neither
# clients nor upstreams. With `state_only`, an unset ${VAR} here is a placeholder, not an error,
# so those commands run from any machine that reaches Redis without the fleet's secrets.
_STATE_ONLY_OPTIONAL = re.compile(
    r"\$\.server(\..*)?|\$\.providers\[\d+\]\.(api_key|base_url|api_version|headers(\..*)?)"
)


class ConfigErrors(ConfigError):
    """Every problem found in one config, in document order; each is one `$.path: ...` line.

    `str()` is the first problem (plus a count of the others), so code that catches
    ConfigError keeps working; `errors` has them all.
    """

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = tuple(errors)
        more = len(self.errors) - 1
        suffix = f" (and {_count(more, 'more error')})" if more else ""
        super().__init__(self.errors[0] + suffix)


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


class _Problems:
    """Collects `$.path: message` problems instead of stopping at the first one."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, bool]] = []
        # Paths whose value came from ${VAR} (may be converted from text, e.g. a port) and
        # paths holding a placeholder for an unset variable (errors there would only repeat it).
        self.interpolated: set[str] = set()
        self.quiet: set[str] = set()
        self.labels: dict[str, str] = {}
        # Where each path appears in the document, to report problems in reading order.
        self.order: dict[str, int] = {}

    def add(self, path: str, message: str, *, cause: bool = False) -> None:
        """`cause`: the problem that made `path` quiet (reported even though it is)."""
        self.items.append((path, message, cause))

    def __len__(self) -> int:
        return len(self.items)

    def is_quiet(self, path: str) -> bool:
        return any(path == q or path.startswith((f"{q}.", f"{q}[")) for q in self.quiet)

    def label(self, raw: dict[str, Any]) -> None:
        """Name routes and providers next to their index: `$.routes[1].x (route chat)`."""
        for section, key, word in (("routes", "model", "route"), ("providers", "name", "provider")):
            items = raw.get(section)
            if not isinstance(items, list):
                continue
            for i, item in enumerate(items):
                if isinstance(item, dict) and isinstance(item.get(key), str) and item[key]:
                    self.labels[f"$.{section}[{i}]"] = f"{word} {item[key]}"

    def _position(self, path: str) -> int:
        """The document position of `path`, or of its nearest ancestor the walk visited."""
        while path not in self.order:
            parent = re.sub(r"(\.[^.\[]*|\[[^\]]*\])$", "", path)
            if parent in ("", path):  # a path the walk never produced: report it last
                return len(self.order)
            path = parent
        return self.order[path]

    def messages(self) -> list[str]:
        out: list[str] = []
        items = sorted(self.items, key=lambda item: self._position(item[0]))
        for path, message, cause in items:
            if not cause and self.is_quiet(path):
                continue
            match = re.match(r"\$\.(routes|providers)\[\d+\]", path)
            if match:
                item = match.group(0)
                label = self.labels.get(item)
                # Not next to the name field's own errors: the label would repeat the value.
                if label and path not in (f"{item}.model", f"{item}.name"):
                    path = f"{path} ({label})"
            line = _printable(f"{path}: {message}")
            if line not in out:  # one cause reported once, even when reached twice
                out.append(line)
        return out

    def raise_if_any(self) -> None:
        messages = self.messages()
        if messages:
            raise ConfigErrors(messages)


def _interpolate(
    value: str, path: str, env: Mapping[str, str], problems: _Problems, state_only: bool
) -> str:
    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        problems.interpolated.add(path)
        name, default = match.group(1), match.group(2)
        if name in env and (env[name] != "" or default is None):
            return env[name]
        if default is not None:
            return default
        problems.quiet.add(path)
        if not (state_only and _STATE_ONLY_OPTIONAL.fullmatch(path)):
            problems.add(path, f"environment variable {name} is not set", cause=True)
        # Keeps the document's shape, so every other problem is still found in this pass.
        return f"<unset {name}>"

    return _ENV_RE.sub(substitute, value)


def _walk(
    node: Any, path: str, env: Mapping[str, str], problems: _Problems, state_only: bool
) -> Any:
    problems.order.setdefault(path, len(problems.order))
    if isinstance(node, str):
        return _interpolate(node, path, env, problems, state_only) if "$" in node else node
    if isinstance(node, dict):
        return {
            key: _walk(value, f"{path}.{key}", env, problems, state_only)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [
            _walk(item, f"{path}[{i}]", env, problems, state_only) for i, item in enumerate(node)
        ]
    if isinstance(node, float) and not math.isfinite(node):
        # YAML spells these .inf/.nan; no duration, price or weight can be one.
        problems.quiet.add(path)
        problems.add(path, f"expected a finite number, got {node}", cause=True)
    return node


# --- type validation that reports every problem ---------------------------------------------
# msgspec stops at the first error. This walks the Struct types field by field (so fields added
# to the Structs above are covered without touching it), lets msgspec judge each leaf, and
# collects what it says. Leaves are converted strictly: `port: "8080"` is an error, while a
# value that came from ${VAR} (always text) is converted, so `port: ${PORT}` works.


def _unwrap(tp: Any) -> tuple[Any, list[msgspec.Meta]]:
    if get_origin(tp) is Annotated:
        inner, *extras = get_args(tp)
        return inner, [m for m in extras if isinstance(m, msgspec.Meta)]
    return tp, []


def _is_struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def _did_you_mean(value: str, choices: Iterable[str]) -> str:
    # 0.7: catches transpositions and dropped letters (`failure_treshold`, `hots`), not
    # unrelated words that share a few letters (`price` is not `provider`).
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.7)
    return f"; did you mean `{close[0]}`?" if close else ""


def _validate(value: Any, tp: Any, path: str, problems: _Problems) -> Any:
    inner, metas = _unwrap(tp)
    if _is_struct(inner):
        return _validate_struct(value, inner, path, problems)
    origin = get_origin(inner)
    if origin in (Union, UnionType):
        args = get_args(inner)
        structs = [a for a in args if _is_struct(a)]
        if value is None and type(None) in args:
            return None
        if len(structs) == 1 and isinstance(value, dict):
            return _validate_struct(value, structs[0], path, problems)
        literals = [a for a in args if get_origin(a) is Literal]
        if len(literals) == 1 and value is not None:  # an optional choice: name the choices
            return _validate(value, literals[0], path, problems)
    if origin is list and isinstance(value, list):
        (item_type,) = get_args(inner)
        if _is_struct(_unwrap(item_type)[0]):
            items = [_validate(v, item_type, f"{path}[{i}]", problems) for i, v in enumerate(value)]
            for meta in metas:
                if meta.min_length is not None and len(value) < meta.min_length:
                    problems.add(path, f"Expected `array` of length >= {meta.min_length}")
            return items
    if origin is Literal:
        choices = [str(c) for c in get_args(inner)]
        if isinstance(value, str) and value not in choices:
            problems.add(
                path,
                f"unknown value {value!r}; expected one of: {', '.join(choices)}"
                + _did_you_mean(value, choices),
            )
            return value
        if not isinstance(value, str):
            kind = type(value).__name__
            problems.add(path, f"expected one of: {', '.join(choices)}; got a {kind}")
            return value
    return _leaf(value, tp, path, problems)


def _leaf(value: Any, tp: Any, path: str, problems: _Problems) -> Any:
    try:
        return msgspec.convert(value, tp, strict=True)
    except msgspec.ValidationError as exc:
        error = exc
    if path in problems.interpolated and isinstance(value, str):
        try:
            return msgspec.convert(value, tp, strict=False)
        except msgspec.ValidationError as exc:
            error = exc
    problems.add(*_msgspec_problem(str(error), path))
    return value


def _validate_struct(value: Any, cls: type[msgspec.Struct], path: str, problems: _Problems) -> Any:
    if not isinstance(value, dict):
        return _leaf(value, cls, path, problems)
    fields = {f.encode_name: f for f in msgspec.structs.fields(cls)}
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            problems.add(path, f"mapping key: Expected `str`, got `{type(key).__name__}`")
            continue
        field = fields.get(key)
        if field is None:
            problems.add(path, f"unknown field `{key}`" + _did_you_mean(key, fields))
            continue
        before = len(problems)
        value_path = f"{path}.{key}"
        checked = _validate(item, field.type, value_path, problems)
        if len(problems) > before and problems.is_quiet(value_path) and not _required(field):
            continue  # a placeholder that is not even the right type: keep the default
        out[key] = checked
    for name, field in fields.items():
        if _required(field) and name not in value:
            problems.add(path, f"missing required field `{name}`")
    return out


def _required(field: msgspec.structs.FieldInfo) -> bool:
    return field.default is msgspec.NODEFAULT and field.default_factory is msgspec.NODEFAULT


def _msgspec_problem(message: str, path: str) -> tuple[str, str]:
    """msgspec's "Expected `int`, got `str` - at `$[0]`" → (path + "[0]", "Expected ...")."""
    text, sep, where = message.rpartition(" - at ")
    if not sep:
        text, where = message, ""
    for pattern, help_text in _PATTERN_HELP.items():
        text = text.replace(f"Expected `str` matching regex {pattern!r}", f"expected {help_text}")
    where = where.strip("`")
    key, in_sep, parent = where.partition("` in `")
    if in_sep and key == "key":  # a bad mapping key: "- at `key` in `$`"
        return path + parent[1:], f"mapping key: {text}"
    return path + where[1:], text


def _merge_route_defaults(doc: dict[str, Any]) -> None:
    """Per-route `breaker`/`latency` blocks override the global ones field by field.

    Runs on validated values, so a problem in the global block is reported once, at its own
    path, not again under every route that overrides something.
    """
    routes = doc.get("routes")
    if not isinstance(routes, list):
        return
    for section in ("breaker", "latency"):
        base = doc.get(section)
        base = base if isinstance(base, dict) else {}
        for route in routes:
            if isinstance(route, dict) and isinstance(route.get(section), dict):
                route[section] = {**base, **route[section]}


def _typed(value: Any, cls: type[_T]) -> _T | None:
    """`value` as `cls` when it validated cleanly, else None (its problems are reported)."""
    if value is None:
        return None
    try:
        return msgspec.convert(value, cls, strict=True)
    except msgspec.ValidationError:
        return None


def _check_semantics(doc: dict[str, Any], raw: dict[str, Any], problems: _Problems) -> None:
    """Checks across fields and items. Each runs on the fields it needs as soon as those are
    valid, so a typo in one field never hides a problem in another."""
    server = _typed(doc.get("server", {}), ServerConfig)
    if server is not None:
        # Every key by its digest, so a plain key and its sha256: form are the same key.
        keys: dict[bytes, str] = {}
        for i, key in enumerate(server.api_keys):
            if key.startswith("sha256:") and not re.fullmatch(r"[0-9a-fA-F]{64}", key[7:]):
                problems.add(f"$.server.api_keys[{i}]", "sha256: must be followed by 64 hex digits")
            else:
                keys.setdefault(_key_digest(key), f"$.server.api_keys[{i}]")
        client_names: set[str] = set()
        known_routes = {
            r["model"] for r in _items(raw, "routes") if isinstance(r.get("model"), str)
        }
        for i, client in enumerate(server.clients):
            where = f"$.server.clients[{i}]"
            key = client.key
            if key.startswith("sha256:") and not re.fullmatch(r"[0-9a-fA-F]{64}", key[7:]):
                problems.add(f"{where}.key", "sha256: must be followed by 64 hex digits")
            else:
                # One key, two owners: which limits apply would be an accident of order. The
                # message names paths only, never the key.
                digest = _key_digest(key)
                if digest in keys:
                    problems.add(f"{where}.key", f"the same key as {keys[digest]}")
                else:
                    keys[digest] = f"{where} (client {client.name})"
            if client.name in client_names:
                problems.add(f"{where}.name", f"duplicate client name {client.name!r}")
            client_names.add(client.name)
            for j, name in enumerate(client.routes):
                if name not in known_routes:
                    problems.add(f"{where}.routes[{j}]", f"unknown route {name!r}")
    # Names come from the raw document: a provider with a problem of its own still exists, so
    # routes naming it are not reported as well.
    names = [p["name"] for p in _items(raw, "providers") if isinstance(p.get("name"), str)]
    seen_providers: set[str] = set()
    for i, provider in enumerate(_items(doc, "providers")):
        _check_provider(f"$.providers[{i}]", provider, seen_providers, problems)
    seen_routes: set[str] = set()
    for i, route in enumerate(_items(doc, "routes")):
        _check_route(f"$.routes[{i}]", route, names, seen_routes, problems)
    _check_fallbacks(_items(doc, "routes"), _items(raw, "routes"), problems)


def _key_digest(key: str) -> bytes:
    """A client key as the gateway compares it: the sha256 of a plain key, or the given hash."""
    if key.startswith("sha256:"):
        return bytes.fromhex(key[7:])
    return hashlib.sha256(key.encode()).digest()


def _items(doc: dict[str, Any], section: str) -> list[dict[str, Any]]:
    """The mappings of a list section (anything else there is reported by the type walk)."""
    items = doc.get(section)
    return (
        [item if isinstance(item, dict) else {} for item in items]
        if isinstance(items, list)
        else []
    )


def _check_provider(
    where: str, provider: dict[str, Any], seen: set[str], problems: _Problems
) -> None:
    name, base_url = provider.get("name"), provider.get("base_url")
    if isinstance(name, str):
        if name in seen:
            problems.add(f"{where}.name", f"duplicate provider name {name!r}")
        seen.add(name)
    if isinstance(base_url, str):
        if not base_url.startswith(("http://", "https://")):
            problems.add(f"{where}.base_url", "must start with http:// or https://")
        elif not _is_plain_url(base_url):
            problems.add(f"{where}.base_url", "needs a host and no spaces or control characters")
    if provider.get("kind") == "azure" and not provider.get("api_version"):
        problems.add(f"{where}.api_version", "required for kind azure")


def _check_route(
    where: str, route: dict[str, Any], providers: list[str], seen: set[str], problems: _Problems
) -> None:
    model = route.get("model")
    if isinstance(model, str):
        if model in seen:
            problems.add(f"{where}.model", f"duplicate route {model!r}")
        seen.add(model)
    strategy = route.get("strategy", "hybrid")
    scoring = (route.get("within") or "round_robin") if strategy == "priority" else strategy
    weights = _typed(route.get("weights"), WeightsConfig)
    if weights is not None:
        if scoring != "hybrid":
            problems.add(
                f"{where}.weights",
                "weights only apply to strategy hybrid (or priority with within: hybrid)",
            )
        elif weights.cost + weights.latency + weights.reliability <= 0.0:
            problems.add(f"{where}.weights", "all weights are zero")
    if route.get("within") is not None and strategy != "priority":
        problems.add(f"{where}.within", "within only applies to strategy priority")
    affinity = route.get("affinity")
    key = affinity.get("key") if isinstance(affinity, dict) else None
    if isinstance(key, str) and not AFFINITY_KEY_RE.fullmatch(key):
        problems.add(
            f"{where}.affinity.key",
            f"{key!r} is not header:NAME or body:FIELD (e.g. header:x-session-id, body:user)",
        )
    _check_policy(where, strategy, _items(route, "targets"), problems)
    seen_targets: set[str] = set()
    for j, item in enumerate(_items(route, "targets")):
        twhere = f"{where}.targets[{j}]"
        provider = item.get("provider")
        if isinstance(provider, str) and provider not in providers:
            known = (
                f"known providers: {', '.join(providers)}"
                if providers
                else "no providers are configured (add them under `providers:`)"
            )
            problems.add(
                f"{twhere}.provider",
                f"unknown provider {provider!r}; {known}" + _did_you_mean(provider, providers),
            )
        target = _typed(item, TargetConfig)
        if target is None:
            continue
        target_id = target.target_id
        if target.id is None and not NAME_RE.fullmatch(target_id):
            problems.add(
                f"{twhere}.model", f"{target_id!r} is not a safe target id; set `id` explicitly"
            )
        elif target_id in seen_targets:
            problems.add(twhere, f"duplicate target id {target_id!r}; set `id`")
        seen_targets.add(target_id)


def _check_fallbacks(
    routes: list[dict[str, Any]], raw_routes: list[dict[str, Any]], problems: _Problems
) -> None:
    """Every fallback names a known route other than its own, once per list, and no list
    kind loops back to where it started (a → b → a): a chain must end."""
    known = [r["model"] for r in raw_routes if isinstance(r.get("model"), str)]
    index: dict[str, int] = {}  # a route's place in $.routes (the first, if named twice)
    for i, raw in enumerate(raw_routes):
        if isinstance(raw.get("model"), str):
            index.setdefault(raw["model"], i)
    for field in FALLBACK_FIELDS:
        graph: dict[str, list[tuple[int, str]]] = {}
        for i, route in enumerate(routes):
            names = route.get(field)
            model = route.get("model")
            if not isinstance(names, list) or not isinstance(model, str):
                continue
            seen: set[str] = set()
            for j, name in enumerate(names):
                where = f"$.routes[{i}].{field}[{j}]"
                if not isinstance(name, str):
                    continue
                if name == model:
                    problems.add(where, f"route {model!r} cannot fall back to itself")
                elif name not in index:
                    problems.add(
                        where,
                        f"unknown route {name!r}; known routes: {', '.join(known)}"
                        + _did_you_mean(name, known),
                    )
                elif name in seen:
                    problems.add(where, f"route {name!r} is listed twice")
                else:
                    graph.setdefault(model, []).append((j, name))
                seen.add(name)
        for cycle, j in _cycles(graph):
            where = f"$.routes[{index[cycle[0]]}].{field}[{j}]"
            problems.add(where, f"{field} go round in a cycle: {' → '.join(cycle)}")


def _cycles(graph: dict[str, list[tuple[int, str]]]) -> list[tuple[list[str], int]]:
    """Each cycle of `graph` once, as its routes (first repeated at the end) and the index in
    the first route's list of the edge that starts it."""
    found: list[tuple[list[str], int]] = []
    reported: set[frozenset[str]] = set()
    done: set[str] = set()

    def visit(node: str, path: list[str], edges: list[int]) -> None:
        for j, nxt in graph.get(node, ()):
            if nxt in path:
                start = path.index(nxt)
                members = frozenset(path[start:])
                if members not in reported:
                    reported.add(members)
                    found.append(([*path[start:], nxt], [*edges, j][start]))
            elif nxt not in done:
                visit(nxt, [*path, nxt], [*edges, j])
        done.add(node)

    for node in list(graph):
        if node not in done:
            visit(node, [node], [])
    return found


def _check_policy(
    where: str, strategy: Any, targets: list[dict[str, Any]], problems: _Problems
) -> None:
    """`priority` and `weight` belong to their strategies; a priority is set on every
    target or on none (where an unset one would sort among set ones is anybody's guess)."""
    with_priority = [j for j, t in enumerate(targets) if t.get("priority") is not None]
    for j, item in enumerate(targets):
        twhere = f"{where}.targets[{j}]"
        if item.get("priority") is not None and strategy != "priority":
            problems.add(f"{twhere}.priority", "priority only applies to strategy priority")
        weight = item.get("weight")
        if weight is not None and strategy != "weighted":
            problems.add(f"{twhere}.weight", "weight only applies to strategy weighted")
        elif isinstance(weight, int) and weight <= 0:
            problems.add(f"{twhere}.weight", f"must be a whole number above 0, got {weight}")
        if strategy == "priority" and with_priority and j not in with_priority:
            problems.add(
                f"{twhere}.priority",
                "set priority on every target of the route or on none (none: config order)",
            )


def _has_userinfo(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:  # refused with its own message by _check_semantics
        return False
    return parts.username is not None or parts.password is not None


def _is_plain_url(url: str) -> bool:
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        return False
    try:
        return bool(urlsplit(url).hostname)
    except ValueError:  # e.g. an unbalanced IPv6 bracket
        return False


def parse_config(
    raw: Any, *, env: Mapping[str, str] | None = None, state_only: bool = False
) -> Config:
    """Validate an already-parsed YAML/JSON document and return the Config.

    Raises ConfigErrors listing every problem found (`errors`), each a `$.path: ...` line.
    `state_only`: load for commands that only read shared state (`edgeroute state`,
    `explain`): unset ${VAR}s in server settings and provider connection fields (keys, URLs,
    headers) become placeholders instead of errors. Never serve such a config.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigErrors(["$: expected a mapping at the top level"])
    problems = _Problems()
    expanded = _walk(raw, "$", os.environ if env is None else env, problems, state_only)
    problems.label(expanded)
    doc = _validate(expanded, Config, "$", problems)
    _merge_route_defaults(doc)
    _check_semantics(doc, expanded, problems)
    problems.raise_if_any()
    try:
        return msgspec.convert(doc, Config, strict=True)
    except msgspec.ValidationError as exc:  # pragma: no cover - the walk above is stricter
        raise ConfigErrors([_printable(": ".join(_msgspec_problem(str(exc), "$")))]) from None


def require_routes(config: Config) -> None:
    """A gateway without routes answers every request with 404: refuse to check or serve it."""
    if not config.routes:
        raise ConfigError(
            "$.routes: no routes configured, so every request would get a 404; add a route "
            "(see examples/openai.yaml) or start with `edgeroute serve --model gpt-4o-mini`"
        )


def _printable(text: str) -> str:
    """Escape control characters so an error stays ONE line whatever the input contained."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], text)


def load_config(
    path: str | Path, *, env: Mapping[str, str] | None = None, state_only: bool = False
) -> Config:
    """Read, interpolate and validate a YAML config file; raises ConfigError (ConfigErrors
    with every problem found when the file is readable YAML). See parse_config."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(_printable(f"$: cannot read {file}: {exc.strerror or exc}")) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            _printable(f"$: cannot read {file}: not UTF-8 (byte offset {exc.start})")
        ) from None
    return loads_config(text, source=str(file), env=env, state_only=state_only)


def loads_config(
    text: str,
    *,
    source: str = "<config>",
    env: Mapping[str, str] | None = None,
    state_only: bool = False,
) -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(_printable(f"$: invalid YAML at {where}: {problem}")) from None
    config = parse_config(raw, env=env, state_only=state_only)
    return apply_env_overrides(config, os.environ if env is None else env)


# `edgeroute serve --model NAME`: the provider each model name goes to, and where that
# provider's key and (overridable, e.g. to a local mock or proxy) base URL come from.
QUICK_PROVIDERS: dict[str, tuple[str, str, str]] = {
    "openai": ("OPENAI_API_KEY", "OPENAI_BASE_URL", "https://api.openai.com/v1"),
    "anthropic": ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "https://api.anthropic.com/v1"),
}
# With two or more models, this route tries them in the order given (cost strategy, no prices:
# ties keep configuration order), failing over to the next one.
FALLBACK_ROUTE = "auto"


def config_from_models(models: Sequence[str], env: Mapping[str, str]) -> Config:
    """A config with no file: one route per model (clients ask for it by name), plus
    FALLBACK_ROUTE over all of them when there are several.

    A model goes to Anthropic when it is written `anthropic:NAME` or starts with `claude`, to
    OpenAI (or any OpenAI-compatible server at OPENAI_BASE_URL) otherwise or when written
    `openai:NAME`. EDGEROUTE_ADMIN_TOKEN and EDGEROUTE_CLIENT_KEY, when set, turn on the
    admin endpoints and client authentication; EDGEROUTE_REDIS_URL shares state as usual.
    """

    def literal(value: str) -> str:
        return value.replace("$", "$$")  # values from the environment are never ${...} templates

    providers: dict[str, dict[str, Any]] = {}
    targets: dict[str, dict[str, str]] = {}
    for spec in models:
        prefix, sep, rest = spec.partition(":")
        provider, model = (prefix, rest) if sep and prefix in QUICK_PROVIDERS else ("", spec)
        provider = provider or ("anthropic" if model.startswith("claude") else "openai")
        key_var, url_var, default_url = QUICK_PROVIDERS[provider]
        key, url = env.get(key_var), env.get(url_var)
        if not key and not url:
            raise ConfigError(
                f"--model {spec}: set {key_var} (or {url_var}, for an {provider}-compatible "
                "server that needs no key)"
            )
        entry: dict[str, Any] = {"name": provider, "kind": provider, "base_url": default_url}
        if url:
            entry["base_url"] = literal(url)
        if key:
            entry["api_key"] = literal(key)
        providers[provider] = entry
        targets.setdefault(model, {"provider": provider, "model": model})
    routes: list[dict[str, Any]] = [
        {"model": model, "strategy": "cost", "targets": [target]}
        for model, target in targets.items()
    ]
    if len(targets) > 1 and FALLBACK_ROUTE not in targets:
        routes.append(
            {"model": FALLBACK_ROUTE, "strategy": "cost", "targets": list(targets.values())}
        )
    server: dict[str, Any] = {}
    if env.get("EDGEROUTE_ADMIN_TOKEN"):
        server["admin_token"] = literal(env["EDGEROUTE_ADMIN_TOKEN"])
    if env.get("EDGEROUTE_CLIENT_KEY"):
        server["api_keys"] = [literal(env["EDGEROUTE_CLIENT_KEY"])]
    document = {"server": server, "providers": list(providers.values()), "routes": routes}
    return apply_env_overrides(parse_config(document, env={}), env)


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
