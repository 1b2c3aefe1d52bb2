#!/usr/bin/env python
"""Two checkouts' gateways on Redis state, side by side in one run: req/s at c=64.

    python bench/ab_gateway.py --base-python /work/wt-base/.venv/bin/python [--rounds 6]

For a change whose effect is a few percent, on a machine whose throughput drifts by more
than that from minute to minute: both gateways run at once against one private
redis-server and one mock upstream, each on its own key prefix, and wrk (c=64, as in
bench/gateway.py) alternates between them, round after round, so both see the same
weather. `--base-python` is the interpreter of the other checkout's virtualenv (its
`edgeroute` is what it imports); this checkout runs with the interpreter running the script.
Printed: every round's req/s and gateway CPU per request (utime+stime of the gateway
process over the wrk run ÷ requests; much steadier than req/s when other work shares the
cores), and the medians with new/base ratios. `--together` runs both wrk at once instead of
in turn: the two gateways then compete for the same cores at the same moments.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path

from _processes import managed_processes  # bench/ is on sys.path
from gateway import (
    BODY,
    WrkResult,
    child_env,
    cpu_seconds,
    gateway_config,
    http_post,
    log,
    run_wrk,
    start_redis,
    wrk_script,
)


def _load(results: dict[str, WrkResult], name: str, url: str, script: Path, seconds: int) -> None:
    results[name] = run_wrk(url, script, seconds)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--base-python", required=True, help="the other checkout's python")
    parser.add_argument("--rounds", type=int, default=6, help="wrk runs per gateway")
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--together", action="store_true", help="load both at the same time")
    options = parser.parse_args(argv)
    pythons = {"base": options.base_python, "new": sys.executable}
    rates: dict[str, list[float]] = {name: [] for name in pythons}
    cpu_ms: dict[str, list[float]] = {name: [] for name in pythons}
    pids: dict[str, int] = {}
    failed: dict[str, int] = {name: 0 for name in pythons}
    with managed_processes("ab") as processes:
        env = child_env()
        redis_url, _ = start_redis(processes)
        processes.start(
            "upstream",
            [sys.executable, "-m", "edgeroute.cli", "mock-provider", "--port", "0"],
            env,
        )
        upstream = processes.wait_for("upstream", r"listening on (http://\S+/v1)").group(1)
        urls = {}
        for name, python in pythons.items():
            config = processes.workdir / f"{name}.yaml"
            prefix = f"edgeroute-ab-{name}-{uuid.uuid4().hex[:6]}"
            config.write_text(gateway_config(upstream, redis_url, prefix))
            pids[name] = processes.start(
                name, [python, "-m", "edgeroute.cli", "serve", "--config", str(config)], env
            )
            match = processes.wait_for(name, r"listening on (http://\S+/v1) \(state: (\w+)\)")
            if match.group(2) != "redis":
                raise RuntimeError(f"{name} runs on {match.group(2)} state")
            urls[name] = match.group(1) + "/chat/completions"
            status, _ = http_post(urls[name], BODY)
            if status != 200:
                raise RuntimeError(f"{name}: a test request got HTTP {status}")
        script = processes.workdir / "post.lua"
        wrk_script(script)
        for name in pythons:  # warm-up, unmeasured
            run_wrk(urls[name], script, 2)
        for round_no in range(options.rounds):
            # Alternate who goes first, so neither always follows the other's aftermath.
            order = list(pythons) if round_no % 2 == 0 else list(reversed(pythons))
            batches = [order] if options.together else [[name] for name in order]
            for batch in batches:
                results: dict[str, WrkResult] = {}
                cpu0 = {name: cpu_seconds(pids[name]) for name in batch}

                threads = [
                    threading.Thread(
                        target=_load, args=(results, name, urls[name], script, options.duration)
                    )
                    for name in batch
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                for name in batch:
                    result = results[name]
                    rates[name].append(result.rps)
                    cpu_ms[name].append(
                        (cpu_seconds(pids[name]) - cpu0[name]) * 1000 / max(1, result.requests)
                    )
                    failed[name] += result.non_2xx + result.socket_errors
                    log(f"round {round_no + 1}: {name} {result.rps:,.0f} req/s")
    mode = "both loaded at once" if options.together else "in turn"
    print(f"gateway on Redis state, wrk c=64, {options.rounds} x {options.duration} s each, {mode}")
    print("              req/s base    req/s new  new/base   cpu ms/req base  new  new/base")
    for i in range(options.rounds):
        print(
            f"  round {i + 1:2d} {rates['base'][i]:12,.0f} {rates['new'][i]:12,.0f}"
            f" {rates['new'][i] / rates['base'][i]:9.3f}"
            f" {cpu_ms['base'][i]:17.3f} {cpu_ms['new'][i]:.3f}"
            f" {cpu_ms['new'][i] / cpu_ms['base'][i]:9.3f}"
        )
    rate = {name: statistics.median(values) for name, values in rates.items()}
    cpu = {name: statistics.median(values) for name, values in cpu_ms.items()}
    print(
        f"  median   {rate['base']:12,.0f} {rate['new']:12,.0f} {rate['new'] / rate['base']:9.3f}"
        f" {cpu['base']:17.3f} {cpu['new']:.3f} {cpu['new'] / cpu['base']:9.3f}"
    )
    print(f"  failed requests: base {failed['base']}  new {failed['new']}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
