#!/usr/bin/env python
"""A bounded soak: mixed streaming and non-streaming load with hostile upstreams and clients.

    python bench/soak.py [--quick] [--json] [--duration S] [--clients N]

One `edgeroute serve` (in-memory state) routes round-robin over a healthy
`edgeroute mock-provider` and a hostile upstream this script runs as a child
(`--hostile-upstream`): per request it answers well, or with a 500, a gzip bomb, a JSON
array, an oversized body, a hang, JSON or HTML to a stream request, a stream that stalls
after its first event, an oversized SSE event or SSE data that is an array.

Well-behaved clients (half streaming) loop for the duration next to hostile ones: slowloris
sockets trickling header bytes, idle sockets, garbage and deeply nested or oversized bodies
on fresh connections, and stream readers that hang up after the first chunk.

It prints the gateway's RSS, open descriptors and in-flight requests (the gauge and the
leases explain reports) at the start and at the end, and the well-behaved clients' failed
requests: a request fails when the gateway answers anything but a complete 200 (a stream
that ends in an error event counts apart, as `stream_errors`: it reached a target that broke
mid-stream, and the client was told so). Every process it starts is stopped on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import urllib.request
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _processes import Processes, managed_processes  # bench/ is on sys.path
from gateway import child_env

ROUTE = "chat"
MESSAGES = [{"role": "user", "content": "soak"}]
CHUNK = (
    b'data: {"id":"s","object":"chat.completion.chunk","created":0,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}\n\n'
)
REPLY = {
    "id": "s",
    "object": "chat.completion",
    "created": 0,
    "model": "m",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- the hostile upstream (a child process) ------------------------------------------------


def _bomb(inflated: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = b"0" * (1 << 20)
    parts = [compressor.compress(b'{"pad":"')]
    parts += [compressor.compress(zeros) for _ in range(inflated >> 20)]
    parts.append(compressor.compress(b'"}') + compressor.flush())
    return b"".join(parts)


def hostile_upstream(port: int) -> int:
    from aiohttp import web

    bomb = _bomb(64 << 20)
    counter = {"n": 0}

    async def plain(request: web.Request, stream: bool) -> web.StreamResponse:
        n = counter["n"] = counter["n"] + 1
        if n % 2:
            n = 0  # every other answer is a good one
        else:
            n //= 2
        if stream:
            kind = n % 6
            if kind == 1:
                return web.json_response(REPLY)  # JSON to a stream request
            if kind == 2:
                return web.Response(text="<html>busy</html>", content_type="text/html")
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            if kind == 3:  # stalls after its first event
                await response.write(CHUNK)
                await asyncio.sleep(30)
            elif kind == 4:  # one event without end
                await response.write(b"data: " + b"y" * (2 << 20))
            elif kind == 5:
                await response.write(b"data: [1,2]\n\n")
            else:
                for _ in range(3):
                    await response.write(CHUNK)
                await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        kind = n % 6
        if kind == 1:
            return web.json_response({"error": {"message": "boom"}}, status=500)
        if kind == 2:
            return web.Response(
                body=bomb,
                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
            )
        if kind == 3:
            return web.json_response([1, 2])
        if kind == 4:
            return web.json_response({**REPLY, "pad": "z" * (2 << 20)})
        if kind == 5:
            await asyncio.sleep(30)  # past the provider's timeout
        return web.json_response(REPLY)

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        return await plain(request, bool(body.get("stream")))

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/chat/completions", handle)

    async def main() -> None:
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        print(f"hostile upstream listening on http://127.0.0.1:{runner.addresses[0][1]}/v1")
        sys.stdout.flush()
        await asyncio.Event().wait()

    asyncio.run(main())
    return 0


# ---- the stack ---------------------------------------------------------------------------


def gateway_config(healthy: str, hostile: str) -> str:
    limits = {
        "timeout_s": 2,
        "max_response_bytes": 1 << 20,
        "max_event_bytes": 256 << 10,
        "stream_idle_timeout_s": 1,
        "stream_timeout_s": 10,
    }
    return json.dumps(
        {
            "server": {
                "host": "127.0.0.1",
                "port": 0,
                "header_timeout_s": 2,
                "body_timeout_s": 2,
                "keepalive_timeout_s": 5,
                "max_connections": 512,
                "request_timeout_s": 20,
            },
            # A breaker slow to open keeps the hostile target in the rotation: the soak is
            # about surviving what it sends, not about how quickly it is avoided.
            "breaker": {
                "failure_threshold": 50,
                "open_timeout_s": 1,
                "max_open_timeout_s": 2,
                "success_threshold": 1,
            },
            "providers": [
                {"name": "healthy", "base_url": healthy},
                {"name": "hostile", "base_url": hostile, **limits},
            ],
            "routes": [
                {
                    "model": ROUTE,
                    "strategy": "round_robin",
                    "targets": [
                        {"provider": "hostile", "model": "h", "id": "hostile"},
                        {"provider": "healthy", "model": "m", "id": "healthy"},
                    ],
                }
            ],
        }
    )


@dataclass
class Stack:
    url: str
    pid: int


def start_stack(processes: Processes) -> Stack:
    env = child_env(access_log=False)
    cli = [sys.executable, "-m", "edgeroute.cli"]
    processes.start("healthy", [*cli, "mock-provider", "--port", "0", "--name", "healthy"], env)
    healthy = processes.wait_for("healthy", r"listening on (http://\S+/v1)").group(1)
    processes.start(
        "hostile", [sys.executable, str(Path(__file__)), "--hostile-upstream", "0"], env
    )
    hostile = processes.wait_for("hostile", r"listening on (http://\S+/v1)").group(1)
    config = processes.workdir / "gateway.yaml"  # JSON is YAML
    config.write_text(gateway_config(healthy, hostile))
    pid = processes.start("gateway", [*cli, "serve", "--config", str(config)], env)
    url = processes.wait_for("gateway", r"listening on (http://\S+)/v1").group(1)
    return Stack(url, pid)


# ---- measurements ------------------------------------------------------------------------


@dataclass
class Sample:
    rss_mib: float
    fds: int
    in_flight: int  # edgeroute_in_flight_requests
    leases: int  # sum of the route's targets' in_flight in explain


def upstream_failures(stack: Stack) -> dict[str, int]:
    """Failed attempts on the hostile target by error class, from the gateway's metrics."""
    with urllib.request.urlopen(f"{stack.url}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    found: dict[str, int] = {}
    for line in metrics.splitlines():
        if line.startswith("edgeroute_upstream_attempts_total{") and 'provider="hostile"' in line:
            result = line.split('result="', 1)[1].split('"', 1)[0]
            if result != "ok":
                found[result] = found.get(result, 0) + int(float(line.split()[-1]))
    return dict(sorted(found.items()))


def sample(stack: Stack) -> Sample:
    status = Path(f"/proc/{stack.pid}/status").read_text()
    rss_kib = next(int(line.split()[1]) for line in status.splitlines() if line[:6] == "VmRSS:")
    fds = len(os.listdir(f"/proc/{stack.pid}/fd"))
    with urllib.request.urlopen(f"{stack.url}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    gauge = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("edgeroute_in_flight_requests ")
    )
    with urllib.request.urlopen(f"{stack.url}/v1/routes/{ROUTE}/explain", timeout=10) as response:
        explain = json.loads(response.read())
    leases = sum(int(t["in_flight"]) for t in explain["targets"])
    return Sample(round(rss_kib / 1024, 1), fds, int(gauge), leases)


@dataclass
class Tally:
    ok: int = 0
    failed: int = 0
    stream_errors: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    hostile: dict[str, int] = field(default_factory=dict)

    def fail(self, why: str) -> None:
        self.failed += 1
        self.failures[why] = self.failures.get(why, 0) + 1

    def count(self, what: str) -> None:
        self.hostile[what] = self.hostile.get(what, 0) + 1


# ---- clients -----------------------------------------------------------------------------


async def good_client(url: str, stream: bool, until: float, tally: Tally) -> None:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < until:
            body = {"model": ROUTE, "messages": MESSAGES, "stream": stream}
            try:
                async with session.post(f"{url}/v1/chat/completions", json=body) as response:
                    text = await response.text()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                tally.fail(type(exc).__name__)
                continue
            if status != 200:
                tally.fail(f"http_{status}")
            elif stream and text.rstrip().endswith("data: [DONE]"):
                tally.ok += 1
            elif stream and '"type":"upstream_error"' in text:
                tally.stream_errors += 1
            elif not stream and '"choices"' in text:
                tally.ok += 1
            else:
                tally.fail("incomplete")


async def _raw(url: str, payload: bytes, tally: Tally, what: str) -> None:
    host, port = url.removeprefix("http://").split(":")
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
    except OSError:
        tally.count(f"{what}_connect_failed")
        return
    try:
        writer.write(payload)
        async with asyncio.timeout(10):
            answer = await reader.read(65536)
        ok = b"application/json" in answer.split(b"\r\n\r\n", 1)[0].lower()
        tally.count(f"{what}_json" if ok else f"{what}_not_json")
    except (OSError, TimeoutError):
        tally.count(f"{what}_dropped")
    finally:
        writer.close()


def _post(path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


GARBAGE = {
    "garbage": b"\x16\x03\x01 not http at all\r\n\r\n",
    "deep_json": _post("/v1/chat/completions", b'{"model":"chat","messages":' + b"[" * 2000),
    "oversized": _post("/v1/chat/completions", b'{"model":"chat","pad":"' + b"p" * (5 << 20)),
    "unknown_path": b"GET /v1/../admin/state HTTP/1.1\r\nHost: x\r\n\r\n",
    "wrong_method": b"DELETE /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n",
}


async def garbage_client(url: str, until: float, tally: Tally) -> None:
    names = list(GARBAGE)
    rng = random.Random(7)
    while time.monotonic() < until:
        name = rng.choice(names)
        await _raw(url, GARBAGE[name], tally, name)
        await asyncio.sleep(0.05)


async def slow_socket(url: str, until: float, tally: Tally, *, trickle: bool) -> None:
    """Slowloris (a header byte every 0.5 s) or idle; reconnects each time it is closed."""
    host, port = url.removeprefix("http://").split(":")
    what = "slowloris" if trickle else "idle"
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
        except OSError:
            tally.count(f"{what}_connect_failed")
            await asyncio.sleep(0.5)
            continue
        try:
            if trickle:
                writer.write(b"GET /healthz HTTP/1.1\r\n")
            while time.monotonic() < until:
                if trickle:
                    writer.write(b"X")
                try:
                    async with asyncio.timeout(0.5):
                        if not await reader.read(4096):
                            tally.count(f"{what}_closed_by_gateway")
                            break
                except TimeoutError:
                    continue
        except OSError:
            tally.count(f"{what}_closed_by_gateway")
        finally:
            writer.close()


async def hangup_client(url: str, until: float, tally: Tally) -> None:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        while time.monotonic() < until:
            body = {"model": ROUTE, "messages": MESSAGES, "stream": True}
            try:
                async with session.post(f"{url}/v1/chat/completions", json=body) as response:
                    await response.content.readany()
                tally.count("hangups")
            except (aiohttp.ClientError, TimeoutError):
                tally.count("hangup_errors")
            await asyncio.sleep(0.05)


async def load(url: str, duration_s: float, clients: int, hostile_sockets: int) -> Tally:
    tally = Tally()
    until = time.monotonic() + duration_s
    tasks = [good_client(url, i % 2 == 0, until, tally) for i in range(clients)]
    tasks += [slow_socket(url, until, tally, trickle=i % 2 == 0) for i in range(hostile_sockets)]
    tasks += [garbage_client(url, until, tally), hangup_client(url, until, tally)]
    await asyncio.gather(*tasks)
    return tally


async def settle(stack: Stack, timeout_s: float = 15.0) -> Sample:
    """Wait for in-flight work and leases to drain (bounded), then sample."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = await asyncio.to_thread(sample, stack)
        if (now.in_flight == 0 and now.leases == 0) or time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.2)


def run(duration_s: float, clients: int, hostile_sockets: int) -> dict[str, Any]:
    with managed_processes("soak") as processes:
        stack = start_stack(processes)
        warm = asyncio.run(load(stack.url, 1.0, 2, 0))
        start = asyncio.run(settle(stack))
        log(f"soak: {duration_s:.0f} s, {clients} clients, {hostile_sockets} hostile sockets")
        started = time.monotonic()
        tally = asyncio.run(load(stack.url, duration_s, clients, hostile_sockets))
        elapsed = time.monotonic() - started
        end = asyncio.run(settle(stack))
        failures = upstream_failures(stack)
        gateway_alive = processes.alive("gateway")
        log_bytes = (processes.workdir / "gateway.err").stat().st_size
    del warm
    return {
        "duration_s": round(elapsed, 1),
        "clients": clients,
        "hostile_sockets": hostile_sockets,
        "start": asdict(start),
        "end": asdict(end),
        "requests": {
            "ok": tally.ok,
            "failed": tally.failed,
            "stream_errors": tally.stream_errors,
            "failures": tally.failures,
        },
        "hostile": dict(sorted(tally.hostile.items())),
        "hostile_upstream_failures": failures,
        "gateway_alive": gateway_alive,
        "gateway_log_bytes": log_bytes,
    }


def print_report(report: dict[str, Any]) -> None:
    start, end = report["start"], report["end"]
    print(
        f"soak {report['duration_s']} s: {report['clients']} clients, "
        f"{report['hostile_sockets']} hostile sockets"
    )
    print(f"{'':14}{'start':>10}{'end':>10}")
    for key, label in (
        ("rss_mib", "RSS MiB"),
        ("fds", "fds"),
        ("in_flight", "in-flight"),
        ("leases", "leases"),
    ):
        print(f"{label:14}{start[key]:>10}{end[key]:>10}")
    requests = report["requests"]
    print(f"{'failed':14}{0:>10}{requests['failed']:>10}")
    print(
        f"requests ok {requests['ok']}, failed {requests['failed']} {requests['failures']}, "
        f"stream errors {requests['stream_errors']}"
    )
    print("hostile clients: " + ", ".join(f"{k} {v}" for k, v in report["hostile"].items()))
    failures = report["hostile_upstream_failures"]
    print(
        "hostile upstream, failed attempts: " + ", ".join(f"{k} {v}" for k, v in failures.items())
    )
    print(f"gateway alive: {report['gateway_alive']}, log {report['gateway_log_bytes']} bytes")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, fewer clients")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--duration", type=float, default=None, help="seconds of load")
    parser.add_argument("--clients", type=int, default=None, help="well-behaved clients")
    parser.add_argument("--hostile-upstream", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hostile_upstream is not None:
        return hostile_upstream(args.hostile_upstream)
    duration = args.duration if args.duration is not None else (6.0 if args.quick else 60.0)
    clients = args.clients if args.clients is not None else (8 if args.quick else 32)
    report = run(duration, clients, hostile_sockets=10 if args.quick else 100)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
