"""Starting processes: `edgeroute serve` and `edgeroute demo` (gateway plus mock upstreams)."""

from __future__ import annotations

import asyncio
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


def configure_logging() -> None:
    """Access lines are JSON already; everything goes to stderr, one line per event."""
    level = os.environ.get("EDGEROUTE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    if os.environ.get("EDGEROUTE_ACCESS_LOG", "1") in ("0", "false", "no"):
        logging.getLogger("edgeroute.access").setLevel(logging.WARNING)


def run(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run on uvloop when it is installed (the `fast` extra), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


def serve_config(config: Config, config_path: str | None = None) -> int:
    from edgeroute.server import serve

    configure_logging()

    def ready(url: str) -> None:
        state = "redis" if config.state.redis_url else "memory"
        print(f"edgeroute listening on {url}/v1 (state: {state})", flush=True)

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
