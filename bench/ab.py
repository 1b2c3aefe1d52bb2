#!/usr/bin/env python
"""A/B two checkouts of edgeroute side by side, in one run: is a refactor as fast as before?

    python bench/ab.py --base REV [--rounds N] [--duration S] [--state redis|memory]
                       [--clients off|both|B] [--upstream auto|nginx|mock]

Checks REV out into a temporary `git worktree`, then starts one upstream (nginx when
installed, else the mock provider: bench/gateway.py's `--upstream`), one private redis-server
(tests/support/redis_servers.py, the launcher the tests use) and two gateways
with the same config: A runs REV's code, B this checkout's (each with its own key prefix).
`wrk -t2 -c64` then alternates A, B, A, B, … for `--rounds` rounds, so drift on a shared,
noisy machine hits both alike; CPU ms per request comes from /proc/<pid>/stat. Prints each
round, the medians and B/A ratios, and PASS when B's req/s is at least 95 % of A's (the
refactor target). Every process and the worktree are removed on the way out.

`--clients both` gives both gateways one client key with rpm/tpm limits (never reached) that
every request presents; `--clients B` only B, so `--base HEAD --clients B` measures what
client limits cost against the same code without them (goal: B/A >= 0.75).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _processes import REPO, RedisServer, managed_processes  # bench/ is on sys.path
from gateway import (  # the same request, config and CPU reading
    BODY,
    CLIENT_KEY,
    UPSTREAMS,
    cpu_seconds,
    gateway_config,
    start_upstream,
    upstream_kind,
)

WRK_LUA = f"""wrk.method = "POST"
wrk.body = '{BODY.decode()}'
wrk.headers["Content-Type"] = "application/json"
"""


def wrk(url: str, duration: float, script: Path) -> float:
    out = subprocess.run(
        ["wrk", "-t2", "-c64", f"-d{duration:g}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if match is None:
        raise RuntimeError(f"wrk printed no rate:\n{out}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{errors.group(1)} failed requests against {url}")
    return float(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the git revision to compare against")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--state", choices=("redis", "memory"), default="redis")
    parser.add_argument(
        "--clients",
        choices=("off", "both", "B"),
        default="off",
        help="one limited client (server.clients) whose key wrk presents, on both gateways or "
        "on B only (with --base HEAD: what client limits cost, side by side)",
    )
    parser.add_argument(
        "--upstream", choices=UPSTREAMS, default="auto", help="as bench/gateway.py's --upstream"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian package wrk)")
    base_rev = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", args.base],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    worktree = Path(tempfile.mkdtemp(prefix="edgeroute-ab-")) / "base"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.base],
        capture_output=True,
        check=True,
    )
    try:
        with (
            managed_processes("edgeroute-ab-") as processes,
            RedisServer() as redis_server,
        ):
            env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEROUTE_")}
            env["EDGEROUTE_LOG_LEVEL"] = "WARNING"
            cli = [sys.executable, "-m", "edgeroute.cli"]
            upstream, _ = start_upstream(processes, upstream_kind(args.upstream))
            redis_url = redis_server.url if args.state == "redis" else None
            gateways: dict[str, tuple[str, int]] = {}
            for name, tree in (("A", worktree), ("B", REPO)):
                path = processes.workdir / f"{name}.yaml"
                limited = args.clients == "both" or args.clients == name
                path.write_text(gateway_config(upstream, redis_url, f"ab-{name}", limited))
                # Run from the tree itself: `-m` imports from the working directory first,
                # whatever PYTHONPATH says (before this, both gateways ran this checkout).
                pid = processes.start(
                    name,
                    [*cli, "serve", "--config", str(path)],
                    {**env, "PYTHONPATH": str(tree)},
                    cwd=tree,
                )
                url = processes.wait_for(name, r"listening on (http://\S+)").group(1)
                gateways[name] = (url + "/chat/completions", pid)  # url ends in /v1
            # The key goes to both: a gateway without keys configured does not look at it.
            script = processes.workdir / "post.lua"
            auth = f'wrk.headers["Authorization"] = "Bearer {CLIENT_KEY}"\n'
            script.write_text(WRK_LUA + (auth if args.clients != "off" else ""))
            for url, _ in gateways.values():  # warm up: connections, scripts, JIT-free caches
                wrk(url, 1.0, script)
            rows: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
            for round_no in range(args.rounds):
                for name in ("A", "B") if round_no % 2 == 0 else ("B", "A"):
                    url, pid = gateways[name]
                    cpu_before = cpu_seconds(pid)
                    rate = wrk(url, args.duration, script)
                    cpu_ms = (cpu_seconds(pid) - cpu_before) * 1000 / (rate * args.duration)
                    rows[name].append((rate, cpu_ms))
                    if not args.json:
                        line = f"round {round_no + 1} {name}: {rate:8.0f} req/s"
                        print(f"{line}, {cpu_ms:.3f} ms CPU/request", flush=True)
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)],
            capture_output=True,
        )
        shutil.rmtree(worktree.parent, ignore_errors=True)
    median = {
        name: (
            statistics.median(r for r, _ in values),
            statistics.median(c for _, c in values),
        )
        for name, values in rows.items()
    }
    ratio = median["B"][0] / median["A"][0]
    # Client limits on B only: what they cost (issue 12), else a refactor's no-regression bar.
    goal = 0.75 if args.clients == "B" else 0.95
    report = {
        "base": base_rev,
        "state": args.state,
        "clients": args.clients,
        "rounds": rows,
        "median_rps": {k: v[0] for k, v in median.items()},
        "median_cpu_ms_per_request": {k: v[1] for k, v in median.items()},
        "rps_ratio_b_over_a": ratio,
        "pass": ratio >= goal,
    }
    if args.json:
        print(json.dumps(report))
    else:
        limits = {"off": "", "both": ", client limits on", "B": ", client limits on B only"}[
            args.clients
        ]
        where = f"{args.state} state{limits}"
        print(f"\nA = {base_rev} (base), B = this checkout; {where}; wrk -t2 -c64")
        for name in ("A", "B"):
            rps, cpu = median[name]
            print(f"  {name}: median {rps:8.0f} req/s, {cpu:.3f} ms CPU/request")
        verdict = "PASS" if ratio >= goal else "MISS"
        print(f"  B/A req/s {ratio:.3f} (target >= {goal}): {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
