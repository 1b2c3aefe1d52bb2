"""Starting processes: `edgeroute serve` and `edgeroute demo` (gateway plus mock upstreams)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shlex
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec
from aiohttp import web

from edgeroute.config import Config, parse_config

DEMO_PORTS = (9101, 9102, 9103)


def access_log_enabled() -> bool:
    return os.environ.get("EDGEROUTE_ACCESS_LOG", "1") not in ("0", "false", "no")


def configure_logging(*, access_lines: bool = True) -> None:
    """Access lines are JSON already; everything goes to stderr, one line per event.

    Access lines bypass `logging` in a serving process: a background thread writes them to
    stderr in batches (edgeroute.accesslog), so the event loop never waits on the pipe.
    `access_lines=False` for a process that serves nothing (the worker supervisor).
    """
    level = os.environ.get("EDGEROUTE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    if not access_log_enabled():
        logging.getLogger("edgeroute.access").setLevel(logging.WARNING)
    elif access_lines:
        from edgeroute import accesslog
        from edgeroute.metrics import ACCESS_LOG_DROPPED

        accesslog.install(sys.stderr.fileno(), on_drop=ACCESS_LOG_DROPPED.inc)


def run(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run on uvloop when it is installed (the `fast` extra), else on asyncio's loop."""
    runner: Callable[[Coroutine[Any, Any, int]], int]
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    # Started outside the `except` block: inside it, every exception the server ever logs
    # would carry "During handling ... ModuleNotFoundError: No module named 'uvloop'".
    try:
        return runner(main())
    finally:
        from edgeroute import accesslog

        accesslog.close()  # the last lines reach stderr before the process exits


def freeze_startup_objects() -> None:
    """Move everything alive once the server listens (modules, config, app) out of the GC's
    reach: full collections while serving, and the one at exit, no longer walk it all."""
    gc.collect()
    gc.freeze()


def state_name(config: Config) -> str:
    return "redis" if config.state.redis_url else "memory"


def serve_config(config: Config, workers: int = 1, config_path: str | None = None) -> int:
    """One process serves (workers=1), or a supervisor runs `workers` processes.

    `config_path` turns on reloading (SIGHUP, the file watcher); with workers the supervisor
    reloads them all (see edgeroute.workers)."""
    if workers > 1:
        from edgeroute.workers import Supervisor

        configure_logging(access_lines=False)
        return Supervisor(config, workers, config_path).run()

    from edgeroute.server import serve

    configure_logging()

    def ready(url: str) -> None:
        freeze_startup_objects()
        print(f"edgeroute listening on {url}/v1 (state: {state_name(config)})", flush=True)

    return run(lambda: serve(config, ready=ready, config_path=config_path))


def demo_config(gateway_port: int = 8080, base_port: int = DEMO_PORTS[0]) -> Config:
    """Three mock upstreams with different price/latency/health, three routes over them."""
    ports = [base_port + i for i in range(3)]
    return parse_config(
        {
            "server": {"host": "127.0.0.1", "port": gateway_port, "admin_token": "demo-admin"},
            "breaker": {"failure_threshold": 3, "open_timeout_s": 10, "success_threshold": 2},
            "latency": {"window_s": 30, "buckets": 6},
            "providers": [
                {"name": "fast", "base_url": f"http://127.0.0.1:{ports[0]}/v1"},
                {"name": "cheap", "base_url": f"http://127.0.0.1:{ports[1]}/v1"},
                {"name": "flaky", "base_url": f"http://127.0.0.1:{ports[2]}/v1"},
            ],
            "routes": [
                {
                    "model": "chat",
                    "strategy": "hybrid",
                    "targets": [
                        {
                            "provider": "fast",
                            "model": "fast-large",
                            "input_cost_per_mtok": 2.5,
                            "output_cost_per_mtok": 10.0,
                        },
                        {
                            "provider": "cheap",
                            "model": "cheap-small",
                            "input_cost_per_mtok": 0.15,
                            "output_cost_per_mtok": 0.6,
                        },
                        {
                            "provider": "flaky",
                            "model": "flaky-medium",
                            "input_cost_per_mtok": 0.5,
                            "output_cost_per_mtok": 1.5,
                        },
                    ],
                },
                {
                    "model": "chat-rr",
                    "strategy": "round_robin",
                    "targets": [
                        {"provider": "fast", "model": "fast-large"},
                        {"provider": "cheap", "model": "cheap-small"},
                    ],
                },
                {
                    "model": "embed",
                    "strategy": "latency",
                    "targets": [
                        {"provider": "fast", "model": "embed-fast"},
                        {"provider": "cheap", "model": "embed-cheap"},
                    ],
                },
            ],
        }
    )


async def _demo(gateway_port: int, base_port: int) -> int:
    from edgeroute.mock_provider import MockSettings, create_mock_app
    from edgeroute.server import serve

    settings = [
        ("fast", MockSettings(latency_ms=20)),
        ("cheap", MockSettings(latency_ms=120, latency_jitter_ms=40)),
        ("flaky", MockSettings(latency_ms=60, error_rate=0.5)),
    ]
    runners = []
    for offset, (name, mock) in enumerate(settings):
        runner = web.AppRunner(create_mock_app(mock, name=name), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", base_port + offset, reuse_address=True).start()
        runners.append(runner)
        print(
            f"mock upstream {name!r} on http://127.0.0.1:{base_port + offset}/v1 "
            f"({msgspec.json.encode(mock).decode()})",
            flush=True,
        )
    config = demo_config(gateway_port, base_port)

    def ready(url: str) -> None:
        print(
            f"\nedgeroute demo gateway on {url}/v1 (in-memory state). Try:\n"
            f"  curl -s {url}/v1/chat/completions -H 'content-type: application/json' \\\n"
            '    -d \'{"model": "chat", "messages": [{"role": "user", "content": "hi"}]}\''
            "\n"
            f"  curl -s {url}/v1/routes/chat/explain\n"
            f"  curl -s -H 'Authorization: Bearer demo-admin' {url}/admin/state\n"
            # This interpreter: the one `./dev demo` installed the openai SDK into.
            f'  {shlex.quote(sys.executable)} -c "import openai; '
            f"c = openai.OpenAI(base_url='{url}/v1', api_key='x'); "
            "print(c.chat.completions.create(model='chat', "
            "messages=[{'role': 'user', 'content': 'hi'}]).choices[0].message.content)\"\n",
            flush=True,
        )

    try:
        return await serve(config, ready=ready)
    finally:
        for runner in runners:
            await runner.cleanup()


def demo(gateway_port: int = 8080, base_port: int = DEMO_PORTS[0]) -> int:
    configure_logging()
    return run(lambda: _demo(gateway_port, base_port))
