#!/usr/bin/env python
"""Does routing win in real time? The simulator's scenarios against real processes.

    python bench/routing.py [--quick] [--json] [--scenario NAME ...]

Three `edgeroute mock-provider` upstreams, reconfigured at runtime through POST /_mock/config
(latency_ms, latency_jitter_ms, error_rate) on each scenario's schedule, sit behind one
`edgeroute serve` on Redis state (a private `redis-server` this script spawns). Each scenario
has three routes on that gateway, fed the very same open-loop Poisson arrivals at once:

- edgeroute: the scenario's strategy and `latency:` config, as `edgeroute simulate` runs it;
- round_robin: the same targets, strategy round_robin;
- oracle: a single-target route per upstream, and the client picks the one the schedule says
  is best at send time (so the oracle pays the same gateway overhead).

It prints, per scenario, what `edgeroute simulate` prints - mean/p95 latency, cost, failed
requests, time to leave a degraded target and to come back - and the same PASS/MISS targets.
The capacity-limited scenario needs an upstream whose latency grows with concurrency, which
the mock does not model: it is reported by the simulator only. `--quick` compresses every
scenario's timeline to a quarter (the smoke test); the targets are meant for a full run.

Every process it starts is stopped again, on errors and Ctrl-C too. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from _processes import Processes, managed_processes  # bench/ is on sys.path
from gateway import child_env, start_redis  # bench/ is on sys.path

from edgeroute import simulate as sim
from edgeroute.config import BreakerConfig, LatencyConfig

ADMIN_TOKEN = "bench-routing-admin"
UPSTREAMS = 3
BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
BENCH_SCENARIOS = ("latency-shift", "outage", "near-equal", "cost-vs-latency")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def scaled(scenario: sim.Scenario, factor: float) -> sim.Scenario:
    """The same scenario on a timeline `factor` times as long (events and windows too)."""
    if factor == 1.0:
        return scenario
    return msgspec.structs.replace(
        scenario,
        duration_s=scenario.duration_s * factor,
        events=[msgspec.structs.replace(e, at_s=e.at_s * factor) for e in scenario.events],
        degraded=(
            None
            if scenario.degraded is None
            else (scenario.degraded[0] * factor, scenario.degraded[1] * factor)
        ),
        phases=[(a * factor, b * factor) for a, b in scenario.phases],
    )


def route_names(scenario: sim.Scenario) -> dict[str, str]:
    return {
        "edgeroute": f"{scenario.name}-edgeroute",
        "round_robin": f"{scenario.name}-rr",
        **{f"only-{u.name}": f"{scenario.name}-only-{u.name}" for u in scenario.upstreams},
    }


def gateway_config(
    scenarios: Sequence[sim.Scenario], mocks: Sequence[str], redis_url: str, prefix: str
) -> str:
    """Provider p<i> is mock i; scenario upstream i is served by provider p<i>."""
    routes: list[dict[str, Any]] = []
    for scenario in scenarios:
        names = route_names(scenario)
        targets = [
            {"provider": f"p{i}", "model": "m", "id": u.name, "input_cost_per_mtok": u.price}
            for i, u in enumerate(scenario.upstreams)
        ]
        latency = msgspec.to_builtins(msgspec.convert(scenario.latency, LatencyConfig))
        breaker = msgspec.to_builtins(msgspec.convert(scenario.breaker, BreakerConfig))
        extra: dict[str, Any] = {"latency": latency, "breaker": breaker}
        edgeroute_route = {"model": names["edgeroute"], "strategy": scenario.strategy, **extra}
        if scenario.weights:
            edgeroute_route["weights"] = scenario.weights
        routes.append({**edgeroute_route, "targets": targets})
        routes.append(
            {"model": names["round_robin"], "strategy": "round_robin", "targets": targets, **extra}
        )
        for i, u in enumerate(scenario.upstreams):
            routes.append(
                {
                    "model": names[f"only-{u.name}"],
                    "strategy": "cost",
                    "targets": [targets[i]],
                    **extra,
                }
            )
    document = {
        "server": {
            "host": "127.0.0.1",
            "port": 0,
            "shutdown_timeout_s": 1,
            "admin_token": ADMIN_TOKEN,
            "max_attempts": 3,
        },
        "state": {"redis_url": redis_url, "key_prefix": prefix},
        "providers": [
            {"name": f"p{i}", "base_url": url, "timeout_s": 10} for i, url in enumerate(mocks)
        ],
        "routes": routes,
    }
    return json.dumps(document)  # JSON is YAML


async def configure(session: aiohttp.ClientSession, mock: str, **settings: float) -> None:
    base = mock.removesuffix("/v1")
    async with session.post(f"{base}/_mock/config", json=settings) as response:
        response.raise_for_status()


async def set_upstream(
    session: aiohttp.ClientSession, mock: str, latency_ms: float, error_rate: float
) -> None:
    await configure(
        session,
        mock,
        latency_ms=latency_ms,
        latency_jitter_ms=latency_ms * 0.1,
        error_rate=error_rate,
    )


async def run_scenario(
    scenario: sim.Scenario, gateway: str, mocks: Sequence[str], seed: int
) -> sim.Report:
    names = route_names(scenario)
    upstream_index = {u.name: i for i, u in enumerate(scenario.upstreams)}
    world = sim._World(scenario)  # the schedule, as the oracle knows it
    oracle_route = sim.scenario_route(scenario)
    results = {policy: sim.Result(policy) for policy in sim.POLICIES}
    prices = {u.name: u.price for u in scenario.upstreams}
    luck = random.Random(seed)
    arrivals = sim.poisson_arrivals(scenario, luck)

    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        for u in scenario.upstreams:
            await set_upstream(session, mocks[upstream_index[u.name]], u.latency_ms, u.error_rate)
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.2

        async def one(policy: str, route: str, at: float) -> None:
            result = results[policy]
            body = {**BODY, "model": route}
            try:
                async with session.post(f"{gateway}/chat/completions", json=body) as response:
                    await response.read()
                    status = response.status
                    target = response.headers.get("x-edgeroute-model") and _target_of(
                        response.headers.get("x-edgeroute-provider", ""), scenario
                    )
                    attempts = int(response.headers.get("x-edgeroute-attempts", "1"))
            except (TimeoutError, aiohttp.ClientError):
                status, target, attempts = 0, None, 1
            done = loop.time() - start
            if status != 200 or not target:
                result.failed += 1
                return
            result.latencies_ms.append((done - at) * 1000.0)
            result.cost += prices[target] * sim.TOKENS_PER_REQUEST / 1e6
            result.firsts.append((at, target))
            result.attempts.append((at, target))
            if scenario.focus is not None and attempts > 1:
                # Failed attempts before this success: in these scenarios only the focus fails.
                result.attempts.extend((at, scenario.focus) for _ in range(attempts - 1))

        async def events() -> None:
            for event in sorted(scenario.events, key=lambda e: e.at_s):
                await asyncio.sleep(max(0.0, start + event.at_s - loop.time()))
                world.advance(event.at_s)
                i = upstream_index[event.target]
                await set_upstream(
                    session, mocks[i], world.latency[event.target], world.errors[event.target]
                )

        async def openings() -> None:
            """Breaker openings of the focus target on the edgeroute route (admin state)."""
            if scenario.focus is None:
                return
            last = None
            headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            while loop.time() < start + scenario.duration_s:
                url = f"{gateway.removesuffix('/v1')}/admin/state"
                async with session.get(url, headers=headers) as response:
                    document = await response.json()
                route = document["routes"][names["edgeroute"]]
                state = next(
                    t["breaker"] for t in route["targets"] if t["target"] == scenario.focus
                )
                if state == "open" and last != "open":
                    results["edgeroute"].openings += 1
                last = state
                await asyncio.sleep(0.25)

        tasks: list[asyncio.Task[None]] = [
            asyncio.ensure_future(events()),
            asyncio.ensure_future(openings()),
        ]
        for at in arrivals:
            await asyncio.sleep(max(0.0, start + at - loop.time()))
            world.advance(at)
            best = sim._oracle_pick(scenario, oracle_route, world, ())
            tasks.append(asyncio.ensure_future(one("edgeroute", names["edgeroute"], at)))
            tasks.append(asyncio.ensure_future(one("round_robin", names["round_robin"], at)))
            tasks.append(asyncio.ensure_future(one("oracle", names[f"only-{best}"], at)))
        await asyncio.gather(*tasks)
    for result in results.values():
        result.firsts.sort()
        result.attempts.sort()
        result.metrics = sim.measure(scenario, result)
    return sim.finish_report(scenario, results)


def _target_of(provider: str, scenario: sim.Scenario) -> str | None:
    if not provider.startswith("p"):
        return None
    index = int(provider[1:])
    return scenario.upstreams[index].name if index < len(scenario.upstreams) else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="timelines at a quarter (smoke)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--scenario", action="append", choices=BENCH_SCENARIOS)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    chosen = args.scenario or list(BENCH_SCENARIOS)
    factor = 0.25 if args.quick else 1.0
    scenarios = [scaled(s, factor) for s in sim.builtin_scenarios() if s.name in chosen]

    reports: list[sim.Report] = []
    with managed_processes("edgeroute-bench-routing-") as processes:
        reports = asyncio.run(run_all(processes, scenarios, args.seed))
    if args.json:
        print(
            json.dumps(
                {
                    "meta": {"quick": args.quick, "seed": args.seed, "time_factor": factor},
                    "scenarios": sim.report_json(reports),
                },
                indent=2,
            )
        )
    else:
        print(sim.render(reports))
    return 0


async def run_all(
    processes: Processes, scenarios: Sequence[sim.Scenario], seed: int
) -> list[sim.Report]:
    env = child_env()
    redis_url, _ = start_redis(processes)
    cli = [sys.executable, "-m", "edgeroute.cli"]
    mocks = []
    for i in range(UPSTREAMS):
        name = f"mock-{i}"
        processes.start(name, [*cli, "mock-provider", "--port", "0", "--name", name], env)
        mocks.append(processes.wait_for(name, r"listening on (http://\S+/v1)").group(1))
    config = Path(processes.workdir) / "gateway.yaml"
    prefix = f"bench-routing-{uuid.uuid4().hex[:8]}"
    config.write_text(gateway_config(scenarios, mocks, redis_url, prefix))
    processes.start("gateway", [*cli, "serve", "--config", str(config)], env)
    gateway = processes.wait_for("gateway", r"listening on (http://\S+/v1) \(state: redis\)")
    reports = []
    for scenario in scenarios:
        log(f"{scenario.name}: {scenario.duration_s:.0f} s at {scenario.rate:g} req/s")
        began = time.monotonic()
        reports.append(await run_scenario(scenario, gateway.group(1), mocks, seed))
        log(f"{scenario.name}: done in {time.monotonic() - began:.1f} s")
    return reports


if __name__ == "__main__":
    raise SystemExit(main())
