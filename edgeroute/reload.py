"""Config reload without restart: validate a new config, then swap it in between requests.

A reload (SIGHUP, or the config file changing — Kubernetes swaps a ConfigMap through a
symlink, so the watcher polls the resolved file's inode, mtime and size) builds a new
`Generation`: a Router on the SAME state backend and adapters for new or changed providers.
It replaces the live one in a single assignment on the event loop, so each request runs on
the generation it started with, start to finish. Routing state is keyed by route name and
target id, so targets that survive a reload keep their breakers, windows and cursors.

A config that does not load, or that changes what only a restart can change (listen
address, shared-state settings, `server.api_keys` and the admin token), is refused with one
log line; the running config keeps serving. Client keys with limits (`server.clients`) and
target quotas do reload: each request looks its client up in the generation it starts on.

Under `serve --workers N` the supervisor is the one process that reads the file (on SIGHUP
and from its own watch) and runs `check`; the workers `apply` what it hands them (see
edgeroute.workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import msgspec
import yaml
from aiohttp import web

from edgeroute.clients import ClientSpec, compile_clients
from edgeroute.config import Config, load_config
from edgeroute.errors import ConfigError
from edgeroute.metrics import Metrics
from edgeroute.providers import ProviderAdapter, make_adapter
from edgeroute.providers.http1 import UpstreamClient
from edgeroute.router import Router, compile_route
from edgeroute.state import StateBackend

log = logging.getLogger("edgeroute.reload")

WATCH_ENV = "EDGEROUTE_CONFIG_WATCH_S"
DEFAULT_WATCH_S = 5.0
# The only server fields a reload applies: the Router reads its failover policy, and the auth
# middleware and the proxy read `clients` from the generation. Every other one (socket,
# api_keys, admin token, deadlines, connection cap) was captured at start.
# (host and port are taken from the running server before comparing: `serve --host/--port`
# may override the file, and a socket cannot move anyway.)
_RELOADABLE_SERVER = frozenset({"max_attempts", "request_timeout_s", "clients"})


def document_hash(document: object) -> str:
    """12 hex digits of sha256 over the document as written (before `${ENV}`): the same file
    hashes the same on every replica and on an operator's laptop, and no secret is hashed."""
    canonical = msgspec.json.encode(document, order="sorted")
    return hashlib.sha256(canonical).hexdigest()[:12]


def file_hash(path: str | Path) -> str:
    """The hash of a config file (see `document_hash`); raises ConfigError like load_config."""
    try:
        document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"$: cannot hash {path}: {exc}") from None
    return document_hash(document)


def config_hash(config: Config) -> str:
    """For a Config that came from no file (library use, tests): its validated value."""
    return document_hash(msgspec.to_builtins(config))


@dataclass(frozen=True, slots=True)
class Generation:
    """One config and everything built from it that requests use."""

    config: Config
    router: Router
    adapters: Mapping[str, ProviderAdapter]
    hash: str
    clients: tuple[ClientSpec, ...]  # server.clients, compiled: key digests and limits

    @property
    def state_loss_policies(self) -> list[str]:
        """The on_state_loss policies some limit of this config follows (sorted)."""
        return sorted(
            {c.on_state_loss for c in self.clients if c.limited}
            | {
                t.on_state_loss
                for r in self.router.routes.values()
                for t in r.targets
                if t.has_quota
            }
        )


def generation(
    config: Config, router: Router, adapters: Mapping[str, ProviderAdapter], digest: str
) -> Generation:
    return Generation(config, router, adapters, digest, tuple(compile_clients(config)))


class Live:
    """The generation new requests start on; replaced whole, never changed in place."""

    __slots__ = ("current", "on_swap")

    def __init__(self, current: Generation) -> None:
        self.current = current
        self.on_swap: list[Callable[[Generation, Generation], None]] = []

    def swap(self, new: Generation) -> None:
        old, self.current = self.current, new
        for callback in self.on_swap:
            callback(old, new)


def _restart_only_change(old: Config, new: Config) -> str | None:
    if new.state != old.state:
        return "$.state"
    for name in new.server.__struct_fields__:
        if name in _RELOADABLE_SERVER:
            continue
        if getattr(new.server, name) != getattr(old.server, name):
            return f"$.server.{name}"
    return None


def _diff(old: Config, new: Config) -> str:
    before = {r.model: r for r in old.routes}
    after = {r.model: r for r in new.routes}
    added = sorted(after.keys() - before.keys())
    removed = sorted(before.keys() - after.keys())
    changed = sorted(n for n in before.keys() & after.keys() if before[n] != after[n])
    parts = [f"+{n}" for n in added] + [f"-{n}" for n in removed] + [f"~{n}" for n in changed]
    return "routes " + (" ".join(parts) if parts else "unchanged")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What reading the config file again decided, before anything is swapped.

    `result` is the label `edgeroute_config_reloads_total` counts; `config` is set only for
    "success" (the validated config to serve now, host and port kept from the running one).
    """

    result: str  # "success", "unchanged" or "failure"
    config: Config | None
    hash: str  # the config served once this reload is applied
    message: str

    def log(self) -> None:
        level = {"failure": logging.ERROR, "success": logging.WARNING}.get(
            self.result, logging.INFO
        )
        log.log(level, "%s", self.message)


def check(path: Path, running: Config, running_hash: str, reason: str) -> Verdict:
    """Read and validate `path` against the config served now (blocking: call it off the
    event loop). The one check both a single process and the workers' supervisor run."""
    try:
        config, digest = load_config(path), file_hash(path)
        server = msgspec.structs.replace(
            config.server, host=running.server.host, port=running.server.port
        )
        config = msgspec.structs.replace(config, server=server)
        if digest == running_hash:
            return Verdict(
                "unchanged",
                None,
                running_hash,
                f"config reload ({reason}): {path} unchanged ({digest})",
            )
        field = _restart_only_change(running, config)
        if field is not None:
            raise ConfigError(f"{field}: changed, and only a restart can apply it")
        for route in config.routes:  # what a Router builds from it (a worker must not refuse)
            compile_route(config, route)
    except ConfigError as exc:
        return Verdict(
            "failure",
            None,
            running_hash,
            f"config reload refused ({reason}): {path}: {exc}; still serving config {running_hash}",
        )
    return Verdict(
        "success",
        config,
        digest,
        f"config reloaded ({reason}): {path} {running_hash} -> {digest}, {_diff(running, config)}",
    )


class FileWatch:
    """Has the config file changed since it was last read? (One stat: costs nothing.)"""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen = _file_identity(path)

    def mark(self) -> None:
        """About to read the file: whatever changes after this is a change again."""
        self._seen = _file_identity(self.path)

    def changed(self) -> bool:
        now = _file_identity(self.path)
        if now is None or now == self._seen:
            return False
        self._seen = now
        return True


class Reloader:
    """Swaps `live` to a new config: read from `path` on request (a single process), or
    handed over already checked (`apply`: a worker of `serve --workers N`, whose supervisor
    reads the file once for all of them)."""

    def __init__(
        self,
        path: Path | None,
        live: Live,
        state: StateBackend,
        metrics: Metrics,
        session: Callable[[], UpstreamClient],
    ) -> None:
        self.path = path
        self.file = FileWatch(path) if path is not None else None
        self.live = live
        self.state = state
        self.metrics = metrics
        self.session = session
        self._lock = asyncio.Lock()

    async def reload(self, reason: str) -> bool:
        """True when the new config serves now (or is the same); False when refused."""
        assert self.path is not None and self.file is not None
        async with self._lock:
            self.file.mark()
            old = self.live.current
            # YAML parsing and validation off the event loop: requests keep flowing.
            verdict = await asyncio.to_thread(check, self.path, old.config, old.hash, reason)
            if verdict.config is not None:
                self.apply(verdict.config, verdict.hash)
            self.metrics.ops.config_reloads.labels(verdict.result).inc()
            verdict.log()
            return verdict.result != "failure"

    def apply(self, config: Config, digest: str) -> None:
        """Serve `config` (already checked) from the next request on: one swap on the loop;
        providers that did not change keep their adapters (and connections)."""
        old = self.live.current
        router = Router(config, self.state)
        adapters: dict[str, ProviderAdapter] = {}
        previous = {p.name: p for p in old.config.providers}
        for provider in config.providers:
            kept = old.adapters.get(provider.name)
            same = previous.get(provider.name) == provider
            adapters[provider.name] = (
                kept if kept is not None and same else make_adapter(provider, self.session())
            )
        self.live.swap(generation(config, router, adapters, digest))


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    """The resolved file (symlinks followed, as a ConfigMap swap needs): inode, mtime, size."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def watch_interval(env: Mapping[str, str]) -> float:
    text = env.get(WATCH_ENV, "").strip()
    if not text:
        return DEFAULT_WATCH_S
    try:
        return max(0.0, float(text))
    except ValueError:
        log.warning(
            "%s=%r is not a number of seconds; watching every %ss", WATCH_ENV, text, DEFAULT_WATCH_S
        )
        return DEFAULT_WATCH_S


async def watch(reloader: Reloader, interval_s: float) -> None:
    """Poll the config file; one stat per interval costs nothing measurable."""
    assert reloader.file is not None
    while True:
        await asyncio.sleep(interval_s)
        if reloader.file.changed():
            await reloader.reload("file changed")


def watcher_context(
    reloader: Reloader, interval_s: float
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(watch(reloader, interval_s))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return context


__all__ = [
    "FileWatch",
    "Generation",
    "Live",
    "Reloader",
    "Verdict",
    "check",
    "config_hash",
    "document_hash",
    "file_hash",
    "generation",
    "watch",
    "watch_interval",
    "watcher_context",
]
