"""Real gateways and mock upstreams on loopback for tests: in-process or as processes.

In-process (`running_app`) is fast and lets a test reach into the app; `GatewayProcess` runs
`edgeroute serve` exactly as a user would (signals, exit codes, stdout).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import yaml
from aiohttp import web

from edgeroute.config import Config, parse_config
from edgeroute.mock_provider import MOCK_PROVIDER, MockProvider, MockSettings, create_mock_app
from edgeroute.server import create_app
from edgeroute.state import StateBackend

HOST = "127.0.0.1"


@asynccontextmanager
async def running_app(app: web.Application, **runner_kwargs: Any) -> AsyncIterator[str]:
    """Serve `app` on a free loopback port; yields its base URL (no trailing slash)."""
    runner = web.AppRunner(app, access_log=None, **runner_kwargs)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://{HOST}:{port}"
    finally:
        await runner.cleanup()


class Mock:
    """A running mock upstream: its URL and its in-process control object."""

    def __init__(self, name: str, url: str, provider: MockProvider) -> None:
        self.name = name
        self.url = url
        self.base_url = f"{url}/v1"
        self.provider = provider

    async def configure(self, **fields: Any) -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{self.url}/_mock/config", json=fields) as response,
        ):
            assert response.status == 200, await response.text()

    async def stats(self) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.url}/_mock/stats") as response,
        ):
            data: dict[str, Any] = await response.json()
            return data

    async def requests(self) -> int:
        return int((await self.stats())["requests"])


@asynccontextmanager
async def mock_upstreams(**settings: MockSettings) -> AsyncIterator[dict[str, Mock]]:
    """`async with mock_upstreams(a=MockSettings(), b=MockSettings(error_rate=1)) as mocks:`"""
    async with _start_mocks(list(settings.items())) as mocks:
        yield mocks


@asynccontextmanager
async def _start_mocks(items: list[tuple[str, MockSettings]]) -> AsyncIterator[dict[str, Mock]]:
    if not items:
        yield {}
        return
    (name, settings), rest = items[0], items[1:]
    app = create_mock_app(settings, name=name)
    async with running_app(app) as url, _start_mocks(rest) as others:
        yield {name: Mock(name, url, app[MOCK_PROVIDER]), **others}


def gateway_config(
    mocks: Mapping[str, Mock],
    routes: list[dict[str, Any]],
    **sections: Any,
) -> dict[str, Any]:
    """A config document with one provider per mock (named like the mock)."""
    return {
        "providers": [
            {"name": name, "base_url": mock.base_url, "api_key": f"sk-{name}-secret"}
            for name, mock in mocks.items()
        ],
        "routes": routes,
        **sections,
    }


@asynccontextmanager
async def running_gateway(
    document: dict[str, Any], *, state: StateBackend | None = None
) -> AsyncIterator[tuple[str, web.Application]]:
    """An in-process gateway; yields (base URL without /v1, app)."""
    config = parse_config(document, env={})
    app = create_app(config, state=state)
    async with running_app(app, handler_cancellation=True) as url:
        yield url, app


class GatewayProcess:
    """`edgeroute serve --config FILE --port P` as a child process."""

    def __init__(
        self,
        document: dict[str, Any],
        workdir: Path,
        *,
        port: int,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config_path = workdir / f"edgeroute-{port}.yaml"
        self.config_path.write_text(yaml.safe_dump(document))
        self.port = port
        self.url = f"http://{HOST}:{port}"
        self.log_path = workdir / f"edgeroute-{port}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edgeroute.cli",
                "serve",
                "--config",
                str(self.config_path),
                "--host",
                HOST,
                "--port",
                str(port),
            ],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, **(env or {})},
        )

    def wait_ready(self, timeout: float = 15.0) -> None:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline().decode()
            if "listening on" in line:
                return
            if not line and self.process.poll() is not None:
                break
        raise RuntimeError(f"gateway did not start:\n{self.log_path.read_text()[-3000:]}")

    def terminate(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@asynccontextmanager
async def gateway_process(
    document: dict[str, Any], workdir: Path, **kwargs: Any
) -> AsyncIterator[GatewayProcess]:
    """`edgeroute serve` on a free port, ready to take requests; killed on the way out."""
    from tests.support.redis_servers import free_port

    process = GatewayProcess(document, workdir, port=free_port(), **kwargs)
    try:
        await asyncio.to_thread(process.wait_ready)
        yield process
    finally:
        process.kill()


async def get_json(url: str, **kwargs: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url, **kwargs) as response:
        return response.status, await response.json(content_type=None)


async def wait_until(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(interval)
    raise AssertionError("condition not met in time")


def loads(document: dict[str, Any]) -> Config:
    return parse_config(document, env={})


class SdkLoad:
    """`senders` openai SDK clients sending chat completions to `model` until `stop()`:
    continuous load for reload tests, counting what succeeded and what failed."""

    def __init__(
        self, client: Callable[[], openai.AsyncOpenAI], model: str = "chat", senders: int = 4
    ) -> None:
        self.ok = 0
        self.failed = 0
        self.errors: list[str] = []
        self._client = client
        self._model = model
        self._stopping = asyncio.Event()
        self._tasks = [asyncio.create_task(self._send()) for _ in range(senders)]

    async def _send(self) -> None:
        async with self._client() as client:
            while not self._stopping.is_set():
                try:
                    await client.chat.completions.create(
                        model=self._model, messages=[{"role": "user", "content": "hi"}]
                    )
                    self.ok += 1
                except openai.OpenAIError as exc:
                    self.failed += 1
                    self.errors.append(repr(exc))

    async def more(self, count: int, timeout: float = 20.0) -> None:  # noqa: ASYNC109
        """Wait until `count` more requests have succeeded."""
        target = self.ok + count
        await wait_until(lambda: self.ok >= target, timeout=timeout)

    async def stop(self) -> None:
        self._stopping.set()
        await asyncio.gather(*self._tasks)
