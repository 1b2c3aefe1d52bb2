"""The aiohttp application: endpoints, auth, health, metrics, admin, graceful drain.

`create_app(config)` builds everything from the config with no globals; every resource
(HTTP client session, outcome recorder, breaker-gauge poller, state backend) has one
cleanup context, so tests can run several gateways in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

from edgeroute import __version__, fleet, logfilter, reload, tracing
from edgeroute.accounting import Accounting
from edgeroute.clients import Clients, identify
from edgeroute.config import Config
from edgeroute.errors import StateUnavailable
from edgeroute.explain import explanation_json, state_document
from edgeroute.httpguard import (
    GuardedSite,
    connection_cap,
    openai_errors,
    raise_open_file_limit,
)
from edgeroute.metrics import BREAKER_CODES, Metrics
from edgeroute.providers import ProviderAdapter, make_adapter
from edgeroute.providers.http1 import UpstreamClient
from edgeroute.providers.transport import new_session
from edgeroute.proxy import CLIENT_KEY, Proxy
from edgeroute.recorder import Recorder
from edgeroute.replicas import Replicas
from edgeroute.responses import error_response, new_request_id, write_access_line
from edgeroute.router import Router, UnknownRoute
from edgeroute.state import StateBackend, build_state
from edgeroute.state.fallback import FallbackState
from edgeroute.state.redis import RedisState

log = logging.getLogger("edgeroute.server")
_encode = msgspec.json.encode

CONFIG = web.AppKey("config", Config)
ROUTER = web.AppKey("router", Router)
PROXY = web.AppKey("proxy", Proxy)
METRICS = web.AppKey("metrics", Metrics)
DRAINING = web.AppKey("draining", asyncio.Event)
LIVE = web.AppKey("live", reload.Live)
RELOADER = web.AppKey("reloader", reload.Reloader)


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=_encode(data), content_type="application/json")


def _key_digests(keys: list[str]) -> list[bytes]:
    """Plain keys are hashed at startup; `sha256:<hex>` entries are taken as hashes."""
    digests = []
    for key in keys:
        if key.startswith("sha256:"):
            digests.append(bytes.fromhex(key[7:]))
        else:
            digests.append(hashlib.sha256(key.encode()).digest())
    return digests


def _presented_key(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        key = header[7:].strip()
    else:
        key = request.headers.get("x-api-key", "").strip()
    return key or None  # an empty key matches nothing, whatever the config says


def _matches(presented: str | None, digests: list[bytes]) -> bool:
    if presented is None:
        return False
    digest = hashlib.sha256(presented.encode()).digest()
    found = False
    for expected in digests:  # no early exit: every key costs the same time
        found |= hmac.compare_digest(digest, expected)
    return found


def create_app(
    config: Config,
    *,
    state: StateBackend | None = None,
    config_path: str | Path | None = None,
    digest: str | None = None,
) -> web.Application:
    """`config_path`: the file `config` came from; reloads (SIGHUP, the file watcher) read
    it again, and its hash is the one the fleet view compares. `digest`: that hash when the
    caller has it (a worker, handed config and hash by its supervisor)."""
    metrics = Metrics()
    if state is None:
        state = build_state(
            config.state,
            on_change=lambda degraded: metrics.state_degraded.set(1 if degraded else 0),
            on_error=lambda op: metrics.state_errors.labels(op).inc(),
            on_latency=metrics.observe_state_call,
            on_repair=metrics.state_repairs.inc,
        )
    router = Router(config, state)
    adapters: dict[str, ProviderAdapter] = {}  # filled once the HTTP session exists
    if digest is None:
        digest = reload.file_hash(config_path) if config_path else reload.config_hash(config)
    live = reload.Live(reload.generation(config, router, adapters, digest))
    metrics.ops.serving(digest)
    client_keys = _key_digests(config.server.api_keys)
    shared = state if isinstance(state, RedisState) else getattr(state, "primary", None)
    redis = shared if isinstance(shared, RedisState) else None
    replicas = Replicas()  # counted by the fleet heartbeat (see _live_operations)
    if isinstance(state, FallbackState):
        state.live_replicas = lambda: replicas.live
    clients = Clients(
        redis,
        lease_ttl_ms=max(1, round(config.state.lease_ttl_s * 1000)),
        replicas=replicas,
    )

    def policies_in_force(old: reload.Generation | None, new: reload.Generation) -> None:
        for policy in old.state_loss_policies if old is not None else ():
            metrics.state_loss_policy.labels(policy).set(0)
        for policy in new.state_loss_policies:
            metrics.state_loss_policy.labels(policy).set(1)

    policies_in_force(None, live.current)
    live.on_swap.append(policies_in_force)
    admin_token = config.server.admin_token

    admin_digests = _key_digests([admin_token]) if admin_token is not None else []

    def refuse(request: web.Request, status: int, message: str, code: str) -> web.Response:
        request_id = request.headers.get("x-request-id") or new_request_id()
        metrics.requests.labels("", "", "", code).inc()
        write_access_line(request_id, None, status, 0.0, error=code)
        return error_response(
            status,
            message,
            type_="invalid_request_error",
            code=code,
            headers={"x-request-id": request_id},
        )

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path.startswith("/v1/"):
            # The live config's clients: a reload that adds a client or changes its limits
            # applies from the next request on.
            limited = live.current.clients
            if limited or client_keys:
                presented = _presented_key(request)
                client = identify(presented, limited)
                if client is not None:
                    request[CLIENT_KEY] = client  # by name from here on: the key stays here
                elif not _matches(presented, client_keys):
                    return refuse(request, 401, "invalid or missing API key", "invalid_api_key")
        if path.startswith("/admin/"):
            if admin_token is None:
                return refuse(
                    request, 404, "admin endpoints are disabled (no admin_token set)", "not_found"
                )
            if not _matches(_presented_key(request), admin_digests):
                return refuse(request, 401, "invalid or missing admin token", "invalid_admin_token")
        return await handler(request)

    # openai_errors is outermost: whatever is refused further in still answers in JSON.
    # (auth is one middleware either way; without keys a /v1/ request costs it two checks.)
    middlewares = [openai_errors(), auth]
    app = web.Application(middlewares=middlewares, client_max_size=config.server.max_body_bytes + 1)
    app[CONFIG] = config
    app[ROUTER] = router
    app[METRICS] = metrics
    app[DRAINING] = asyncio.Event()
    app[LIVE] = live

    recorder = Recorder(
        state,
        on_drop=lambda n: metrics.records_dropped.inc(n),
        on_error=lambda exc: metrics.state_errors.labels("record").inc(),
    )
    sessions: list[UpstreamClient] = []

    async def upstream_session(app: web.Application) -> AsyncIterator[None]:
        session = new_session()
        sessions.append(session)
        for provider in config.providers:
            adapters[provider.name] = make_adapter(provider, session)
        app[PROXY] = Proxy(live, Accounting(metrics, recorder), clients)
        yield
        await session.close()

    async def outcome_recorder(app: web.Application) -> AsyncIterator[None]:
        recorder.start()
        yield
        await recorder.stop()

    async def breaker_gauges(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(
            _poll_breakers(lambda: live.current.router, metrics)
        )
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def close_state(app: web.Application) -> AsyncIterator[None]:
        yield
        await router.close()

    # Order matters on the way out (reverse): stop polling, drain records, close state.
    # Of the workers of `serve --workers N`, one polls for all (see Metrics.polls_breakers).
    pollers = [breaker_gauges] if metrics.polls_breakers else []
    app.cleanup_ctx.extend([close_state, outcome_recorder, *pollers, upstream_session])
    _live_operations(app, config, state, metrics, live, config_path, lambda: sessions[0], replicas)

    def proxied(endpoint: str) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await request.app[PROXY].handle(request, endpoint)  # type: ignore[arg-type]

        return handler

    async def models(request: web.Request) -> web.Response:
        router = live.current.router
        return _json(
            {
                "object": "list",
                "data": [
                    {"id": name, "object": "model", "created": 0, "owned_by": "edgeroute"}
                    for name in router.routes
                ],
            }
        )

    async def healthz(request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        router = live.current.router
        health = router.health()
        body: dict[str, object] = {
            "state_backend": health.backend,
            "shared_state": health.shared_state,
        }
        if health.error:
            body["state_error"] = health.error
        loss_policies = live.current.state_loss_policies
        if loss_policies:
            # What limits do while shared state is away, and the replica count they share by.
            body["on_state_loss"] = loss_policies
            body["live_replicas"] = replicas.live
        if request.app[DRAINING].is_set():
            return _json({"status": "draining", **body}, status=503)
        return _json({"status": "ready", **body})

    async def metrics_endpoint(request: web.Request) -> web.Response:
        return web.Response(
            body=metrics.exposition(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def explain(request: web.Request) -> web.Response:
        router = live.current.router
        name = request.match_info["route"]
        try:
            explanation = await router.explain(name)
        except UnknownRoute:
            return error_response(
                404,
                f"The model `{name}` does not exist",
                type_="invalid_request_error",
                code="model_not_found",
            )
        return _json(explanation_json(explanation))

    async def admin_state(request: web.Request) -> web.Response:
        router = live.current.router
        explanations = [await router.explain(name) for name in router.routes]
        return _json(state_document(router.health(), explanations))

    async def admin_reset(request: web.Request) -> web.Response:
        router = live.current.router
        name, target = request.match_info["route"], request.match_info["target"]
        try:
            await router.reset(name, target)
        except UnknownRoute:
            return error_response(
                404, f"no route `{name}`", type_="invalid_request_error", code="model_not_found"
            )
        except KeyError:
            return error_response(
                404,
                f"route `{name}` has no target `{target}`",
                type_="invalid_request_error",
                code="target_not_found",
            )
        except StateUnavailable as exc:
            return error_response(
                503,
                f"not reset: {exc}",
                type_="service_unavailable",
                code="state_unavailable",
                headers={"Retry-After": "1"},
            )
        return _json({"route": name, "target": target, "reset": True})

    app.router.add_post("/v1/chat/completions", proxied("chat"))
    app.router.add_post("/v1/completions", proxied("completions"))
    app.router.add_post("/v1/embeddings", proxied("embeddings"))
    app.router.add_get("/v1/models", models)
    app.router.add_get(r"/v1/routes/{route:.+}/explain", explain)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/admin/state", admin_state)

    async def admin_clients(request: web.Request) -> web.Response:
        """Each client's usage and what is left, by name (never the key)."""
        listed = []
        for spec in live.current.clients:
            seen = await clients.read(spec)
            listed.append(
                {
                    "name": spec.name,
                    "routes": sorted(spec.routes) or None,
                    "requests": {
                        "limit": spec.rpm or None,
                        "used": seen.requests,
                        "remaining": max(0, spec.rpm - seen.requests) if spec.rpm else None,
                    },
                    "tokens": {
                        "limit": spec.tpm or None,
                        "used": seen.tokens,
                        "remaining": max(0, spec.tpm - seen.tokens) if spec.tpm else None,
                    },
                    "concurrency": {
                        "limit": spec.max_concurrency or None,
                        "in_flight": seen.inflight,
                    },
                    "budget": {
                        "period": spec.period,
                        "usd": spec.budget_micro / 1e6 if spec.budget_micro else None,
                        "spent_usd": seen.spent_micro / 1e6,
                        "remaining_usd": (
                            max(0, spec.budget_micro - seen.spent_micro) / 1e6
                            if spec.budget_micro
                            else None
                        ),
                        "resets_in_ms": seen.period_end_ms,
                    },
                }
            )
        return _json({"clients": listed})

    app.router.add_get("/admin/clients", admin_clients)
    # Route names and target ids may contain `/` (`vllm:meta-llama/Llama-3.1-8B-Instruct`):
    # the route runs to the first `/targets/`, the target to `/reset`. Matching is on the raw
    # path, so `%2F` works too (and keeps a route name containing `/targets/` unambiguous).
    app.router.add_post(r"/admin/routes/{route:.+?}/targets/{target:.+}/reset", admin_reset)
    return app


def _live_operations(
    app: web.Application,
    config: Config,
    state: StateBackend,
    metrics: Metrics,
    live: reload.Live,
    config_path: str | Path | None,
    session: Callable[[], UpstreamClient],
    replicas: Replicas,
) -> None:
    """Config reload (with a file), the fleet heartbeat (with Redis) and /admin/fleet. The
    heartbeat also counts the live replicas that limits share while Redis is away; every
    worker of `serve --workers N` beats on its own, so each holds its own local share."""
    env = os.environ
    path = Path(config_path) if config_path is not None else None
    reloader = reload.Reloader(path, live, state, metrics, session)
    app[RELOADER] = reloader
    if path is not None:
        interval = reload.watch_interval(env)
        if interval > 0:
            app.cleanup_ctx.append(reload.watcher_context(reloader, interval))
    me = fleet.replica_id(env)
    started_at = time.time()

    def heartbeat() -> fleet.Heartbeat:
        current = live.current
        return fleet.Heartbeat(
            replica=me,
            version=__version__,
            config_hash=current.hash,
            started_at=started_at,
            shared_state=current.router.health().shared_state,
        )

    heartbeats: fleet.Heartbeats | None = None
    if config.state.redis_url:
        client = fleet.redis_client(config.state.redis_url, cluster=config.state.cluster)
        heartbeats = fleet.Heartbeats(
            client, config.state.key_prefix, fleet.heartbeat_interval(env)
        )
        wake = asyncio.Event()
        live.on_swap.append(lambda old, new: wake.set())  # the new hash, at once
        app.cleanup_ctx.append(
            fleet.heartbeat_context(heartbeats, heartbeat, metrics.ops, wake, replicas.seen)
        )
    live.on_swap.append(lambda old, new: metrics.ops.serving(new.hash))

    async def admin_fleet(request: web.Request) -> web.Response:
        if heartbeats is None:  # in-memory state: this replica is the whole fleet
            view = fleet.fleet_view([heartbeat()], me=me)
            return _json({"shared": False, **view})
        try:
            replicas = await asyncio.wait_for(heartbeats.read(), 2.0)
        except Exception as exc:
            return error_response(
                503,
                f"cannot read the fleet from shared state: {type(exc).__name__}",
                type_="service_unavailable",
                code="state_unavailable",
                headers={"Retry-After": "1"},
            )
        return _json({"shared": True, **fleet.fleet_view(replicas, me=me)})

    app.router.add_get("/admin/fleet", admin_fleet)


async def _poll_breakers(
    current: Callable[[], Router], metrics: Metrics, interval_s: float = 5.0
) -> None:
    """Breaker gauges and transition counts from snapshots: no cost on the request path."""
    generations: dict[tuple[str, str], int] = {}
    while True:
        router = current()  # the routes of the config served now (reloads swap it)
        for name in router.routes:
            try:
                snapshot = await router.snapshot(name)
            except Exception:  # state trouble is counted by the state layer
                continue
            for target in snapshot.targets:
                key = (name, target.target_id)
                metrics.breaker_state.labels(name, target.target_id).set(
                    BREAKER_CODES[target.state.value]
                )
                previous = generations.get(key)
                if previous is not None and target.generation > previous:
                    metrics.breaker_transitions.labels(
                        name, target.target_id, target.state.value
                    ).inc(target.generation - previous)
                    tracing.breaker_transition(
                        name, target.target_id, target.state.value, target.generation
                    )
                generations[key] = target.generation
        await asyncio.sleep(interval_s)


async def serve(
    config: Config,
    *,
    ready: Callable[[str], None] | None = None,
    reuse_port: bool = False,
    config_path: str | Path | None = None,
    digest: str | None = None,
    on_app: Callable[[web.Application], None] | None = None,
) -> int:
    """Run until SIGTERM/SIGINT, then drain: /readyz turns 503, in-flight work finishes.

    The drain waits up to `server.shutdown_timeout_s` for in-flight requests and streams;
    whatever is still running then is cancelled, so the process exits within that time.
    `reuse_port`: SO_REUSEPORT, for the workers of `edgeroute serve --workers N`.
    With `config_path`, SIGHUP reloads the config (see `edgeroute.reload`). `on_app` sees
    the app before it listens (a worker wires its supervisor's reloads to it).
    """
    tracing.configure()
    app = create_app(config, config_path=config_path, digest=digest)
    if on_app is not None:
        on_app(app)
    server = config.server
    logfilter.install()  # identical errors (EMFILE, resets) once per window, then a count
    open_files = raise_open_file_limit()
    cap = connection_cap(server.max_connections, open_files)
    if cap < server.max_connections:
        log.warning(
            "connection cap lowered from %d to %d: the open-file limit is %d",
            server.max_connections,
            cap,
            open_files,
        )
    # The drain below does the waiting; the runner only cancels what outlived it.
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=0.1,
        keepalive_timeout=server.keepalive_timeout_s,
    )
    await runner.setup()
    try:
        site = GuardedSite(
            runner,
            server.host,
            server.port,
            cap=cap,
            header_timeout_s=server.header_timeout_s,
            body_timeout_s=server.body_timeout_s,
            reuse_port=reuse_port,
        )
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        reloader = app[RELOADER]
        reloads: set[asyncio.Task[bool]] = set()
        if reloader.path is not None:

            def on_hangup() -> None:
                task = loop.create_task(reloader.reload("SIGHUP"))
                reloads.add(task)  # a reference until it is done
                task.add_done_callback(reloads.discard)

            loop.add_signal_handler(signal.SIGHUP, on_hangup)
        addresses = runner.addresses
        port = addresses[0][1] if addresses else config.server.port
        if ready is not None:
            ready(f"http://{config.server.host}:{port}")
        await stop.wait()
        app[DRAINING].set()
        log.warning(
            "draining: waiting up to %ss for in-flight requests", config.server.shutdown_timeout_s
        )
        proxy = app.get(PROXY)
        deadline = loop.time() + config.server.shutdown_timeout_s
        # Polling is enough here: it runs once, at shutdown, for at most shutdown_timeout_s.
        while proxy is not None and proxy.in_flight > 0 and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    finally:
        await runner.cleanup()
        if tracing.TRACER is not None:  # flush the last spans (blocking: in a thread)
            await asyncio.to_thread(tracing.shutdown)
    return 0
