#!/usr/bin/env python
"""Does a fleet decide like one process? Three replicas on one Redis, two scenarios.

    python bench/fleet.py [--quick] [--json]

Everything runs on this machine: a private `redis-server` on a free port, two
`edgeroute mock-provider` processes (`sick`, the cheap one, and `ok`) and three
`edgeroute serve` replicas on the same config and Redis. Closed-loop clients (aiohttp, one
asyncio process, spread evenly over the replicas) send small chat completions.

1. **A provider starts failing mid-run.** Routes `fail-low` and `fail-high` are cost-routed,
   `sick` first, `ok` as the fallback. Partway through, `sick` is switched to answer every
   request with a 500. Printed: how many requests the fleet sent it after the switch (its
   `faults_served`; goal exactly `failure_threshold`), how long until every replica's
   explain showed it excluded, when the last request routed to it started, and the client
   error rate (goal 0: failover hides the failures). It runs twice, each time on its own
   route: with fewer clients than the threshold (3 < 5), and with more (12 > 5): the suspect
   rule acts from the first recorded failure on, so whatever was admitted before that still
   reaches the provider.
2. **Redis is killed mid-run (SIGKILL).** Route `steady` (two healthy targets) under load;
   halfway through, redis-server is killed. Printed: failed client requests (goal 0: every
   replica falls back to local state), p50/p99/max latency of requests completed before the
   kill, of those completed after it and of those in flight at the kill, and what the
   replicas' /readyz say afterwards.

Every process it starts is stopped again, on errors and Ctrl-C too. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
from _processes import Processes, managed_processes  # bench/ is on sys.path
from gateway import child_env, gateway_metrics

REPLICAS = 3
FAILURE_THRESHOLD = 5
STATE_TIMEOUT_MS = 50  # the shipped default: what decides when a replica falls back
UPSTREAM_LATENCY_MS = 5
BODY = {"messages": [{"role": "user", "content": "Say hello in one short sentence."}]}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Processes: every child in its own session, all stopped on the way out
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# The stack: redis-server, two mock upstreams, three replicas
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Stack:
    redis_url: str
    mocks: dict[str, str]  # name -> base URL (no /v1)
    replicas: list[str]  # base URLs (no /v1)


def fleet_config(mocks: dict[str, str], redis_url: str) -> str:
    prefix = f"edgeroute-bench-fleet-{uuid.uuid4().hex[:8]}"
    targets = (
        "    targets:\n"
        "      - {provider: sick, model: sick-1, id: sick, input_cost_per_mtok: 1}\n"
        "      - {provider: ok, model: ok-1, id: ok, input_cost_per_mtok: 5}\n"
    )
    return (
        "server: {host: 127.0.0.1, port: 0, shutdown_timeout_s: 1}\n"
        f"state: {{redis_url: '{redis_url}', key_prefix: {prefix}, timeout_ms: {STATE_TIMEOUT_MS}}}"
        "\n"
        f"breaker: {{failure_threshold: {FAILURE_THRESHOLD}, open_timeout_s: 600}}\n"
        "providers:\n"
        f"  - {{name: sick, base_url: '{mocks['sick']}/v1'}}\n"
        f"  - {{name: ok, base_url: '{mocks['ok']}/v1'}}\n"
        "routes:\n"
        "  - model: fail-low\n    strategy: cost\n" + targets + "  - model: fail-high\n"
        "    strategy: cost\n" + targets + "  - model: steady\n    strategy: cost\n"
        "    targets:\n"
        "      - {provider: ok, model: ok-1, id: ok-a, input_cost_per_mtok: 1}\n"
        "      - {provider: ok, model: ok-2, id: ok-b, input_cost_per_mtok: 2}\n"
    )


def start_stack(processes: Processes) -> Stack:
    env = child_env(access_log=False)
    redis_url = processes.redis().url
    cli = [sys.executable, "-m", "edgeroute.cli"]
    mocks: dict[str, str] = {}
    for name in ("sick", "ok"):
        argv = [*cli, "mock-provider", "--port", "0", "--name", name]
        processes.start(f"mock-{name}", [*argv, "--latency-ms", str(UPSTREAM_LATENCY_MS)], env)
    for name in ("sick", "ok"):
        match = processes.wait_for(f"mock-{name}", r"listening on (http://\S+)/v1")
        mocks[name] = match.group(1)
    config = processes.workdir / "fleet.yaml"
    config.write_text(fleet_config(mocks, redis_url))
    for i in range(REPLICAS):
        processes.start(f"replica-{i}", [*cli, "serve", "--config", str(config)], env)
    replicas = []
    for i in range(REPLICAS):
        match = processes.wait_for(f"replica-{i}", r"listening on (http://\S+)/v1 \(state: redis\)")
        replicas.append(match.group(1))
    return Stack(redis_url, mocks, replicas)


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Sample:
    started: float
    ended: float
    ok: bool
    attempts: int
    provider: str


@dataclass(slots=True)
class Load:
    """Closed-loop clients over the replicas until `stop` is set."""

    session: aiohttp.ClientSession
    replicas: list[str]
    model: str
    clients: int
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def client(self, base: str) -> None:
        body = {"model": self.model, **BODY}
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                async with self.session.post(f"{base}/v1/chat/completions", json=body) as resp:
                    await resp.read()
                    ok = resp.status == 200
                    attempts = int(resp.headers.get("x-edgeroute-attempts", "0"))
                    provider = resp.headers.get("x-edgeroute-provider", "")
                    if not ok:
                        self.errors.append(f"HTTP {resp.status}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                ok, attempts, provider = False, 0, ""
                self.errors.append(type(exc).__name__)
            self.samples.append(Sample(started, time.monotonic(), ok, attempts, provider))

    def run(self) -> asyncio.Future[list[None]]:
        return asyncio.gather(
            *(self.client(self.replicas[i % len(self.replicas)]) for i in range(self.clients))
        )


async def state_errors(replicas: list[str]) -> float:
    """Failed shared-state calls summed over the fleet (`edgeroute_state_errors_total`): a
    replica whose Redis call failed or timed out decided that request on local state, where
    the fleet-wide guarantees do not hold, so the figures say how often it happened."""
    scrapes = await asyncio.gather(*(asyncio.to_thread(gateway_metrics, b) for b in replicas))
    return sum(metrics.get("edgeroute_state_errors_total", 0.0) for metrics in scrapes)


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        return await resp.json(content_type=None)


async def post_json(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with session.post(url, json=body) as resp:
        return await resp.json(content_type=None)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# ---------------------------------------------------------------------------------------------
# Scenario 1: a provider starts failing
# ---------------------------------------------------------------------------------------------


async def failing_provider(
    session: aiohttp.ClientSession, stack: Stack, model: str, clients: int, duration_s: float
) -> dict[str, Any]:
    load = Load(session, stack.replicas, model, clients)
    running = load.run()
    await asyncio.sleep(duration_s / 3)
    sick = stack.mocks["sick"]
    await post_json(session, f"{sick}/_mock/reset_stats", {})
    errors_before = await state_errors(stack.replicas)
    await post_json(session, f"{sick}/_mock/config", {"error_rate": 1})
    switched = time.monotonic()
    stopped: dict[int, float] = {}

    async def watch(index: int, base: str) -> None:
        while index not in stopped and time.monotonic() < switched + duration_s:
            explanation = await get_json(session, f"{base}/v1/routes/{model}/explain")
            sick_target = next(t for t in explanation["targets"] if t["target"] == "sick")
            if not sick_target["admissible"]:
                stopped[index] = time.monotonic() - switched
                return
            await asyncio.sleep(0.002)

    await asyncio.gather(*(watch(i, base) for i, base in enumerate(stack.replicas)))
    await asyncio.sleep(max(0.0, switched + duration_s * 2 / 3 - time.monotonic()))
    load.stop.set()
    await running
    stats = await get_json(session, f"{sick}/_mock/stats")
    errors_during = await state_errors(stack.replicas) - errors_before
    samples = load.samples
    failed_over = [s for s in samples if s.attempts >= 2 and s.started >= switched - 1.0]
    return {
        "model": model,
        "clients": clients,
        "failure_threshold": FAILURE_THRESHOLD,
        "requests": len(samples),
        "sent_to_failing": int(stats["faults_served"]),
        "all_stopped_ms": (
            round(max(stopped.values()) * 1000, 1) if len(stopped) == REPLICAS else None
        ),
        "per_replica_stopped_ms": [
            round(stopped[i] * 1000, 1) if i in stopped else None for i in range(REPLICAS)
        ],
        "last_routed_to_failing_ms": (
            round((max(s.started for s in failed_over) - switched) * 1000, 1)
            if failed_over
            else None
        ),
        "state_errors": int(errors_during),
        "client_errors": len(load.errors),
        "client_error_rate": len(load.errors) / len(samples) if samples else 0.0,
    }


# ---------------------------------------------------------------------------------------------
# Scenario 2: Redis killed mid-run
# ---------------------------------------------------------------------------------------------


async def redis_killed(
    session: aiohttp.ClientSession,
    stack: Stack,
    processes: Processes,
    clients: int,
    duration_s: float,
) -> dict[str, Any]:
    load = Load(session, stack.replicas, "steady", clients)
    running = load.run()
    await asyncio.sleep(duration_s / 2)
    killed = time.monotonic()
    await asyncio.to_thread(processes.kill, "redis")
    await asyncio.sleep(duration_s / 2)
    load.stop.set()
    await running
    ready = [await get_json(session, f"{base}/readyz") for base in stack.replicas]
    before = [(s.ended - s.started) * 1000 for s in load.samples if s.ended < killed]
    after = [(s.ended - s.started) * 1000 for s in load.samples if s.ended >= killed]
    straddling = [
        (s.ended - s.started) * 1000 for s in load.samples if s.started < killed <= s.ended
    ]

    def summary(values: list[float]) -> dict[str, float]:
        return {
            "requests": len(values),
            "p50_ms": round(percentile(values, 0.50), 2),
            "p99_ms": round(percentile(values, 0.99), 2),
            "max_ms": round(max(values, default=float("nan")), 2),
        }

    b, a, c = summary(before), summary(after), summary(straddling)
    return {
        "clients": clients,
        "requests": len(load.samples),
        "failed_requests": len(load.errors),
        "errors": sorted(set(load.errors)),
        "before_kill": b,
        "after_kill": a,
        "in_flight_at_kill": c,
        "added_p99_ms": round(a["p99_ms"] - b["p99_ms"], 2),
        "added_max_ms": round(a["max_ms"] - b["max_ms"], 2),
        "shared_state_after": [r.get("shared_state") for r in ready],
    }


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


async def run(stack: Stack, processes: Processes, quick: bool) -> dict[str, Any]:
    fail_s, kill_s = (3.0, 4.0) if quick else (9.0, 12.0)
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        for base in stack.replicas:  # one request each: the whole path works first
            body = {"model": "steady", **BODY}
            async with session.post(f"{base}/v1/chat/completions", json=body) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"{base}: a test request got HTTP {resp.status}")
        log(f"scenario 1: provider fails mid-run, {REPLICAS} clients ({fail_s:g} s)")
        low = await failing_provider(session, stack, "fail-low", REPLICAS, fail_s)
        # Back to healthy for the second run (a different route: its breaker is its own).
        await post_json(session, f"{stack.mocks['sick']}/_mock/config", {"error_rate": 0})
        log(f"scenario 1: provider fails mid-run, {REPLICAS * 4} clients ({fail_s:g} s)")
        high = await failing_provider(session, stack, "fail-high", REPLICAS * 4, fail_s)
        log(f"scenario 2: redis-server SIGKILLed mid-run, {REPLICAS * 4} clients ({kill_s:g} s)")
        killed = await redis_killed(session, stack, processes, REPLICAS * 4, kill_s)
    return {"failing_provider": [low, high], "redis_killed": killed}


def report(results: dict[str, Any]) -> str:
    lines = [
        f"edgeroute fleet: {REPLICAS} replicas on one Redis "
        f"(python {platform.python_version()}, {os.cpu_count()} cpus, "
        f"failure_threshold {FAILURE_THRESHOLD}, state timeout {STATE_TIMEOUT_MS} ms, "
        f"upstream latency {UPSTREAM_LATENCY_MS} ms)",
        "",
        "A provider starts failing mid-run",
        f"  {'clients':>8} {'requests':>9} {'sent to it':>11} {'goal':>5} "
        f"{'all stopped':>12} {'last sent':>10} {'client errors':>14} {'state errors':>13}",
    ]
    for row in results["failing_provider"]:
        stopped = row["all_stopped_ms"]
        last = row["last_routed_to_failing_ms"]
        lines.append(
            f"  {row['clients']:>8} {row['requests']:>9} {row['sent_to_failing']:>11} "
            f"{row['failure_threshold']:>5} "
            f"{(f'{stopped:.1f} ms' if stopped is not None else 'never'):>12} "
            f"{(f'{last:.1f} ms' if last is not None else '-'):>10} "
            f"{row['client_errors']:>6} ({row['client_error_rate']:.2%}) "
            f"{row['state_errors']:>13}"
        )
    k = results["redis_killed"]
    b, a, c = k["before_kill"], k["after_kill"], k["in_flight_at_kill"]
    lines += [
        "",
        "redis-server SIGKILLed mid-run",
        f"  {k['clients']} clients, {k['requests']} requests, "
        f"failed: {k['failed_requests']} (goal 0) {k['errors'] or ''}".rstrip(),
        f"  {'':<24} {'requests':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}",
        f"  {'completed before kill':<24} {b['requests']:>9} {b['p50_ms']:>8.2f} "
        f"{b['p99_ms']:>8.2f} {b['max_ms']:>8.2f}",
        f"  {'completed after kill':<24} {a['requests']:>9} {a['p50_ms']:>8.2f} "
        f"{a['p99_ms']:>8.2f} {a['max_ms']:>8.2f}",
        f"  {'  of which in flight':<24} {c['requests']:>9} {c['p50_ms']:>8.2f} "
        f"{c['p99_ms']:>8.2f} {c['max_ms']:>8.2f}",
        f"  worst added latency: p99 {k['added_p99_ms']:+.2f} ms, max {k['added_max_ms']:+.2f} ms;"
        f" replicas now: {', '.join(k['shared_state_after'])}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (~15 s in all)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    with managed_processes("fleet") as processes:
        log("starting redis-server, 2 mock providers, 3 replicas ...")
        stack = start_stack(processes)
        results = asyncio.run(run(stack, processes, args.quick))
    results["settings"] = asdict(
        Settings(REPLICAS, FAILURE_THRESHOLD, STATE_TIMEOUT_MS, UPSTREAM_LATENCY_MS, args.quick)
    )
    print(json.dumps(results, indent=2) if args.json else report(results))
    return 0


@dataclass(frozen=True, slots=True)
class Settings:
    replicas: int
    failure_threshold: int
    state_timeout_ms: int
    upstream_latency_ms: int
    quick: bool


if __name__ == "__main__":
    sys.exit(main())
