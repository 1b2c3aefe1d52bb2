"""The `edgeroute` command: check a config, explain a route, dump state, run a mock upstream.

Every subcommand is a thin shell over the library: it loads the config, builds what the
gateway would build, and prints. Errors are ONE line on stderr, prefixed `edgeroute:`:

- exit 2: the input is wrong (a config error, an unknown route, a bad flag);
- exit 1: something else went wrong (state unreachable, an unexpected exception; set
  `EDGEROUTE_DEBUG=1` for the traceback).

Nothing printed ever contains a secret: provider API keys, admin tokens and client keys from
the config are redacted wherever they would appear, and credentials inside URLs
(`redis://user:pass@host`) are shown as `user:***@`.

More subcommands (`serve`, `demo`) plug in via `build_parser()`: add a subparser there and
set its `handler` default to a function `(args) -> int`.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec

from edgeroute.config import (
    FALLBACK_ROUTE,
    Config,
    ConfigErrors,
    config_from_models,
    load_config,
    require_routes,
)
from edgeroute.errors import ConfigError, StateUnavailable
from edgeroute.explain import explanation_json, state_document
from edgeroute.router import Explanation, Router, TargetExplanation
from edgeroute.state import StateHealth, build_state
from edgeroute.strategy import RoutingStrategy
from edgeroute.types import RouteSnapshot

PROG = "edgeroute"

# One-off diagnostics may open a fresh connection and load scripts; the request-path budget
# (`state.timeout_ms`, 50 ms by default) is too tight for that, so the CLI waits at least this.
_CLI_STATE_TIMEOUT_MS = 2000.0


# --- secrets -------------------------------------------------------------------------------

_URL_CREDENTIALS = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/\s]*):(?P<password>[^@/\s]*)@"
)
_QUERY_SECRETS = re.compile(
    r"(?P<key>[?&](?:password|passwd|pass|pwd|token|api_key|apikey|key|secret)=)[^&#\s]*",
    re.IGNORECASE,
)
_MIN_SECRET_LEN = 4


class Redactor:
    """Masks URL credentials and every secret value it has been told about."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()

    def add(self, *values: str | None) -> None:
        for value in values:
            # Very short values would mask random substrings and say little; skip them.
            if value and len(value) >= _MIN_SECRET_LEN:
                self._secrets.add(value)

    def add_config(self, config: Config) -> None:
        self.add(config.server.admin_token, *config.server.api_keys)
        self.add(*(client.key for client in config.server.clients))
        for provider in config.providers:
            self.add(provider.api_key, _url_password(provider.base_url), *provider.headers.values())
        if config.state.redis_url:
            self.add(_url_password(config.state.redis_url))

    def __call__(self, text: str) -> str:
        text = mask_url_credentials(text)
        # Longest first, so a secret that contains another is masked whole.
        for secret in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return text


def mask_url_credentials(text: str) -> str:
    """`redis://user:pass@host` → `redis://user:***@host`; `?password=x` → `?password=***`."""
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _QUERY_SECRETS.sub(lambda m: f"{m['key']}***", text)


def _url_password(url: str) -> str | None:
    match = _URL_CREDENTIALS.search(url)
    return match["password"] if match else None


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


# --- output helpers ------------------------------------------------------------------------


class _Output:
    """Where a command writes: stdout for results, stderr for notes; both redacted."""

    def __init__(self, redact: Redactor) -> None:
        self.redact = redact
        # The shared state's URL once a config is loaded, for "state unavailable" errors.
        self.state_url: str | None = None

    def print(self, text: str = "") -> None:
        print(self.redact(text), file=sys.stdout)

    def note(self, text: str) -> None:
        """One line on stderr (errors and notes never span lines)."""
        print(self.redact(_one_line(text)), file=sys.stderr)


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    body = [list(headers), *(list(row) for row in rows)]
    widths = [max(len(row[i]) for row in body) for i in range(len(headers))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in body
    ]
    return "\n".join(line.rstrip() for line in lines)


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


# --- shared plumbing -----------------------------------------------------------------------


def _load(args: argparse.Namespace, out: _Output, *, state_only: bool = False) -> Config:
    """The config of `--config`; `state_only` for commands that only read shared state (they
    must run without the fleet's provider keys and tokens: see config.parse_config)."""
    config = load_config(args.config, state_only=state_only)
    out.redact.add_config(config)
    out.state_url = config.state.redis_url
    return config


def _state_label(config: Config) -> str:
    return "redis" if config.state.redis_url else "memory"


def _make_router(config: Config) -> Router:
    """A Router on the configured state with no degraded mode (the CLI wants Redis's own
    answer or an error) and a CLI-friendly timeout."""
    try:
        state = build_state(config.state, degrade=False, min_timeout_ms=_CLI_STATE_TIMEOUT_MS)
    except ConfigError as exc:
        source = " (from EDGEROUTE_REDIS_URL)" if os.environ.get("EDGEROUTE_REDIS_URL") else ""
        # build_state names the path already: say where the URL came from, once.
        message = str(exc).removeprefix("$.state.redis_url: ")
        raise ConfigError(f"$.state.redis_url{source}: {message}") from None
    return Router(config, state)


def _in_memory_note(out: _Output, config: Config) -> None:
    if not config.state.redis_url:
        out.note(
            "note: state is in-memory (no state.redis_url / EDGEROUTE_REDIS_URL), so this is "
            "a fresh process's view, not a running gateway's"
        )


# --- check ---------------------------------------------------------------------------------


def _cmd_check(args: argparse.Namespace, out: _Output) -> int:
    config = _load(args, out)
    require_routes(config)

    async def build() -> None:
        router = _make_router(config)  # compiles every route and parses the state URL
        try:
            if args.connect:
                # A read of every route: connects (to each slot's node on a cluster), loads
                # the Lua scripts and runs one; changes nothing.
                for route in config.routes:
                    await router.state.snapshot(router.route(route.model))
        finally:
            await router.close()

    asyncio.run(build())
    state = _state_label(config)
    if config.state.redis_url:
        state += f" {config.state.redis_url}"
    out.print(
        f"config OK: {_plural(len(config.providers), 'provider')}, "
        f"{_plural(len(config.routes), 'route')} (state: {state})"
    )
    if args.connect:
        if config.state.redis_url:
            out.print(
                f"state OK: reached {config.state.redis_url}, loaded the scripts and read "
                f"{_plural(len(config.routes), 'route')}"
            )
        else:
            out.print("state OK: in-memory, nothing to connect to")
    return 0


# --- explain -------------------------------------------------------------------------------


def _strategy_text(strategy: RoutingStrategy) -> str:
    if strategy.kind == "priority":
        return f"priority, within {_strategy_text(strategy.inner)}"
    if strategy.kind != "hybrid":
        return strategy.kind
    return (
        f"hybrid, weights cost {strategy.cost_weight:.2f} / latency {strategy.latency_weight:.2f}"
        f" / reliability {strategy.reliability_weight:.2f}"
    )


def _policy_lines(explanation: Explanation) -> list[str]:
    """The route's traffic policies in a line each (the JSON has the same fields)."""
    document = explanation_json(explanation)
    lines = []
    if document["priority_groups"]:
        groups = "; ".join(
            f"{g['priority']}: {', '.join(g['targets'])}" for g in document["priority_groups"]
        )
        lines.append(f"priority groups (lower first): {groups}")
    if explanation.strategy.kind == "weighted":
        weights = ", ".join(
            f"{t['target']} {t['weight']} (current {t['current_weight']})"
            for t in document["targets"]
        )
        lines.append(f"weights: {weights}")
    if document["breaker_scope"] != "target":
        lines.append(f"breaker scope: {document['breaker_scope']}")
    if document["affinity"]:
        affinity = document["affinity"]
        lines.append(f"affinity: {affinity['key']}, {affinity['pins']} live pins")
    return lines


def _explanation_text(explanation: Explanation, state: str) -> str:
    """The explain JSON's essentials in 100 columns (for target ids up to ~19 characters):
    what ranks (the decayed estimate, error rate, its age, exploration), then the window's
    statistics; why a target is excluded goes under the table, where it has room."""
    ordered = _by_rank(explanation.targets)
    rows = [
        [
            t.spec.id,
            t.snapshot.state.value,
            _fmt(t.score, ".3f"),
            "-" if t.rank is None else str(t.rank),
            _fmt(t.snapshot.estimate_ms),
            _error_rate(t),
            _age(t.snapshot.estimate_age_ms),
            _exploration(t),
            str(t.snapshot.inflight),
            _fmt(t.snapshot.latency_ms),
            _pct(t.snapshot.success_rate),
        ]
        for t in ordered
    ]
    headers = [
        "TARGET",
        "STATE",
        "SCORE",
        "RANK",
        "EST MS",
        "ERR",
        "AGE",
        "EXPLORE",
        "IN-FLIGHT",
        "WIN MS",
        "WIN OK",
    ]
    excluded = [f"  {t.spec.id}: {t.excluded_because}" for t in ordered if t.excluded_because]
    lines = [
        f"route {explanation.route} ({_strategy_text(explanation.strategy)}; state: {state})",
        *_policy_lines(explanation),
        _table(headers, rows),
        *(["excluded:", *excluded] if excluded else []),
        f"reason: {explanation.reason}",
    ]
    fallbacks = explanation.fallbacks
    if fallbacks:
        lines.append(
            f"fallback chain: {' -> '.join(explanation.chain)}"
            + "".join(
                f"; {label}: {', '.join(names)}"
                for label, names in (
                    ("context window", fallbacks.context_window),
                    ("content policy", fallbacks.content_policy),
                )
                if names
            )
        )
    return "\n".join(lines)


def _error_rate(target: TargetExplanation) -> str:
    """`-` for a target nothing was ever learnt about, else its decayed error rate."""
    snapshot = target.snapshot
    if snapshot.estimate_us is None and not snapshot.error_rate:
        return "-"
    return _pct(snapshot.error_rate)


def _age(ms: int | None) -> str:
    """An estimate's age, short: `-` (never measured), `850ms`, `4.2s`, `75s`, `12m`."""
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms}ms"
    if ms < 10_000:
        return f"{ms / 1000:.1f}s"
    if ms < 600_000:
        return f"{ms // 1000}s"
    return f"{ms // 60_000}m"


def _exploration(target: TargetExplanation) -> str:
    """`next` (the next request re-measures it), `N live` (explorations in flight),
    `stale` (due, waiting for the budget), `-` (the estimate is fresh)."""
    if target.explore:
        return "next"
    live = target.snapshot.explorations_in_use
    if live:
        return f"{live} live"
    return "stale" if target.snapshot.stale else "-"


def _by_rank(targets: list[TargetExplanation]) -> list[TargetExplanation]:
    """The next request's pick first, then the runners-up, then the excluded (config order)."""
    excluded = len(targets)
    return sorted(targets, key=lambda t: excluded if t.rank is None else t.rank)


def _cmd_explain(args: argparse.Namespace, out: _Output) -> int:
    config = _load(args, out, state_only=True)
    _require_route(config, args.route)

    async def run() -> Explanation:
        router = _make_router(config)
        try:
            return await router.explain(args.route)
        finally:
            await router.close()

    explanation = asyncio.run(run())
    state = _state_label(config)
    if args.json:
        out.print(json.dumps(explanation_json(explanation), indent=2))
    else:
        out.print(_explanation_text(explanation, state))
    _in_memory_note(out, config)
    return 0


class _UsageError(Exception):
    """Bad input found after argument parsing (exit 2, like argparse)."""


def _require_route(config: Config, name: str) -> None:
    known = [route.model for route in config.routes]
    if name not in known:
        choices = ", ".join(known) if known else "none configured"
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.7)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        raise _UsageError(f"unknown route {name!r} (routes: {choices}){hint}")


# --- state ---------------------------------------------------------------------------------


def _snapshot_text(snapshot: RouteSnapshot, strategy: RoutingStrategy) -> str:
    label = strategy.kind
    if strategy.kind == "round_robin":
        label += f", next rr cursor {snapshot.rr_cursor}"
    headers = [
        "TARGET",
        "STATE",
        "GEN",
        "FAILS",
        "OPEN MS",
        "COOLDOWN MS",
        "IN-FLIGHT",
        "PROBES",
        "OK",
        "ERR",
        "LATENCY MS",
        "SUCCESS",
        "TOKENS IN/OUT",
    ]
    rows = [
        [
            t.target_id,
            t.state.value,
            str(t.generation),
            str(t.consecutive_failures),
            str(t.open_remaining_ms),
            str(t.cooldown_remaining_ms),
            str(t.inflight),
            str(t.probes_in_use),
            str(t.successes),
            str(t.failures),
            _fmt(t.latency_ms),
            _pct(t.success_rate),
            f"{t.input_tokens}/{t.output_tokens}",
        ]
        for t in snapshot.targets
    ]
    return f"route {snapshot.route} ({label})\n" + _table(headers, rows)


def _cmd_state(args: argparse.Namespace, out: _Output) -> int:
    config = _load(args, out, state_only=True)
    if args.route is not None:
        _require_route(config, args.route)
        names = [args.route]
    else:
        names = [route.model for route in config.routes]

    async def run() -> tuple[StateHealth, list[Explanation]]:
        router = _make_router(config)
        try:
            return router.health(), [await router.explain(name) for name in names]
        finally:
            await router.close()

    health, explanations = asyncio.run(run())
    snapshots = [e.snapshot for e in explanations]
    state = _state_label(config)
    if args.json:
        # The same document as the gateway's GET /admin/state.
        out.print(json.dumps(state_document(health, explanations), indent=2))
    elif not snapshots:
        out.print(f"no routes configured (state: {state})")
    else:
        out.print("\n\n".join(_snapshot_text(e.snapshot, e.strategy) for e in explanations))
    _in_memory_note(out, config)
    return 0


# --- mock-provider -------------------------------------------------------------------------


def _cmd_mock_provider(args: argparse.Namespace, out: _Output) -> int:
    # Imported here: aiohttp and the mock are only needed by this subcommand.
    from edgeroute import mock_provider

    prog = f"{PROG} mock-provider"
    parser = mock_provider.build_arg_parser(prog=prog)
    options = parser.parse_args(args.mock_args)
    try:
        settings = mock_provider.settings_from_args(options)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        mock_provider.serve_mock_provider(options.host, options.port, settings, options.name)
    except OSError as exc:
        out.note(f"{prog}: cannot listen on {options.host}:{options.port}: {exc}")
        return 1
    return 0


# --- serve and demo ------------------------------------------------------------------------


def _serve_config(args: argparse.Namespace, out: _Output) -> Config:
    """`--config FILE`, or with `--model NAME...` a config built from the environment."""
    if args.model and args.config:
        raise _UsageError("give --config FILE or --model MODEL, not both")
    if not args.model:
        if not args.config:
            raise _UsageError(
                "serve needs --config FILE, or --model MODEL (repeatable) to serve models with "
                "OPENAI_API_KEY / ANTHROPIC_API_KEY from the environment"
            )
        config = _load(args, out)
        require_routes(config)
        return config
    config = config_from_models(args.model, os.environ)
    out.redact.add_config(config)
    out.state_url = config.state.redis_url
    routes = []
    for route in config.routes:
        via = ", then ".join(t.model for t in route.targets)
        if route.model == FALLBACK_ROUTE:
            routes.append(f"{route.model} ({via})")
        else:
            routes.append(f"{route.model} ({route.targets[0].provider})")
    out.note(f"{PROG}: no config file; models: {', '.join(routes)}")
    return config


def _cmd_serve(args: argparse.Namespace, out: _Output) -> int:
    from edgeroute.launch import serve_config
    from edgeroute.workers import WorkersError, resolve_workers

    config = _serve_config(args, out)
    try:
        workers, note = resolve_workers(args.workers, config)
    except WorkersError as exc:
        raise _UsageError(str(exc)) from None
    if note:
        out.note(note)
    server = config.server
    overrides: dict[str, Any] = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if overrides:
        server = msgspec.structs.replace(server, **overrides)
        config = msgspec.structs.replace(config, server=server)
    try:
        return serve_config(config, workers, config_path=args.config)
    except WorkersError as exc:
        raise _UsageError(str(exc)) from None
    except OSError as exc:
        raise _UsageError(
            f"cannot listen on {config.server.host}:{config.server.port}: {exc.strerror or exc}"
        ) from None


def _cmd_demo(args: argparse.Namespace, out: _Output) -> int:
    from edgeroute.launch import demo

    try:
        return demo(args.port, args.mock_base_port)
    except OSError as exc:
        raise _UsageError(f"cannot start the demo: {exc.strerror or exc}") from None


def _cmd_simulate(args: argparse.Namespace, out: _Output) -> int:
    from edgeroute import simulate as sim

    scenarios = sim.builtin_scenarios()
    if args.file:
        from_file = sim.load_scenarios(args.file)
        scenarios = [*scenarios, *from_file] if args.builtin else from_file
    if args.scenario:
        known = {s.name for s in scenarios}
        unknown = [name for name in args.scenario if name not in known]
        if unknown:
            raise _UsageError(f"unknown scenario {unknown[0]!r}; known: {', '.join(sorted(known))}")
        scenarios = [s for s in scenarios if s.name in args.scenario]
    if args.backend == "redis":
        if not args.redis_url:
            raise _UsageError("--backend redis needs --redis-url (or EDGEROUTE_REDIS_URL)")
        out.state_url = args.redis_url
        factory = sim.redis_state_factory(args.redis_url)
    else:
        factory = sim.memory_state
    reports = sim.simulate_all(scenarios, factory, args.seed)
    if args.json:
        out.print(json.dumps(sim.report_json(reports), indent=2))
    else:
        out.print(sim.render(reports))
    missed = [g for r in reports for g in r.goals if g["status"] == "MISS"]
    return 1 if missed and args.check else 0


def _add_simulate_parser(sub: Any) -> None:
    simulate = sub.add_parser(
        "simulate",
        help="replay routing scenarios in virtual time against an oracle",
        description="Drive the real state code (memory, or Redis through its test clock) "
        "through scenarios in virtual time - built-in ones (latency-shift, outage, "
        "near-equal, capacity, cost-vs-latency) and/or a YAML file - and print mean/p95 "
        "latency, cost, failures, time to leave a degraded target and to come back, next to "
        "an oracle and round-robin, with each scenario's PASS/MISS targets.",
    )
    simulate.add_argument("--file", "-f", metavar="YAML", help="scenarios file (`scenarios:`)")
    simulate.add_argument(
        "--builtin",
        action="store_true",
        help="with --file: run the built-in scenarios too",
    )
    simulate.add_argument(
        "--scenario", "-s", action="append", metavar="NAME", help="only this scenario (repeat)"
    )
    simulate.add_argument("--backend", choices=("memory", "redis"), default="memory")
    simulate.add_argument(
        "--redis-url",
        default=os.environ.get("EDGEROUTE_REDIS_URL"),
        help="Redis for --backend redis (keys get a random prefix)",
    )
    simulate.add_argument("--seed", type=int, default=1, help="arrivals and luck (default 1)")
    simulate.add_argument("--json", action="store_true", help="print JSON instead of tables")
    simulate.add_argument("--check", action="store_true", help="exit 1 when any target is a MISS")
    simulate.set_defaults(handler=_cmd_simulate)


# --- parser and entry point ----------------------------------------------------------------


# --- fleet ---------------------------------------------------------------------------------


def _cmd_fleet(args: argparse.Namespace, out: _Output) -> int:
    """Live replicas from their Redis heartbeats; exit 1 when any runs another config."""
    from edgeroute import fleet
    from edgeroute.reload import file_hash

    config = _load(args, out)
    if not config.state.redis_url:
        raise _UsageError(
            "the fleet view needs shared state: set state.redis_url or EDGEROUTE_REDIS_URL"
        )
    expected = file_hash(args.config)

    async def read() -> list[fleet.Heartbeat]:
        client = fleet.redis_client(config.state.redis_url or "", cluster=config.state.cluster)
        try:
            return await fleet.Heartbeats(client, config.state.key_prefix).read()
        except Exception as exc:
            raise StateUnavailable(type(exc).__name__) from None
        finally:
            await client.aclose()

    view = fleet.fleet_view(asyncio.run(read()), me=None, expected=expected)
    if args.json:
        out.print(json.dumps({"config_file_hash": expected, **view}, indent=2))
    else:
        now = time.time()
        rows = [
            (
                r["replica"],
                r["version"],
                r["config_hash"] + (" (differs)" if r["config_mismatch"] else ""),
                r["shared_state"],
                f"{now - r['started_at']:.0f}s ago",
            )
            for r in view["replicas"]
        ]
        out.print(f"config file {args.config}: hash {expected}")
        out.print(_table(["REPLICA", "VERSION", "CONFIG", "STATE", "STARTED"], rows))
        mismatched = sum(1 for r in view["replicas"] if r["config_mismatch"])
        out.print(
            f"{_plural(len(rows), 'live replica')}, {mismatched} on another config"
            if rows
            else "no live replicas (none has written a heartbeat recently)"
        )
    return 0 if view["consistent"] else 1


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", required=True, metavar="FILE", help="edgeroute YAML config file"
    )


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each subcommand sets `handler` (and may add more later)."""
    from edgeroute import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="edgeroute: a cluster-consistent LLM routing gateway.",
        epilog="Set EDGEROUTE_DEBUG=1 to see tracebacks of unexpected errors.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    check = sub.add_parser(
        "check",
        help="validate a config file",
        description="Load and validate a config file and report every problem, one "
        "`$.path: ...` line each; exit 0 if the gateway could run it, 2 otherwise. No network "
        "I/O unless --connect.",
    )
    _add_config_option(check)
    check.add_argument(
        "--connect",
        action="store_true",
        help="also reach the shared state (Redis), load the Lua scripts and read every route; "
        "exit 1 with one line if it is unreachable",
    )
    check.set_defaults(handler=_cmd_check)

    explain = sub.add_parser(
        "explain",
        help="show how a route would pick its next target",
        description="A dry run of the routing decision for ROUTE: every target's breaker "
        "state, score and rank (1 = the next request's pick), and why excluded targets are. "
        "Changes no state.",
    )
    _add_config_option(explain)
    explain.add_argument("route", metavar="ROUTE", help="route name (the `model` clients send)")
    explain.add_argument("--json", action="store_true", help="print JSON instead of a table")
    explain.set_defaults(handler=_cmd_explain)

    state = sub.add_parser(
        "state",
        help="dump the routing state of every route",
        description="Print each target's breaker, window and in-flight state.",
    )
    _add_config_option(state)
    state.add_argument("--route", "-r", metavar="ROUTE", help="only this route")
    state.add_argument("--json", action="store_true", help="print JSON instead of tables")
    state.set_defaults(handler=_cmd_state)

    serve = sub.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway until SIGTERM/SIGINT, then drain in-flight requests "
        "(server.shutdown_timeout_s) and exit 0. No Redis configured: in-memory state. "
        "Without a config file: `edgeroute serve --model gpt-4o-mini --model "
        "claude-3-5-haiku-latest` with the providers' keys in the environment.",
    )
    serve.add_argument("--config", "-c", metavar="FILE", help="edgeroute YAML config file")
    serve.add_argument(
        "--model",
        "-m",
        action="append",
        metavar="MODEL",
        help="serve MODEL with no config file (repeatable): claude* and anthropic:NAME go to "
        "Anthropic (ANTHROPIC_API_KEY, ANTHROPIC_BASE_URL), others to OpenAI (OPENAI_API_KEY, "
        f"OPENAI_BASE_URL); with several, route `{FALLBACK_ROUTE}` tries them in order",
    )
    serve.add_argument("--host", help="listen address (overrides server.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides server.port)")
    serve.add_argument(
        "--workers",
        metavar="N",
        default=os.environ.get("EDGEROUTE_WORKERS") or "1",
        help="gateway processes sharing the port (default 1, or EDGEROUTE_WORKERS); `auto`: "
        "one per CPU this process may use; more than 1 needs Redis state",
    )
    serve.set_defaults(handler=_cmd_serve)

    fleet = sub.add_parser(
        "fleet",
        help="list the live replicas and the config each runs",
        description="Read every replica's heartbeat from shared Redis: id, version, config "
        "hash, start time, live/degraded. Exit 1 when a replica runs a config other than "
        "FILE (compared by hash of the file as written, before ${ENV}).",
    )
    _add_config_option(fleet)
    fleet.add_argument("--json", action="store_true", help="print JSON instead of a table")
    fleet.set_defaults(handler=_cmd_fleet)

    demo = sub.add_parser(
        "demo",
        help="run the gateway in front of three built-in mock upstreams",
        description="Start three mock upstreams (fast, cheap, flaky) and a gateway on "
        "in-memory state in front of them: routing and failover with no API key.",
    )
    demo.add_argument("--port", type=int, default=8080, help="gateway port (default 8080)")
    demo.add_argument(
        "--mock-base-port",
        type=int,
        default=9101,
        help="first mock upstream port (default 9101; uses three)",
    )
    demo.set_defaults(handler=_cmd_demo)

    mock = sub.add_parser(
        "mock-provider",
        add_help=False,
        help="run a fake upstream (OpenAI API and Anthropic Messages API)",
        description="Run a fake upstream; see `edgeroute mock-provider -h`.",
    )
    mock.set_defaults(handler=_cmd_mock_provider)
    _add_simulate_parser(sub)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    # mock-provider owns its flags (edgeroute.mock_provider.build_arg_parser): hand it
    # whatever follows its name, untouched; every other command parses strictly.
    if argv and argv[0] == "mock-provider":
        args = parser.parse_args(argv[:1])
        args.mock_args = argv[1:]
        return args
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the `edgeroute` command line; returns the process exit code."""
    parser = build_parser()
    args = _parse(parser, sys.argv[1:] if argv is None else list(argv))
    redact = Redactor()
    out = _Output(redact)
    handler: Callable[[argparse.Namespace, _Output], int] = args.handler
    try:
        return handler(args, out)
    except ConfigErrors as exc:
        for error in exc.errors:  # every problem at once, one line each
            out.note(f"{PROG}: {error}")
        return 2
    except (ConfigError, _UsageError) as exc:
        out.note(f"{PROG}: {exc}")
        return 2
    except StateUnavailable as exc:
        where = f" at {out.state_url}" if out.state_url else ""
        out.note(f"{PROG}: state unavailable{where}: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `edgeroute state | head`: the reader left; say nothing more.
        _silence_stdout()
        return 1
    except Exception as exc:
        if os.environ.get("EDGEROUTE_DEBUG") == "1":
            print(redact(traceback.format_exc()), file=sys.stderr, end="")
        message = str(exc)
        out.note(
            f"{PROG}: {type(exc).__name__}: {message}"
            if message
            else f"{PROG}: {type(exc).__name__}"
        )
        return 1


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    raise SystemExit(main())
