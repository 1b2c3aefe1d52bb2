"""`edgeroute serve --workers N` as real processes, the access-log writer, and `auto`.

The gateways are child processes started as a user would (`EDGEROUTE_WORKERS=2 edgeroute
serve ...`) on a throw-away redis-server; upstreams run in this test process. Each request
opens its own connection, so SO_REUSEPORT spreads them over the workers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import openai
import pytest
import yaml

from edgeroute import accesslog
from edgeroute.launch import run
from edgeroute.mock_provider import MockSettings
from edgeroute.reload import file_hash
from edgeroute.workers import WorkersError, available_cpus, parse_workers
from tests.support.gateway import (
    HOST,
    GatewayProcess,
    SdkLoad,
    gateway_config,
    mock_upstreams,
    wait_until,
)
from tests.support.redis_servers import RedisServer, free_port

SHUTDOWN_TIMEOUT_S = 8.0
BODY = {"model": "chat", "messages": [{"role": "user", "content": "hello, workers"}]}


def routes() -> list[dict[str, Any]]:
    return [{"model": "chat", "strategy": "cost", "targets": [{"provider": "a", "model": "a-1"}]}]


def redis_state(server: RedisServer) -> dict[str, Any]:
    # A roomy state timeout: on a busy machine a 50 ms miss would send a worker to local
    # state for a while, which is not what these tests are about.
    return {"redis_url": server.url, "timeout_ms": 2000}


def start(document: dict[str, Any], workdir: Path, workers: int) -> GatewayProcess:
    process = GatewayProcess(
        document, workdir, port=free_port(), env={"EDGEROUTE_WORKERS": str(workers)}
    )
    process.wait_ready(timeout=60)  # N interpreters importing at once on a busy machine
    return process


def worker_pids(process: GatewayProcess) -> set[int]:
    """The supervisor's children, from /proc (no psutil)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == process.process.pid and fields[0] != "Z":
            pids.add(int(entry.name))
    return pids


async def post_fresh(url: str) -> int:
    """One chat completion on a new connection (so the kernel picks a worker anew)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(f"{url}/v1/chat/completions", json=BODY) as response,
    ):
        await response.read()
        return response.status


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        assert response.status == 200
        return await response.text()


def sample_sum(text: str, name: str) -> float:
    """Every sample of one metric name, summed over its label sets."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


def series(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name) and line[len(name)] in " {"]


def access_lines(log: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in log.splitlines() if x.startswith('{"request_id"')]


# --- a 2-worker gateway on Redis state ------------------------------------------------------


@pytest.mark.slow
async def test_two_workers_serve_one_port_and_metrics_count_every_request_once(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    requests = 40
    async with mock_upstreams(a=MockSettings()) as mocks:
        document = gateway_config(mocks, routes(), state=redis_state(redis_server))
        process = await asyncio.to_thread(start, document, tmp_path, 2)
        try:
            assert len(worker_pids(process)) == 2
            statuses = await asyncio.gather(*(post_fresh(process.url) for _ in range(requests)))
            assert statuses == [200] * requests
            assert await mocks["a"].requests() == requests

            # Several scrapes, likely answered by different workers: all read the same files.
            for _ in range(4):
                text = await scrape(process.url)
                assert sample_sum(text, "edgeroute_requests_total") == requests
                assert sample_sum(text, "edgeroute_request_duration_seconds_count") == requests
                assert sample_sum(text, "edgeroute_upstream_attempts_total") == requests
                # One series each, whatever the number of workers.
                assert len(series(text, "edgeroute_in_flight_requests")) == 1
                (degraded,) = series(text, "edgeroute_state_degraded")
                assert degraded.endswith(" 0.0")

            # Each worker writes its in-flight count once a second: the sum settles at 0.
            async def idle() -> bool:
                text = await scrape(process.url)
                return sample_sum(text, "edgeroute_in_flight_requests") == 0

            await wait_until(idle, timeout=10, interval=0.2)
            promtool = shutil.which("promtool")
            if promtool is not None:
                check = await asyncio.to_thread(
                    subprocess.run,
                    [promtool, "check", "metrics"],
                    input=text,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                assert check.returncode == 0, check.stdout + check.stderr

            code = await asyncio.to_thread(process.terminate, 30)
            assert code == 0
        finally:
            process.kill()
    records = access_lines(process.log())
    assert len(records) == requests
    # Request ids start with a random per-process prefix: both workers served.
    assert len({r["request_id"][:16] for r in records}) == 2
    assert "ModuleNotFoundError" not in process.log()


@pytest.mark.slow
async def test_a_killed_worker_is_restarted_and_serves(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with mock_upstreams(a=MockSettings()) as mocks:
        document = gateway_config(mocks, routes(), state=redis_state(redis_server))
        process = await asyncio.to_thread(start, document, tmp_path, 2)
        try:
            before = worker_pids(process)
            statuses = await asyncio.gather(*(post_fresh(process.url) for _ in range(10)))
            assert statuses == [200] * 10
            victim = min(before)
            os.kill(victim, signal.SIGKILL)

            await wait_until(lambda: "is serving again" in process.log(), timeout=60)
            after = worker_pids(process)
            assert len(after) == 2 and victim not in after
            statuses = await asyncio.gather(*(post_fresh(process.url) for _ in range(20)))
            assert statuses == [200] * 20

            text = await scrape(process.url)
            # The dead worker's requests still count; its live gauges are gone.
            assert sample_sum(text, "edgeroute_requests_total") == 30
            assert len(series(text, "edgeroute_in_flight_requests")) == 1
            code = await asyncio.to_thread(process.terminate, 30)
            assert code == 0
        finally:
            process.kill()
    log = process.log()
    assert f"worker 0 (pid {victim}) exited (signal SIGKILL)" in log or (
        f"(pid {victim}) exited (signal SIGKILL)" in log
    )
    assert "restarting in" in log


@pytest.mark.slow
async def test_sigterm_drains_in_flight_requests_on_every_worker(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    slow = 8
    async with mock_upstreams(a=MockSettings(latency_ms=1500)) as mocks:
        document = gateway_config(
            mocks,
            routes(),
            state=redis_state(redis_server),
            server={"shutdown_timeout_s": SHUTDOWN_TIMEOUT_S},
        )
        process = await asyncio.to_thread(start, document, tmp_path, 2)
        try:
            requests = [asyncio.create_task(post_fresh(process.url)) for _ in range(slow)]
            await wait_until(lambda: mocks["a"].provider.in_flight == slow, timeout=10)
            signalled = time.monotonic()
            process.process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(asyncio.gather(*requests), 20) == [200] * slow
            code = await asyncio.to_thread(process.process.wait, SHUTDOWN_TIMEOUT_S + 10)
            waited = time.monotonic() - signalled
            assert code == 0
            assert waited < SHUTDOWN_TIMEOUT_S
        finally:
            process.kill()
    records = access_lines(process.log())
    assert [r["status"] for r in records] == [200] * slow
    assert len({r["request_id"][:16] for r in records}) == 2  # both workers were draining


# --- reloading every worker -----------------------------------------------------------------


def sample(text: str, name: str) -> float | None:
    """One sample, by its exact name and labels (`x_total{result="success"}`)."""
    for line in text.splitlines():
        if line.rsplit(" ", 1)[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return None


def no_keepalive_client(url: str) -> openai.AsyncOpenAI:
    """The openai SDK on a fresh connection per request: the kernel spreads them over the
    workers (a pooled connection would stay with one)."""
    http = openai.DefaultAsyncHttpx2Client(limits=httpx2.Limits(max_keepalive_connections=0))
    return openai.AsyncOpenAI(
        base_url=f"{url}/v1", api_key="unused", max_retries=0, http_client=http
    )


async def served_by(url: str, model: str, requests: int) -> tuple[set[str], set[str]]:
    """Send `requests` to `model`; the providers that answered and the workers that served
    (a request id starts with its process's random prefix)."""
    providers, workers = set(), set()
    async with no_keepalive_client(url) as client:
        for _ in range(requests):
            raw = await client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": "hi"}]
            )
            raw.parse()
            providers.add(raw.headers["x-edgeroute-provider"])
            workers.add(raw.headers["x-request-id"][:16])
    return providers, workers


def with_route(document: dict[str, Any], name: str, provider: str) -> dict[str, Any]:
    route = {"model": name, "targets": [{"provider": provider, "model": f"{provider}-1"}]}
    return {**document, "routes": [*document["routes"], route]}


def rewrite(path: Path, document: dict[str, Any] | str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(document if isinstance(document, str) else yaml.safe_dump(document))
    os.replace(tmp, path)


async def reloads(url: str, result: str) -> float:
    return sample(await scrape(url), f'edgeroute_config_reloads_total{{result="{result}"}}') or 0


def config_infos(text: str) -> list[str]:
    return series(text, "edgeroute_config_info")


def start_two_workers(document: dict[str, Any], workdir: Path, watch_s: str) -> GatewayProcess:
    process = GatewayProcess(
        document,
        workdir,
        port=free_port(),
        env={"EDGEROUTE_WORKERS": "2", "EDGEROUTE_CONFIG_WATCH_S": watch_s},
    )
    try:
        process.wait_ready(timeout=60)
    except BaseException:
        process.kill()
        raise
    return process


@pytest.mark.slow
async def test_sighup_reloads_every_worker_under_load_counted_once(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with mock_upstreams(a=MockSettings(), b=MockSettings()) as mocks:
        document = gateway_config(mocks, routes(), state=redis_state(redis_server))
        process = await asyncio.to_thread(start_two_workers, document, tmp_path, "0")
        try:
            url, path = process.url, process.config_path
            load = SdkLoad(lambda: no_keepalive_client(url))  # both workers under load
            await load.more(20)

            # 1. A route is added: SIGHUP to the supervisor, and both workers serve it.
            added = with_route(document, "chat2", "b")
            rewrite(path, added)
            process.process.send_signal(signal.SIGHUP)
            await wait_until(lambda: _reloads_reach(url, "success", 1), timeout=20)
            providers, workers = await served_by(url, "chat2", 40)
            assert providers == {"b"} and len(workers) == 2
            new_hash = file_hash(path)
            for _ in range(4):  # whichever worker answers the scrape
                text = await scrape(url)
                assert sample(text, 'edgeroute_config_reloads_total{result="success"}') == 1
                assert config_infos(text) == [f'edgeroute_config_info{{hash="{new_hash}"}} 1.0']

            # 2. The same file again: unchanged, counted once.
            process.process.send_signal(signal.SIGHUP)
            await wait_until(lambda: _reloads_reach(url, "unchanged", 1), timeout=20)

            # 3. An invalid config: refused by the supervisor, no worker touched.
            rewrite(path, with_route(added, "chat3", "nowhere"))
            process.process.send_signal(signal.SIGHUP)
            await wait_until(lambda: _reloads_reach(url, "failure", 1), timeout=20)
            providers, workers = await served_by(url, "chat2", 30)
            assert providers == {"b"} and len(workers) == 2

            await load.more(20)
            await load.stop()
            assert load.failed == 0, load.errors[:5]

            # 4. A SIGHUP sent to a worker itself neither kills nor reloads it.
            pids = worker_pids(process)
            os.kill(min(pids), signal.SIGHUP)
            await wait_until(lambda: "SIGHUP ignored" in process.log(), timeout=10)
            assert worker_pids(process) == pids

            # 5. A worker that dies comes back on the config served now; nothing stale.
            os.kill(min(pids), signal.SIGKILL)
            await wait_until(lambda: "is serving again" in process.log(), timeout=60)
            providers, workers = await served_by(url, "chat2", 30)
            assert providers == {"b"} and len(workers) == 2
            text = await scrape(url)
            assert config_infos(text) == [f'edgeroute_config_info{{hash="{new_hash}"}} 1.0']
            # The fleet gauges: one series each (no pid label), nothing left by the dead worker.
            assert len(series(text, "edgeroute_fleet_config_hashes")) == 1
            assert len(series(text, "edgeroute_fleet_replicas")) == 1
            for result, count in (("success", 1), ("unchanged", 1), ("failure", 1)):
                assert sample(text, f'edgeroute_config_reloads_total{{result="{result}"}}') == (
                    count
                )
            assert await asyncio.to_thread(process.terminate, 30) == 0
        finally:
            process.kill()
    log = process.log()
    refused = [line for line in log.splitlines() if "config reload refused" in line]
    assert len(refused) == 1, log[-3000:]
    assert "$.routes[2].targets[0].provider" in refused[0]
    assert refused[0].endswith(f"still serving config {new_hash}")
    assert len([x for x in log.splitlines() if "config reloaded (SIGHUP)" in x]) == 1
    assert "sk-" not in log and "Warning" not in log


async def _reloads_reach(url: str, result: str, count: float) -> bool:
    return await reloads(url, result) >= count


@pytest.mark.slow
async def test_the_supervisor_alone_watches_the_config_file(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with mock_upstreams(a=MockSettings(), b=MockSettings()) as mocks:
        document = gateway_config(mocks, routes(), state=redis_state(redis_server))
        process = await asyncio.to_thread(start_two_workers, document, tmp_path, "0.2")
        try:
            rewrite(process.config_path, with_route(document, "chat2", "b"))
            await wait_until(lambda: _reloads_reach(process.url, "success", 1), timeout=20)
            providers, workers = await served_by(process.url, "chat2", 40)
            assert providers == {"b"} and len(workers) == 2
            await asyncio.sleep(1.0)  # several watch intervals: nobody reloads it again
            text = await scrape(process.url)
            assert sample(text, 'edgeroute_config_reloads_total{result="success"}') == 1
            assert sample(text, 'edgeroute_config_reloads_total{result="unchanged"}') is None
            assert await asyncio.to_thread(process.terminate, 30) == 0
        finally:
            process.kill()
    reloaded = [x for x in process.log().splitlines() if "config reloaded" in x]
    assert len(reloaded) == 1 and "(file changed)" in reloaded[0], reloaded


def run_serve(
    tmp_path: Path, document: dict[str, Any], *args: str
) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "edgeroute.yaml"
    config.write_text(json.dumps(document))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEROUTE_")}
    return subprocess.run(
        [sys.executable, "-m", "edgeroute.cli", "serve", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


MEMORY_CONFIG = {
    "server": {"host": HOST, "port": 0},
    "providers": [{"name": "a", "base_url": "http://127.0.0.1:9/v1"}],
    "routes": routes(),
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("workers", "expected"),
    [
        ("2", "--workers 2 needs shared state (state.redis_url or EDGEROUTE_REDIS_URL)"),
        ("0", "--workers: expected a number ≥ 1 or `auto`, got '0'"),
        ("many", "--workers: expected a number ≥ 1 or `auto`, got 'many'"),
    ],
)
def test_more_than_one_worker_on_memory_state_is_refused(
    tmp_path: Path, workers: str, expected: str
) -> None:
    result = run_serve(tmp_path, MEMORY_CONFIG, "--workers", workers)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"edgeroute: {expected}"] or (
        len(lines) == 1 and lines[0].startswith("edgeroute: ") and expected in lines[0]
    ), result.stderr
    assert "listening on" not in result.stdout


# --- how many workers `auto` means ----------------------------------------------------------


def test_available_cpus_honours_affinity_and_cgroup_quota(tmp_path: Path) -> None:
    four = {0, 1, 2, 3}
    assert available_cpus(tmp_path, affinity=four) == 4  # no cgroup files: no cap
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path, affinity=four) == 4
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert available_cpus(tmp_path, affinity=four) == 2  # 2.5 CPUs: 2 whole ones
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert available_cpus(tmp_path, affinity=four) == 1  # never below 1
    assert available_cpus(tmp_path, affinity={0}) == 1
    (tmp_path / "cpu.max").unlink()
    v1 = tmp_path / "cpu"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(tmp_path, affinity=four) == 3
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert available_cpus(tmp_path, affinity=four) == 4
    assert available_cpus() >= 1  # this machine, whatever it is


def test_parse_workers() -> None:
    assert parse_workers("3") == 3
    assert parse_workers("auto") is None
    assert parse_workers(" AUTO ") is None
    for bad in ("0", "-1", "two", ""):
        with pytest.raises(WorkersError):
            parse_workers(bad)


# --- the access-log writer ------------------------------------------------------------------


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_access_log_writer_writes_whole_lines_in_order() -> None:
    read_fd, write_fd = os.pipe()
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(read_all(read_fd)))
    reader.start()  # more than a pipe buffer's worth: somebody must read meanwhile
    writer = accesslog.AccessLogWriter(write_fd, flush_interval_s=0.01)
    lines = [b'{"request_id":"%d","pad":"%s"}\n' % (i, b"x" * (i % 300)) for i in range(2000)]
    for line in lines:
        writer.submit(line)
    writer.close()
    os.close(write_fd)
    reader.join(10)
    os.close(read_fd)
    assert received[0].splitlines(keepends=True) == lines
    assert writer.dropped == 0


def test_access_log_writer_drops_and_counts_when_full() -> None:
    read_fd, write_fd = os.pipe()
    drops: list[int] = []
    # A long batching pause: the writer sleeps while the queue fills.
    writer = accesslog.AccessLogWriter(
        write_fd, capacity=3, flush_interval_s=60, on_drop=lambda: drops.append(1)
    )
    for i in range(5):
        writer.submit(b"%d\n" % i)
    writer.close()  # wakes the writer out of its pause and flushes
    os.close(write_fd)
    assert read_all(read_fd) == b"0\n1\n2\n"
    os.close(read_fd)
    assert writer.dropped == 2 and len(drops) == 2


# --- issue 9 item 10: no uvloop ImportError chained to every logged traceback ----------------


def test_logged_tracebacks_carry_no_uvloop_import_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    log = logging.getLogger("edgeroute.test")

    async def main() -> int:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("handler failed")
        return 0

    with caplog.at_level(logging.ERROR, logger="edgeroute.test"):
        assert run(main) == 0
    (record,) = [r for r in caplog.records if r.name == "edgeroute.test"]
    assert record.exc_info is not None
    error = record.exc_info[1]
    assert error is not None and error.__context__ is None and error.__cause__ is None
    assert "uvloop" not in caplog.text


# --- deployment files pass the worker count through -----------------------------------------

REPO = Path(__file__).resolve().parents[1]


def test_deployments_pass_the_worker_count_through() -> None:
    assert "EDGEROUTE_WORKERS=1" in (REPO / "Dockerfile").read_text()
    assert "EDGEROUTE_WORKERS: ${EDGEROUTE_WORKERS:-1}" in (REPO / "compose.yaml").read_text()
    template = (REPO / "helm/edgeroute/templates/deployment.yaml").read_text()
    assert "- name: EDGEROUTE_WORKERS\n              value: {{ .Values.workers | quote }}" in (
        template
    )
    values = (REPO / "helm/edgeroute/values.yaml").read_text()
    assert "\nworkers: 1\n" in values and "resources.requests.cpu" in values
