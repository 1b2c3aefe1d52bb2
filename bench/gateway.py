#!/usr/bin/env python
"""What does the gateway add? The default configuration first, its variants beside it.

    python bench/gateway.py [--quick] [--json] [--duration S] [--rate R]
    python bench/gateway.py --profile redis|redis-nolog|memory|... [--profile-out FILE]

One upstream answers every request: nginx returning a fixed chat completion when it is
installed (`--upstream auto`, the default: the cheapest upstream leaves the most of a small
machine to what is measured), else `edgeroute mock-provider` (latency 0); `edgeroute serve`
gateways route a hybrid route over two providers that both point at it. The systems,
measured the same way, back to back, in this order:

- `redis`: the default configuration on a fleet: Redis state (a private `redis-server` this
  script spawns), access log ON, one worker;
- `redis-nolog`: the same with `EDGEROUTE_ACCESS_LOG=0` (what the access line costs);
- `redis-clients`: the same as `redis` with one client key with rpm/tpm limits
  (`server.clients`, never reached) that every request presents: what client limits cost;
- `redis-w2`: the same as `redis` with `--workers 2`;
- `memory`: in-memory state, access log on (the embedded default);
- `direct`: the upstream alone, no gateway.

Each is measured as follows (latency only for redis, memory and direct):

- throughput: `wrk -t2 -c64` closed loop POSTing a small chat completion, with each
  process's CPU time read from /proc/<pid>/stat before and after (CPU ms per request);
- latency: a fixed-rate open loop (300 requests/s by default) from a separate Python process
  that times every request from its *scheduled* send time (no coordinated omission); the
  gateway rows also print what they add over direct (p50 - p50, p99 - p99);
- Redis: `INFO commandstats` deltas of the private server per gateway request.

Every process it starts is stopped again, on errors and Ctrl-C too. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import http.server
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis as redis_py
from _goals import Goals  # bench/ is on sys.path
from _processes import Processes, free_port, managed_processes  # bench/ is on sys.path

CONCURRENCY = 64
WRK_THREADS = 2
RATE = 300.0  # open-loop requests per second
ROUTE = "chat"
BODY = (
    b'{"model":"chat","messages":[{"role":"user","content":"Say hello in one short sentence."}],'
    b'"max_tokens":16}'
)


@dataclass(frozen=True, slots=True)
class System:
    name: str
    label: str
    state: str | None  # "redis" / "memory"; None: direct to the upstream
    access_log: bool = True
    workers: int = 1
    latency: bool = True  # an open-loop latency row too
    clients: bool = False  # server.clients: one limited client, whose key wrk presents


SYSTEM_LIST = (
    System("redis", "default: Redis, log on", "redis"),
    System("redis-nolog", "Redis, access log off", "redis", access_log=False, latency=False),
    System("redis-clients", "Redis, log on, client limits", "redis", latency=False, clients=True),
    System("redis-w2", "Redis, log on, 2 workers", "redis", workers=2, latency=False),
    System("memory", "memory state, log on", "memory"),
    System("direct", "direct to upstream", None),
    # Only when a LiteLLM proxy is installed (--litellm PATH, or `litellm` on PATH): the
    # other Python gateway, 1 worker, Redis, latency routing over the same two deployments.
    System("litellm", "LiteLLM proxy, 1 worker", "litellm", latency=False),
)
SYSTEMS = tuple(system.name for system in SYSTEM_LIST if system.name != "litellm")
BY_NAME = {system.name: system for system in SYSTEM_LIST}
LABELS = {system.name: system.label for system in SYSTEM_LIST}
DEFAULT = "redis"  # the configuration users get: its rows lead and its Redis use is counted
# Commands the gateway sends over the wire. INFO commandstats also counts every command a Lua
# script runs (hget, hset, ...): edgeroute changes Redis only through scripts, so anything not
# listed here ran inside one. INFO is left out of both: only this script's probe sends it.
WIRE_COMMANDS = frozenset(
    {
        "evalsha",
        "eval",
        "evalsha_ro",
        "eval_ro",
        "fcall",
        "fcall_ro",
        "ping",
        "select",
        "auth",
        "hello",
        "client|setname",
        "client|setinfo",
        "script|load",
        "script|exists",
    }
)
PROBE_COMMANDS = frozenset({"info"})

PROFILE_RATE = 200  # py-spy samples per second

GOAL_REDIS_RPS = 2_000.0
GOAL_REDIS_RATIO = 0.95
GOAL_CPU_MS = 0.2
GOAL_ACCESS_LOG_RATIO = 0.95  # access log on costs at most 5 % of throughput
GOAL_WORKERS_SCALING = 1.4  # --workers 2 / --workers 1 on a 2-core machine shared with wrk
GOAL_LITELLM_RATIO = 60.0
GOAL_ADDED_P50_MS = 1.0
GOAL_ADDED_P99_MS = 5.0
GOAL_COMMANDS = 2.0
GOAL_CLIENT_LIMITS_RATIO = 0.75  # client limits on cost at most 25 % of throughput
# The client of the `redis-clients` system: limits far above what a run can reach, so
# every request is checked and counted and none is refused.
CLIENT_KEY = "sk-bench-client"
CLIENT_LIMITS = f"{{name: bench, key: {CLIENT_KEY}, rpm: 1000000000, tpm: 1000000000000}}"

CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    throughput_s: int  # measured wrk seconds per system (wrk takes whole seconds)
    throughput_warmup_s: int  # unmeasured wrk seconds before each measured run (0 = none)
    latency_s: float  # measured open-loop seconds per system
    latency_warmup_s: float  # open loop at the same rate before measuring
    rate: float

    @classmethod
    def make(
        cls, quick: bool, duration: int | None, latency_s: float | None, rate: float | None
    ) -> Settings:
        base = cls(1, 0, 1.0, 0.3, RATE) if quick else cls(10, 2, 10.0, 1.0, RATE)
        return cls(
            duration if duration is not None else base.throughput_s,
            base.throughput_warmup_s,
            latency_s if latency_s is not None else base.latency_s,
            base.latency_warmup_s,
            rate if rate is not None else base.rate,
        )


# ---------------------------------------------------------------------------------------------
# Processes: every child in its own session, all stopped on the way out
# ---------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process from /proc/<pid>/stat (clock-tick resolution)."""
    with open(f"/proc/{pid}/stat", "rb") as file:
        stat = file.read()
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def tree_cpu_seconds(pid: int) -> float:
    """A process and its direct children (the workers of `serve --workers N`)."""
    total = cpu_seconds(pid)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as file:
                stat = file.read()
        except OSError:
            continue
        if int(stat[stat.rindex(b")") + 2 :].split()[1]) == pid:
            total += cpu_seconds(int(entry))
    return total


def children_cpu_seconds() -> float:
    """CPU of this script's finished children (wrk runs to completion: its whole run)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------------------------------
# The stack: redis-server, mock upstream, two gateways
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Stack:
    redis_url: str
    redis_pid: int
    upstream_url: str  # http://127.0.0.1:PORT/v1
    upstream_pid: int
    gateways: dict[str, tuple[str, int]]  # system -> (base URL .../v1, pid of `serve`)
    key_prefix: str

    def url(self, system: str) -> str:
        base = self.gateways[system][0] if system in self.gateways else self.upstream_url
        return base + "/chat/completions"


def start_redis(processes: Processes) -> tuple[str, int]:
    server = processes.redis()
    assert server.pid is not None
    return server.url, server.pid


def gateway_config(
    upstream_url: str, redis_url: str | None, key_prefix: str, clients: bool = False
) -> str:
    """YAML for one gateway: a hybrid route over two providers that share the upstream;
    `clients`: with one limited client key (CLIENT_KEY)."""
    state = f"state: {{redis_url: '{redis_url}', key_prefix: {key_prefix}}}\n" if redis_url else ""
    extra = f", clients: [{CLIENT_LIMITS}]" if clients else ""
    return (
        f"server: {{host: 127.0.0.1, port: 0, shutdown_timeout_s: 1{extra}}}\n"
        + state
        + "providers:\n"
        f"  - {{name: up-a, base_url: '{upstream_url}'}}\n"
        f"  - {{name: up-b, base_url: '{upstream_url}'}}\n"
        "routes:\n"
        f"  - model: {ROUTE}\n"
        "    strategy: hybrid\n"
        "    targets:\n"
        "      - {provider: up-a, model: gpt-4o-mini, input_cost_per_mtok: 0.15,"
        " output_cost_per_mtok: 0.6}\n"
        "      - {provider: up-b, model: gpt-4o, input_cost_per_mtok: 2.5,"
        " output_cost_per_mtok: 10}\n"
    )


def child_env(access_log: bool = True) -> dict[str, str]:
    # No EDGEROUTE_* from the caller (EDGEROUTE_REDIS_URL would turn the memory gateway into a
    # Redis one). The access log is on by default, as users run it; its lines go to a file.
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEROUTE_")}
    env["EDGEROUTE_ACCESS_LOG"] = "1" if access_log else "0"
    env["EDGEROUTE_LOG_LEVEL"] = "WARNING"
    return env


def start_litellm(
    processes: Processes, upstream_url: str, redis_url: str, binary: str | None
) -> tuple[str, int]:
    """A LiteLLM proxy over the same upstream: 1 worker, Redis, latency-based routing."""
    if binary is None:
        raise SystemExit("the litellm system needs --litellm PATH (or `litellm` on PATH)")
    port = free_port()
    redis_host, _, redis_port = redis_url.removeprefix("redis://").split("/")[0].partition(":")
    config = processes.workdir / "litellm.yaml"
    deployments = "".join(
        "  - model_name: chat\n"
        "    litellm_params:\n"
        f"      model: openai/{model}\n"
        f"      api_base: '{upstream_url}'\n"
        "      api_key: sk-bench\n"
        for model in ("gpt-4o-mini", "gpt-4o")
    )
    config.write_text(
        f"model_list:\n{deployments}"
        "router_settings:\n"
        "  routing_strategy: latency-based-routing\n"
        f"  redis_host: {redis_host}\n"
        f"  redis_port: {redis_port}\n"
    )
    env = child_env()
    # No master key on a loopback-only benchmark; LiteLLM refuses to start without one unless
    # told this is local development.
    env["LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY"] = "true"
    env["LITELLM_LOG"] = "ERROR"
    argv = [binary, "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    pid = processes.start("litellm", [*argv, "--num_workers", "1"], env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180.0  # it imports a great deal
    while time.monotonic() < deadline:
        if not processes.alive("litellm"):
            break
        try:
            http_get(f"{base}/health/liveliness")
            return f"{base}/v1", pid
        except OSError:
            time.sleep(0.5)
    tail = (processes.workdir / "litellm.err").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"LiteLLM did not start:\n{tail}")


def find_litellm(option: str | None) -> str | None:
    return option or shutil.which("litellm")


# The upstream's reply: what `edgeroute mock-provider` answers BODY (usage included), fixed.
UPSTREAM_REPLY = (
    '{"id":"chatcmpl-bench","created":1795826040,"usage":{"prompt_tokens":8,'
    '"completion_tokens":9,"total_tokens":17},"object":"chat.completion","model":"chat",'
    '"choices":[{"index":0,"message":{"role":"assistant","content":"Hello from mock (chat). '
    'This is a mock reply.","refusal":null},"logprobs":null,"finish_reason":"stop"}],'
    '"system_fingerprint":"fp_mock"}'
)
UPSTREAMS = ("auto", "nginx", "mock")
UPSTREAM_LABELS = {
    "nginx": "nginx (1 worker) answering a fixed chat completion",
    "mock": "edgeroute mock-provider (latency 0)",
}


def upstream_kind(option: str) -> str:
    """`auto`: nginx when it is installed (the issue's setup: the cheapest upstream leaves
    the most of a small machine to the gateway), else edgeroute's mock provider."""
    if option == "auto":
        return "nginx" if shutil.which("nginx") else "mock"
    return option


def start_upstream(processes: Processes, kind: str) -> tuple[str, int]:
    """The upstream every system shares: its /v1 URL and the pid whose CPU is its cost."""
    if kind == "mock":
        cli = [sys.executable, "-m", "edgeroute.cli"]
        pid = processes.start(
            "upstream", [*cli, "mock-provider", "--port", "0", "--name", "upstream"], child_env()
        )
        return processes.wait_for("upstream", r"listening on (http://\S+/v1)").group(1), pid
    nginx = shutil.which("nginx")
    if nginx is None:
        raise SystemExit("nginx is not on PATH (apt-get install nginx), or use --upstream mock")
    port = free_port()
    root = processes.workdir / "nginx"
    root.mkdir(exist_ok=True)
    (root / "nginx.conf").write_text(
        "worker_processes 1;\ndaemon off;\n"
        f"pid {root}/nginx.pid;\nerror_log stderr warn;\n"
        "events { worker_connections 4096; }\n"
        "http {\n  access_log off;\n"
        f"  client_body_temp_path {root}/body;\n"
        "  keepalive_requests 10000000;\n"
        f"  server {{\n    listen 127.0.0.1:{port};\n"
        "    location / {\n      default_type application/json;\n"
        f"      return 200 '{UPSTREAM_REPLY}';\n    }}\n  }}\n}}\n"
    )
    pid = processes.start(
        "upstream", [nginx, "-e", "stderr", "-p", str(root), "-c", str(root / "nginx.conf")]
    )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 10.0
    while True:
        try:
            status, _ = http_post(f"{url}/chat/completions", BODY)
            if status == 200:
                return url, pid
        except OSError:
            pass
        if time.monotonic() > deadline or not processes.alive("upstream"):
            raise RuntimeError("nginx did not start: see upstream.err in the bench workdir")
        time.sleep(0.05)


def start_stack(
    processes: Processes,
    systems: Sequence[str],
    litellm: str | None = None,
    upstream: str = "mock",
) -> Stack:
    redis_url, redis_pid = ("", 0)
    if any(BY_NAME[name].state in ("redis", "litellm") for name in systems):
        redis_url, redis_pid = start_redis(processes)
    cli = [sys.executable, "-m", "edgeroute.cli"]
    upstream_url, upstream_pid = start_upstream(processes, upstream)
    key_prefix = f"edgeroute-bench-gw-{uuid.uuid4().hex[:8]}"
    gateways: dict[str, tuple[str, int]] = {}
    for system in systems:
        spec = BY_NAME[system]
        if spec.state is None:
            continue
        if spec.state == "litellm":
            gateways[system] = start_litellm(processes, upstream_url, redis_url, litellm)
            continue
        config = processes.workdir / f"gateway-{system}.yaml"
        config.write_text(
            gateway_config(
                upstream_url,
                redis_url if spec.state == "redis" else None,
                key_prefix,
                clients=spec.clients,
            )
        )
        name = f"gateway-{system}"
        argv = [*cli, "serve", "--config", str(config), "--workers", str(spec.workers)]
        pid = processes.start(name, argv, child_env(spec.access_log))
        match = processes.wait_for(
            name, r"listening on (http://\S+/v1) \(state: (\w+)\)", timeout_s=90
        )
        if match.group(2) != spec.state:
            raise RuntimeError(f"{name} runs on {match.group(2)} state, expected {spec.state}")
        gateways[system] = (match.group(1), pid)
    stack = Stack(redis_url, redis_pid, upstream_url, upstream_pid, gateways, key_prefix)
    for system in systems:  # one request each: the whole path works before anything is timed
        status, _ = http_post(stack.url(system), BODY, client=BY_NAME[system].clients)
        if status != 200:
            raise RuntimeError(f"{LABELS[system]}: a test request got HTTP {status}")
    return stack


def http_post(url: str, body: bytes, client: bool = False) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if client:
        headers["Authorization"] = f"Bearer {CLIENT_KEY}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        data: bytes = response.read()
        return data


# ---------------------------------------------------------------------------------------------
# What the gateway says about itself: /metrics and /readyz
# ---------------------------------------------------------------------------------------------

_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def gateway_metrics(base_url: str) -> dict[str, float]:
    """Every sample of /metrics summed by metric name (labels dropped)."""
    text = http_get(base_url.removesuffix("/v1") + "/metrics").decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE_RE.match(line)
        if match:
            name = match.group(1)
            totals[name] = totals.get(name, 0.0) + float(match.group(3))
    return totals


def gateway_health(base_url: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(http_get(base_url.removesuffix("/v1") + "/readyz"))
    return data


@dataclass(slots=True)
class GatewayCounters:
    requests: int  # edgeroute_requests_total delta: requests the gateway finished
    failovers: int
    state_errors: int
    records_dropped: int
    degraded_at_end: bool
    # Decide and record calls the gateway made to Redis (its edgeroute_state_call_seconds):
    # the per-request ones, without the breaker-gauge snapshots taken every 5 s.
    state_calls: int = 0


def counters_delta(before: dict[str, float], after: dict[str, float]) -> GatewayCounters:
    def delta(name: str) -> int:
        return round(after.get(name, 0.0) - before.get(name, 0.0))

    return GatewayCounters(
        requests=delta("edgeroute_requests_total"),
        failovers=delta("edgeroute_failovers_total"),
        state_errors=delta("edgeroute_state_errors_total"),
        records_dropped=delta("edgeroute_records_dropped_total"),
        degraded_at_end=after.get("edgeroute_state_degraded", 0.0) > 0,
        state_calls=delta("edgeroute_state_call_seconds_count"),
    )


# ---------------------------------------------------------------------------------------------
# Redis: INFO commandstats and CPU deltas on the private server
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RedisSample:
    commands: dict[str, tuple[int, int]]  # command -> (calls, usec)
    cpu_s: float


def redis_sample(client: redis_py.Redis) -> RedisSample:
    stats = client.info("commandstats")
    commands = {
        key.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
        for key, v in stats.items()
        if isinstance(v, dict)
    }
    cpu = client.info("cpu")
    return RedisSample(commands, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]))


@dataclass(slots=True)
class RedisAccounting:
    phase: str  # "throughput" (wrk c=64) or "latency" (open loop at `rate`)
    requests: int  # gateway requests in the window (its own counter)
    wire_commands: dict[str, int]  # commands the gateway sent, by name
    script_commands: dict[str, int]  # commands its Lua scripts ran inside Redis, by name
    commands_per_request: float  # sum(wire_commands) / requests
    script_commands_per_request: float
    lua_us_per_request: float  # EVALSHA/EVAL usec from commandstats / requests
    redis_cpu_us_per_request: float  # used_cpu_user + used_cpu_sys / requests
    # Decides and records only (the gateway's own count): what a request costs Redis; the
    # rest of the wire commands are the periodic breaker-gauge snapshots.
    request_commands_per_request: float


def redis_accounting(
    phase: str, before: RedisSample, after: RedisSample, requests: int, state_calls: int
) -> RedisAccounting:
    wire: dict[str, int] = {}
    inside: dict[str, int] = {}
    lua_usec = 0
    for name, (calls, usec) in after.commands.items():
        calls0, usec0 = before.commands.get(name, (0, 0))
        if calls == calls0 or name in PROBE_COMMANDS:
            continue
        if name in WIRE_COMMANDS:
            wire[name] = calls - calls0
            if name.startswith(("eval", "fcall")):
                lua_usec += usec - usec0
        else:
            inside[name] = calls - calls0
    n = max(1, requests)
    return RedisAccounting(
        phase,
        requests,
        dict(sorted(wire.items())),
        dict(sorted(inside.items())),
        round(sum(wire.values()) / n, 4),
        round(sum(inside.values()) / n, 3),
        round(lua_usec / n, 2),
        round((after.cpu_s - before.cpu_s) * 1e6 / n, 2),
        round(state_calls / n, 4),
    )


# ---------------------------------------------------------------------------------------------
# Throughput: wrk, closed loop
# ---------------------------------------------------------------------------------------------

_WRK_MARK = "EDGEROUTE_WRK "


def wrk_script(path: Path, client: bool = False) -> None:
    """`client`: requests present CLIENT_KEY (the `redis-clients` system)."""
    body = BODY.decode()
    assert "]]" not in body
    auth = f'wrk.headers["Authorization"] = "Bearer {CLIENT_KEY}"\n' if client else ""
    path.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = [[{body}]]\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        + auth
        + "done = function(summary, latency, requests)\n"
        "  local e = summary.errors\n"
        f'  io.write(string.format("\\n{_WRK_MARK}'
        '{\\"requests\\":%.0f,\\"duration_us\\":%.0f,\\"bytes\\":%.0f,'
        '\\"connect\\":%.0f,\\"read\\":%.0f,\\"write\\":%.0f,\\"status\\":%.0f,'
        '\\"timeout\\":%.0f,\\"p50_us\\":%.0f,\\"p99_us\\":%.0f}\\n",\n'
        "    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,\n"
        "    e.status, e.timeout, latency:percentile(50), latency:percentile(99)))\n"
        "end\n"
    )


@dataclass(slots=True)
class WrkResult:
    requests: int
    seconds: float
    non_2xx: int  # wrk counts statuses > 399 (the gateway never answers 3xx)
    socket_errors: int  # connect + read + write + timeout
    p50_ms: float  # closed-loop latency at c=64: queueing, not the gateway's own cost
    p99_ms: float
    cpu_s: float = 0.0  # wrk's own CPU time (user + system)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def run_wrk(url: str, script: Path, seconds: int) -> WrkResult:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not on PATH (apt-get install wrk)")
    argv = [wrk, f"-t{WRK_THREADS}", f"-c{CONCURRENCY}", f"-d{seconds}s", "-s", str(script), url]
    cpu0 = children_cpu_seconds()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    cpu = children_cpu_seconds() - cpu0
    line = next((x for x in result.stdout.splitlines() if x.startswith(_WRK_MARK)), None)
    if result.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    data = json.loads(line.removeprefix(_WRK_MARK))
    return WrkResult(
        requests=int(data["requests"]),
        seconds=data["duration_us"] / 1e6,
        non_2xx=int(data["status"]),
        socket_errors=int(data["connect"] + data["read"] + data["write"] + data["timeout"]),
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        cpu_s=cpu,
    )


# ---------------------------------------------------------------------------------------------
# Latency: open loop at a fixed rate, in a separate process
# ---------------------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


async def open_loop(
    url: str, rate: float, seconds: float, warmup_s: float, timeout_s: float = 10.0
) -> dict[str, Any]:
    """Send at fixed intervals whatever the replies do; time each from its scheduled start.

    A thread sleeps to each scheduled instant (time.sleep is precise to ~0.1 ms, event-loop
    timers only to ~1 ms) and hands the send to the loop; no send waits for an earlier reply.
    """
    import aiohttp

    loop = asyncio.get_running_loop()
    interval = 1.0 / rate
    warm = int(warmup_s * rate)
    total = warm + int(seconds * rate)
    latencies: list[float] = []
    lags: list[float] = []
    statuses: dict[str, int] = {}
    tasks: set[asyncio.Task[None]] = set()
    headers = {"Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, skip_auto_headers=("User-Agent",)
    ) as session:

        async def one(scheduled: float, measured: bool) -> None:
            sent = time.perf_counter()
            try:
                async with session.post(url, data=BODY, headers=headers) as response:
                    await response.read()
                    key = str(response.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                key = type(exc).__name__
            done = time.perf_counter()
            if measured:
                latencies.append(done - scheduled)
                lags.append(sent - scheduled)
                statuses[key] = statuses.get(key, 0) + 1

        def fire(scheduled: float, measured: bool) -> None:
            task = loop.create_task(one(scheduled, measured))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        def ticker(start: float) -> None:
            for i in range(total):
                scheduled = start + i * interval
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                loop.call_soon_threadsafe(fire, scheduled, i >= warm)

        start = time.perf_counter() + 0.05
        await asyncio.to_thread(ticker, start)
        ended = time.perf_counter()
        if tasks:
            await asyncio.wait(set(tasks), timeout=timeout_s + 1)
    latencies.sort()
    lags.sort()
    ok = sum(n for key, n in statuses.items() if key.isdigit() and 200 <= int(key) < 300)
    measured_s = ended - (start + warm * interval)
    return {
        "rate": rate,
        "seconds": round(seconds, 3),
        "sent": total - warm,
        "completed": len(latencies),
        "achieved_rate": round((total - warm) / measured_s, 1) if measured_s > 0 else 0.0,
        "ok": ok,
        "non_2xx": sum(n for key, n in statuses.items() if key.isdigit()) - ok,
        "errors": sum(n for key, n in statuses.items() if not key.isdigit()),
        "statuses": statuses,
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 3),
        "p90_ms": round(percentile(latencies, 0.90) * 1000, 3),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
        "p999_ms": round(percentile(latencies, 0.999) * 1000, 3),
        "max_ms": round(latencies[-1] * 1000, 3) if latencies else float("nan"),
        "send_lag_p50_ms": round(percentile(lags, 0.50) * 1000, 3),
        "send_lag_p99_ms": round(percentile(lags, 0.99) * 1000, 3),
    }


def open_loop_worker(spec: str) -> int:
    """`--open-loop-worker JSON`: run one open loop in this process, print its JSON result."""
    args = json.loads(spec)
    sys.setswitchinterval(0.0005)  # the ticker thread gets the GIL back quickly
    factory, _ = loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(open_loop(args["url"], args["rate"], args["seconds"], args["warmup_s"]))
    print(json.dumps(result))
    return 0


def run_open_loop(url: str, settings: Settings) -> dict[str, Any]:
    spec = json.dumps(
        {
            "url": url,
            "rate": settings.rate,
            "seconds": settings.latency_s,
            "warmup_s": settings.latency_warmup_s,
        }
    )
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--open-loop-worker", spec],
        capture_output=True,
        text=True,
        timeout=settings.latency_s + settings.latency_warmup_s + 60,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"open-loop generator failed:\n{result.stderr[-3000:]}")
    data: dict[str, Any] = json.loads(result.stdout)
    return data


# ---------------------------------------------------------------------------------------------
# One system, both measurements
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Throughput:
    system: str
    requests: int
    seconds: float
    rps: float
    non_2xx: int
    socket_errors: int
    closed_p50_ms: float
    closed_p99_ms: float
    gateway_cpu_ms_per_req: float | None  # None for direct
    upstream_cpu_ms_per_req: float
    redis_cpu_ms_per_req: float | None  # Redis-state gateway only
    gateway_requests: int | None  # the gateway's own count over the same window
    failovers: int | None
    state_errors: int | None
    records_dropped: int | None
    degraded_at_end: bool | None
    # Cores each side kept busy over the measured run (CPU seconds / wall seconds): on a
    # small machine the load generator and the upstream compete with the gateway.
    load_cores: float = 0.0
    upstream_cores: float = 0.0
    gateway_cores: float | None = None
    redis_cores: float | None = None


@dataclass(slots=True)
class Latency:
    system: str
    result: dict[str, Any]  # open_loop()'s figures
    gateway_cpu_ms_per_req: float | None
    added_p50_ms: float | None = None  # vs direct, same run
    added_p99_ms: float | None = None
    state_errors: int | None = None


class Measure:
    def __init__(self, stack: Stack, settings: Settings, script: Path) -> None:
        self.stack = stack
        self.settings = settings
        self.script = script
        self.redis = redis_py.Redis.from_url(stack.redis_url) if stack.redis_url else None
        self.accounting: list[RedisAccounting] = []

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()

    def _snapshot(self, system: str) -> tuple[dict[str, float], float, RedisSample | None]:
        if system not in self.stack.gateways:
            return {}, 0.0, None
        base, pid = self.stack.gateways[system]
        if BY_NAME[system].state == "litellm":  # no edgeroute metrics there: CPU only
            return {}, tree_cpu_seconds(pid), None
        # Redis commands are accounted for the default configuration only: one table.
        redis = redis_sample(self.redis) if system == DEFAULT and self.redis else None
        return gateway_metrics(base), tree_cpu_seconds(pid), redis

    def throughput(self, system: str) -> Throughput:
        url = self.stack.url(system)
        script = self.script
        if BY_NAME[system].clients:
            script = self.script.with_name("post-client.lua")
            wrk_script(script, client=True)
        if self.settings.throughput_warmup_s:
            run_wrk(url, script, self.settings.throughput_warmup_s)
            time.sleep(0.2)  # the recorder writes the warm-up's last outcomes
        metrics0, cpu0, redis0 = self._snapshot(system)
        upstream0 = tree_cpu_seconds(self.stack.upstream_pid)
        result = run_wrk(url, script, self.settings.throughput_s)
        upstream1 = tree_cpu_seconds(self.stack.upstream_pid)
        time.sleep(0.2)  # requests cut off by wrk's end and their records finish
        metrics1, cpu1, redis1 = self._snapshot(system)
        n = max(1, result.requests)
        counters = counters_delta(metrics0, metrics1) if system in self.stack.gateways else None
        if counters is not None and BY_NAME[system].state == "litellm":
            # Its own count is not available: wrk's completed requests stand in for it.
            counters = GatewayCounters(result.requests, 0, 0, 0, False)
        redis_cpu: float | None = None
        if redis0 is not None and redis1 is not None and counters is not None:
            acct = redis_accounting(
                "throughput", redis0, redis1, counters.requests, counters.state_calls
            )
            self.accounting.append(acct)
            redis_cpu = acct.redis_cpu_us_per_request / 1000
        return Throughput(
            system=system,
            requests=result.requests,
            seconds=round(result.seconds, 3),
            rps=round(result.rps, 1),
            non_2xx=result.non_2xx,
            socket_errors=result.socket_errors,
            closed_p50_ms=result.p50_ms,
            closed_p99_ms=result.p99_ms,
            gateway_cpu_ms_per_req=None
            if counters is None
            else round((cpu1 - cpu0) * 1e3 / max(1, counters.requests), 4),
            upstream_cpu_ms_per_req=round((upstream1 - upstream0) * 1e3 / n, 4),
            redis_cpu_ms_per_req=None if redis_cpu is None else round(redis_cpu, 4),
            gateway_requests=None if counters is None else counters.requests,
            failovers=None if counters is None else counters.failovers,
            state_errors=None if counters is None else counters.state_errors,
            records_dropped=None if counters is None else counters.records_dropped,
            degraded_at_end=None if counters is None else counters.degraded_at_end,
            load_cores=round(result.cpu_s / max(1e-9, result.seconds), 2),
            upstream_cores=round((upstream1 - upstream0) / max(1e-9, result.seconds), 2),
            gateway_cores=None
            if counters is None
            else round((cpu1 - cpu0) / max(1e-9, result.seconds), 2),
            redis_cores=None
            if redis0 is None or redis1 is None
            else round((redis1.cpu_s - redis0.cpu_s) / max(1e-9, result.seconds), 2),
        )

    def latency(self, system: str) -> Latency:
        metrics0, cpu0, redis0 = self._snapshot(system)
        result = run_open_loop(self.stack.url(system), self.settings)
        time.sleep(0.2)
        metrics1, cpu1, redis1 = self._snapshot(system)
        cpu: float | None = None
        state_errors: int | None = None
        if system in self.stack.gateways:
            counters = counters_delta(metrics0, metrics1)
            state_errors = counters.state_errors
            cpu = round((cpu1 - cpu0) * 1e3 / max(1, counters.requests), 4)
            if redis0 is not None and redis1 is not None:
                self.accounting.append(
                    redis_accounting(
                        "latency", redis0, redis1, counters.requests, counters.state_calls
                    )
                )
        return Latency(system, result, cpu, state_errors=state_errors)


def run_all(
    stack: Stack, settings: Settings, systems: Sequence[str], workdir: Path
) -> dict[str, Any]:
    script = workdir / "post.lua"
    wrk_script(script)
    measure = Measure(stack, settings, script)
    try:
        throughput = []
        for system in systems:
            row = measure.throughput(system)
            throughput.append(row)
            cpu = row.gateway_cpu_ms_per_req
            log(
                f"  throughput {LABELS[system]:<24}{row.rps:>10,.0f} req/s"
                + (f"  gateway cpu {cpu:.3f} ms/req" if cpu is not None else "")
            )
        latency = []
        for system in systems:
            if not BY_NAME[system].latency:
                continue
            lat = measure.latency(system)
            latency.append(lat)
            r = lat.result
            log(
                f"  latency    {LABELS[system]:<24}p50 {r['p50_ms']:.3f} ms"
                f"  p99 {r['p99_ms']:.3f} ms at {r['achieved_rate']:.0f}/s"
            )
    finally:
        measure.close()
    direct = next((x for x in latency if x.system == "direct"), None)
    if direct is not None:
        for lat in latency:
            if lat.system != "direct":
                lat.added_p50_ms = round(lat.result["p50_ms"] - direct.result["p50_ms"], 3)
                lat.added_p99_ms = round(lat.result["p99_ms"] - direct.result["p99_ms"], 3)
    return {
        "throughput": [asdict(x) for x in throughput],
        "latency": [asdict(x) for x in latency],
        "redis": [asdict(x) for x in measure.accounting],
    }


# ---------------------------------------------------------------------------------------------
# Profile: py-spy on one gateway under wrk
# ---------------------------------------------------------------------------------------------


def _package(frame: str) -> str:
    """The package of a py-spy frame: `f (aiohttp/web.py)` -> aiohttp, `g (uuid.py)` -> uuid.py."""
    where = frame[frame.rfind("(") + 1 :].rstrip(")")
    return where.split("/", 1)[0]


def summarize_collapsed(path: Path, possible: int, top: int = 25) -> str:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks.

    `possible` is rate x duration: py-spy leaves out samples where the loop sat idle in
    epoll, so samples / possible is how busy the gateway's one thread was.
    """
    own: dict[str, int] = {}
    packages: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        # py-spy's raw frames read "function (path/to/file.py)" with --nolineno; drop a
        # leading process or thread frame.
        frames = [f.strip() for f in stack.split(";") if "(" in f]
        if not frames:
            continue
        count = int(count_text)
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        package = _package(frames[-1])
        packages[package] = packages.get(package, 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
    if not total:
        return "py-spy recorded no samples"

    def table(title: str, rows: list[tuple[str, int]]) -> list[str]:
        return [title] + [f"  {100 * count / total:6.2f} %  {name}" for name, count in rows[:top]]

    def ranked(data: dict[str, int]) -> list[tuple[str, int]]:
        return sorted(data.items(), key=lambda kv: kv[1], reverse=True)

    # The entry point (cli, launch) is on every stack: it says nothing.
    ours = [
        kv
        for kv in ranked(inclusive)
        if _package(kv[0]) == "edgeroute" and "/cli.py" not in kv[0] and "/launch.py" not in kv[0]
    ]
    lines = [
        f"{total} samples of {possible} possible: the gateway's thread was busy "
        f"{100 * total / max(1, possible):.0f} % of the time (percentages below are of busy "
        "samples; time inside C code and the kernel counts for the Python frame that called it)",
        "",
    ]
    lines += table("Self time by package:", ranked(packages))
    lines.append("")
    lines += table("Self time (the function itself was on top of the stack):", ranked(own))
    lines.append("")
    lines += table("Inclusive time, edgeroute's own functions:", ours)
    return "\n".join(lines)


def run_profile(system: str, settings: Settings, out: Path | None) -> str:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise SystemExit("py-spy is not installed (pip install py-spy)")
    with managed_processes("gw") as processes:
        stack = start_stack(processes, [system])
        script = processes.workdir / "post.lua"
        wrk_script(script, client=BY_NAME[system].clients)
        _, pid = stack.gateways[system]
        if settings.throughput_warmup_s:
            run_wrk(stack.url(system), script, settings.throughput_warmup_s)
        raw = out or processes.workdir / "profile.txt"
        fmt = "speedscope" if raw.suffix == ".json" else "raw"
        log(
            f"profiling {LABELS[system]} (pid {pid}) under wrk -c{CONCURRENCY} "
            f"for {settings.throughput_s} s"
        )
        spy = subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(settings.throughput_s),
                "--rate",
                str(PROFILE_RATE),
                "--nolineno",
                "--format",
                fmt,
                "--output",
                str(raw),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            time.sleep(0.5)  # py-spy attaches before the load starts
            result = run_wrk(stack.url(system), script, settings.throughput_s)
            _, err = spy.communicate(timeout=settings.throughput_s + 30)
        finally:
            if spy.poll() is None:
                spy.kill()
                spy.wait()
        if spy.returncode != 0:
            raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')[-2000:]}")
        header = f"{LABELS[system]}: {result.rps:,.0f} req/s at c={CONCURRENCY} under py-spy"
        if fmt != "raw":
            return f"{header}\nspeedscope profile written to {raw}"
        summary = summarize_collapsed(raw, PROFILE_RATE * settings.throughput_s)
        where = f"\ncollapsed stacks written to {raw}" if out else ""
        return f"{header}\n{summary}{where}"


# ---------------------------------------------------------------------------------------------
# The access line alone: through `logging` (before) and the writer thread (now), one process
# ---------------------------------------------------------------------------------------------


def access_line_cost(lines: int = 50_000, rounds: int = 3) -> str:
    """CPU per access line on the calling thread, both paths alternated in one process.

    Lines go to a temporary file on stderr's descriptor, as the gateway's do under the
    benchmark. `logging` is what every line cost before the writer thread: a LogRecord, the
    handler's lock and a write(2) + flush per line; the writer path is the msgspec encode and
    a deque append on the loop, with the writing done by the thread (its CPU is counted too:
    process time, all threads).
    """
    import logging
    import tempfile

    from edgeroute import accesslog
    from edgeroute.responses import write_access_line

    saved = os.dup(2)
    results: dict[str, list[float]] = {"logging": [], "writer": []}
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            handler = logging.StreamHandler(os.fdopen(os.dup(2), "w"))
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger = logging.getLogger("edgeroute.access")
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False
            for _ in range(rounds):
                for path in ("logging", "writer"):
                    if path == "writer":
                        accesslog.install(2)
                    started = time.process_time()
                    for i in range(lines):
                        write_access_line(
                            f"4b1d6c0e9f2a7b35{i:08x}",
                            ROUTE,
                            200,
                            0.0031234,
                            attempts=1,
                            provider="up-a",
                            model="gpt-4o-mini",
                            target="up-a:gpt-4o-mini",
                            upstream_s=0.0012345,
                        )
                    accesslog.close()  # the writer's last batch is part of its cost
                    results[path].append((time.process_time() - started) / lines * 1e6)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    best = {path: min(values) for path, values in results.items()}
    return (
        f"access line CPU, best of {rounds} x {lines:,} lines (process time, all threads): "
        f"through logging {best['logging']:.2f} us/line, writer thread {best['writer']:.2f} "
        f"us/line ({best['logging'] / max(1e-9, best['writer']):.1f}x)"
    )


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    throughput = {row["system"]: row for row in report["throughput"]}
    latency = {row["system"]: row for row in report["latency"]}
    table = Goals()
    add = table.add

    def ratio(numerator: str, denominator: str) -> float | None:
        top, bottom = throughput.get(numerator), throughput.get(denominator)
        if not top or not bottom or not bottom["rps"]:
            return None
        return float(top["rps"]) / float(bottom["rps"])

    redis = throughput.get("redis")
    add(
        "req/s, default config (Redis, log on), c=64",
        redis and redis["rps"],
        GOAL_REDIS_RPS,
        "/s",
        True,
    )
    add(
        "gateway CPU per request, default config, c=64",
        redis and redis["gateway_cpu_ms_per_req"],
        GOAL_CPU_MS,
        "ms",
        False,
    )
    add(
        "access log on / off req/s, Redis, c=64",
        ratio("redis", "redis-nolog"),
        GOAL_ACCESS_LOG_RATIO,
        "",
        True,
    )
    add(
        "client limits on / off req/s, Redis, c=64",
        ratio("redis-clients", "redis"),
        GOAL_CLIENT_LIMITS_RATIO,
        "",
        True,
    )
    add(
        "--workers 2 / --workers 1 req/s, c=64",
        ratio("redis-w2", "redis"),
        GOAL_WORKERS_SCALING,
        "",
        True,
    )
    add(
        "Redis state / memory state req/s, c=64",
        ratio("redis", "memory"),
        GOAL_REDIS_RATIO,
        "",
        True,
    )
    if "litellm" in throughput:  # only when LiteLLM is installed: else no row at all
        add(
            "default config / LiteLLM req/s, c=64",
            ratio("redis", "litellm"),
            GOAL_LITELLM_RATIO,
            "",
            True,
        )
    memory = throughput.get("memory")
    add(
        "gateway CPU per request, memory state, c=64",
        memory and memory["gateway_cpu_ms_per_req"],
        GOAL_CPU_MS,
        "ms",
        False,
    )
    rate = f"{report['meta']['rate']:g}/s"
    for system in ("memory", "redis"):
        lat = latency.get(system)
        add(
            f"added p50 at {rate}, {system} state",
            lat and lat["added_p50_ms"],
            GOAL_ADDED_P50_MS,
            "ms",
            False,
        )
        add(
            f"added p99 at {rate}, {system} state",
            lat and lat["added_p99_ms"],
            GOAL_ADDED_P99_MS,
            "ms",
            False,
        )
    for phase in ("throughput", "latency"):
        acct = next((a for a in report["redis"] if a["phase"] == phase), None)
        where = f"c={CONCURRENCY}" if phase == "throughput" else rate
        add(
            # Per-request calls as the gateway counts them (a decide, at most a record), not
            # the gauge poller's snapshots; on the wire concurrent decides share one call.
            f"Redis commands per request, {where}",
            acct and acct["request_commands_per_request"],
            GOAL_COMMANDS,
            "",
            False,
        )
    # A Redis-state gateway that timed out on Redis routed on local state for a while: its
    # rows then measure the fallback, not Redis (and its commands per request read low).
    errors = [
        row["state_errors"]
        for row in (throughput.get("redis"), latency.get("redis"))
        if row and row["state_errors"] is not None
    ]
    add(
        "Redis state calls that failed (-> local fallback)",
        sum(errors) if errors else None,
        0,
        "",
        False,
    )
    return table.rows


def render(report: dict[str, Any]) -> str:
    meta = report["meta"]
    throughput = {row["system"]: row for row in report["throughput"]}
    latency = {row["system"]: row for row in report["latency"]}
    rate = f"{meta['rate']:g}/s"
    lines = [
        f"edgeroute gateway benchmark, {meta['date']}",
        f"{meta['cpus']} CPUs, {meta['platform']}, Python {meta['python']}, "
        f"gateway loop {meta['loop']}, Redis {meta['redis_version'] or '-'} (private), "
        f"{meta['wrk']}",
        f"upstream: {UPSTREAM_LABELS[meta.get('upstream', 'mock')]}; route `{ROUTE}`: hybrid"
        " over 2 providers sharing it",
        f"throughput: wrk -t{WRK_THREADS} -c{CONCURRENCY} -d{meta['throughput_s']}s "
        f"(+{meta['throughput_warmup_s']} s warm-up); latency: open loop at {rate} for "
        f"{meta['latency_s']:g} s (+{meta['latency_warmup_s']:g} s warm-up), "
        "timed from the scheduled send",
        "",
    ]
    header = (
        f"{'system':<24}{'req/s c=64':>11}{'gw cpu':>8}{'up cpu':>8}{'redis cpu':>10}"
        f"{'p50 ms':>9}{'p99 ms':>9}{'+p50 ms':>9}{'+p99 ms':>9}{'gw cpu':>8}{'non-2xx':>9}"
    )
    lines += [
        f"{'':<24}{'--- throughput (closed loop) ---':^37}"
        f"{'--- latency at ' + rate + ' (open loop) ---':^44}",
        header,
        f"{'':<24}{'':>11}{'ms/req':>8}{'ms/req':>8}{'ms/req':>10}{'':>36}{'ms/req':>8}",
    ]
    for system in meta["systems"]:
        t = throughput.get(system, {})
        lat = latency.get(system, {})
        r = lat.get("result", {})
        bad = (
            t.get("non_2xx", 0)
            + t.get("socket_errors", 0)
            + r.get("non_2xx", 0)
            + r.get("errors", 0)
        )
        lines.append(
            f"{LABELS[system]:<24}{t.get('rps', 0):>11,.0f}"
            f"{_fmt(t.get('gateway_cpu_ms_per_req'), '.3f'):>8}"
            f"{_fmt(t.get('upstream_cpu_ms_per_req'), '.3f'):>8}"
            f"{_fmt(t.get('redis_cpu_ms_per_req'), '.3f'):>10}"
            f"{_fmt(r.get('p50_ms'), '.3f'):>9}{_fmt(r.get('p99_ms'), '.3f'):>9}"
            f"{_fmt(lat.get('added_p50_ms'), '+.3f'):>9}{_fmt(lat.get('added_p99_ms'), '+.3f'):>9}"
            f"{_fmt(lat.get('gateway_cpu_ms_per_req'), '.3f'):>8}{bad:>9}"
        )
    lines += [
        "",
        f"Cores kept busy during each throughput run (CPU s / wall s; {meta['cpus']} CPUs on"
        " this machine, shared by all of these, so read scaling figures with them):",
    ]
    for system in meta["systems"]:
        t = throughput.get(system)
        if t:
            lines.append(
                f"  {LABELS[system]:<24} load generator (wrk) {t['load_cores']:.2f},"
                f" upstream {t['upstream_cores']:.2f}, gateway {_fmt(t['gateway_cores'], '.2f')}"
                f", redis-server {_fmt(t['redis_cores'], '.2f')}"
            )
    lines += ["", "Open loop detail (ms; send lag = actual send - scheduled send):"]
    for system in meta["systems"]:
        r = latency.get(system, {}).get("result")
        if r:
            lines.append(
                f"  {LABELS[system]:<24}{r['completed']:>6} requests at {r['achieved_rate']:.0f}/s"
                f"  p90 {r['p90_ms']:.3f}  p99.9 {r['p999_ms']:.3f}  max {r['max_ms']:.3f}"
                f"  send lag p50 {r['send_lag_p50_ms']:.3f} p99 {r['send_lag_p99_ms']:.3f}"
            )
    lines += ["", "Closed loop detail (wrk's own latency at c=64 is queueing, not overhead):"]
    for system in meta["systems"]:
        t = throughput.get(system)
        if t:
            extra = ""
            if t["gateway_requests"] is not None:
                extra = (
                    f"; gateway counted {t['gateway_requests']:,}, failovers {t['failovers']},"
                    f" state errors {t['state_errors']}, records dropped {t['records_dropped']}"
                    + (", DEGRADED (local state) at the end" if t["degraded_at_end"] else "")
                )
            lines.append(
                f"  {LABELS[system]:<24}{t['requests']:>8,} requests in {t['seconds']:.2f} s,"
                f" p50 {t['closed_p50_ms']:.2f} p99 {t['closed_p99_ms']:.2f}, non-2xx"
                f" {t['non_2xx']}, socket errors {t['socket_errors']}{extra}"
            )
    if report["redis"]:
        lines += [
            "",
            "Redis (private server, INFO commandstats / gateway requests; the gateway's own "
            "count is the divisor):",
        ]
        for a in report["redis"]:
            phase = f"c={CONCURRENCY}" if a["phase"] == "throughput" else rate
            wire = ", ".join(f"{k} {v:,}" for k, v in a["wire_commands"].items()) or "none"
            lines.append(
                f"  {phase:<7} {a['requests']:>8,} requests:"
                f" {a['request_commands_per_request']:.3f} decide+record calls/request"
                " (concurrent decides of a route share one script call);"
                f" {a['commands_per_request']:.3f} commands/request on the wire with the"
                f" breaker-gauge snapshots ({wire}); Lua {a['lua_us_per_request']:.1f} us/request,"
                f" redis-server CPU {a['redis_cpu_us_per_request']:.1f} us/request"
            )
            inside = ", ".join(
                f"{k} {v / max(1, a['requests']):.2f}" for k, v in a["script_commands"].items()
            )
            lines.append(f"          run inside the scripts, per request: {inside or 'none'}")
    failed = next((g["value"] for g in report["goals"] if g["name"].startswith("Redis state c")), 0)
    if failed:
        lines += [
            "",
            f"WARNING: {failed:,} Redis state calls failed (state.timeout_ms) and the Redis-state"
            " gateway routed on local state meanwhile: its rows are not a Redis measurement.",
        ]
    lines += ["", "Targets (PASS/MISS, not assertions: the machine is noisy and shared):"]
    for g in report["goals"]:
        value = g["value"]
        if value is None:
            shown = "-"
        elif g["unit"] == "/s" or isinstance(value, int):
            shown = f"{value:,.0f}"
        else:
            shown = f"{value:.3f}"
        goal = f"{g['goal']:,.0f}" if g["unit"] == "/s" else f"{g['goal']:g}"
        lines.append(
            f"  {g['name']:<46}{shown:>10} {g['unit']:<3}{g['comparison']:>3} {goal:>6} "
            f"{g['unit']:<3} {g['status']}"
        )
    lines.append(f"\ntotal runtime {meta['runtime_s']:.1f} s")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------


def loop_factory() -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """uvloop when importable: what `edgeroute serve` itself runs on (edgeroute.launch.run)."""
    try:
        import uvloop
    except ImportError:
        return None, "asyncio (default)"
    return uvloop.new_event_loop, f"uvloop {getattr(uvloop, '__version__', '?')}"


def wrk_version() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        return "wrk missing"
    result = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False)
    first = (result.stdout or result.stderr).splitlines()[:1]
    match = re.search(r"wrk (\S+)", first[0]) if first else None
    return f"wrk {match.group(1)}" if match else "wrk"


# ---------------------------------------------------------------------------------------------
# Tracing: throughput with OpenTelemetry off and on (`--tracing`)
# ---------------------------------------------------------------------------------------------


class _OtlpSink(http.server.BaseHTTPRequestHandler):
    """Accepts OTLP/HTTP exports and drops them: the gateway pays for every span it makes,
    serializes and sends; the collector's own cost is not the gateway's."""

    spans_bytes = 0

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        type(self).spans_bytes += len(self.rfile.read(length))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def tracing_rows(settings: Settings) -> str:
    """The memory-state gateway under wrk, tracing off, then on at sampling 1.0 (every
    request: a server span, a decide span and a client span, exported over OTLP/HTTP)."""
    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OtlpSink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.server_address[1]}",
        "OTEL_TRACES_SAMPLER": "always_on",
    }
    rows = []
    try:
        with managed_processes("gw-otel") as processes:
            env = {**child_env(), "EDGEROUTE_CONFIG_WATCH_S": "0"}
            cli = [sys.executable, "-m", "edgeroute.cli"]
            processes.start("upstream", [*cli, "mock-provider", "--port", "0"], env)
            upstream = processes.wait_for("upstream", r"listening on (http://\S+/v1)").group(1)
            config = processes.workdir / "gateway-otel.yaml"
            config.write_text(gateway_config(upstream, None, "unused"))
            script = processes.workdir / "wrk.lua"
            wrk_script(script)
            for label, extra in (("tracing off", {}), ("tracing on, sampling 1.0", otel)):
                pid = processes.start(
                    label, [*cli, "serve", "--config", str(config)], {**env, **extra}
                )
                url = processes.wait_for(label, r"listening on (http://\S+/v1)").group(1)
                url += "/chat/completions"
                if http_post(url, BODY)[0] != 200:
                    raise RuntimeError(f"{label}: the test request failed")
                if settings.throughput_warmup_s:
                    run_wrk(url, script, settings.throughput_warmup_s)
                cpu = cpu_seconds(pid)
                result = run_wrk(url, script, settings.throughput_s)
                cpu_ms = (cpu_seconds(pid) - cpu) * 1000 / max(1, result.requests)
                rows.append((label, result, cpu_ms))
        # Leaving the block SIGTERMs the gateways: the traced one flushes its last batch.
    finally:
        sink.shutdown()
    if _OtlpSink.spans_bytes == 0:
        raise RuntimeError("tracing on exported nothing: is the otel extra installed?")
    lines = [
        f"Tracing: memory-state gateway, wrk -t{WRK_THREADS} -c{CONCURRENCY}, "
        f"{settings.throughput_s}s each (OTLP/HTTP to a local sink that drops the spans)",
        f"{'':26} {'req/s':>9} {'CPU ms/req':>11} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}"
        f" {'sock err':>8}",
    ]
    for label, result, cpu_ms in rows:
        lines.append(
            f"{label:26} {result.rps:9.0f} {cpu_ms:11.3f} {result.p50_ms:8.2f} "
            f"{result.p99_ms:8.2f} {result.non_2xx:8d} {result.socket_errors:8d}"
        )
    off, on = rows[0][1].rps, rows[1][1].rps
    lines.append(f"tracing on keeps {on / off:.0%} of the throughput with tracing off")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="seconds-long runs (smoke test)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--duration", type=int, help="measured wrk seconds per system (default 10, quick 1)"
    )
    parser.add_argument(
        "--latency-duration", type=float, help="open-loop seconds per system (default 10)"
    )
    parser.add_argument("--rate", type=float, help=f"open-loop requests/s (default {RATE:g})")
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated subset, in this order (default {','.join(SYSTEMS)})",
    )
    parser.add_argument(
        "--profile",
        choices=[system.name for system in SYSTEM_LIST if system.state not in (None, "litellm")],
        help="instead: py-spy one gateway under wrk c=64 and print where its CPU goes",
    )
    parser.add_argument(
        "--profile-out",
        type=Path,
        help="keep the profile: collapsed stacks, or speedscope when the name ends in .json",
    )
    parser.add_argument(
        "--litellm",
        metavar="PATH",
        help="the `litellm` executable of a LiteLLM proxy install (default: `litellm` on "
        "PATH); when found, a LiteLLM row runs beside the others, else it is skipped",
    )
    parser.add_argument(
        "--access-line-cost",
        action="store_true",
        help="instead: CPU per access line through logging vs the writer thread (in-process)",
    )
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="instead: throughput with OpenTelemetry tracing off and on (sampling 1.0)",
    )
    parser.add_argument(
        "--upstream",
        choices=UPSTREAMS,
        default="auto",
        help="what answers the gateways: nginx returning a fixed completion (auto: when "
        "installed), or edgeroute's mock provider",
    )
    parser.add_argument("--open-loop-worker", metavar="JSON", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.open_loop_worker:
        return open_loop_worker(options.open_loop_worker)
    if options.access_line_cost:
        print(access_line_cost())
        return 0
    settings = Settings.make(
        options.quick, options.duration, options.latency_duration, options.rate
    )
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not on PATH (apt-get install wrk)")
    if options.profile:
        print(run_profile(options.profile, settings, options.profile_out))
        return 0
    if options.tracing:
        print(tracing_rows(settings))
        return 0
    systems = [name.strip() for name in options.systems.split(",") if name.strip()]
    litellm = find_litellm(options.litellm)
    if litellm is None:
        log("LiteLLM is not installed (no --litellm, no `litellm` on PATH): its row is skipped")
        systems = [name for name in systems if name != "litellm"]
    elif "litellm" not in systems and options.systems == ",".join(SYSTEMS):
        systems.append("litellm")
    unknown = sorted(set(systems) - set(BY_NAME))
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    started = time.perf_counter()
    _, loop_name = loop_factory()
    report: dict[str, Any] = {
        "meta": {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cpus": os.cpu_count(),
            "platform": platform.platform(terse=True),
            "python": platform.python_version(),
            "loop": loop_name,
            "wrk": wrk_version(),
            "redis_version": None,
            "quick": options.quick,
            "systems": systems,
            "litellm": litellm,
            "concurrency": CONCURRENCY,
            "throughput_s": settings.throughput_s,
            "throughput_warmup_s": settings.throughput_warmup_s,
            "latency_s": settings.latency_s,
            "latency_warmup_s": settings.latency_warmup_s,
            "rate": settings.rate,
            "route": ROUTE,
            "body_bytes": len(BODY),
            "upstream": upstream_kind(options.upstream),
        },
    }
    with managed_processes("gw") as processes:
        log(
            f"edgeroute gateway benchmark: starting redis-server, {report['meta']['upstream']}"
            f" upstream, {len(systems) - ('direct' in systems)} gateways"
        )
        stack = start_stack(processes, systems, litellm, report["meta"]["upstream"])
        if stack.redis_url:
            with redis_py.Redis.from_url(stack.redis_url) as client:
                report["meta"]["redis_version"] = str(client.info("server")["redis_version"])
        report.update(run_all(stack, settings, systems, processes.workdir))
        if DEFAULT in stack.gateways:
            base, _ = stack.gateways[DEFAULT]
            report["meta"]["redis_gateway_readyz"] = gateway_health(base)
    report["meta"]["runtime_s"] = round(time.perf_counter() - started, 2)
    report["goals"] = goals(report)
    if options.json:
        print(json.dumps(report, indent=2))
    else:
        print(render(report))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted: every process this run started has been stopped")
        sys.exit(130)
