#!/usr/bin/env python
"""The gateway's own Python per request, without sockets: the figure for changes of a few us.

    python bench/requestpath.py [--base REV] [--rounds N] [--requests N] [--quick] [--json]

`bench/ab.py` measures whole gateways under wrk, where a saving of a few microseconds per
request hides in the shared machine's noise (rounds scatter ±20 %). This runs the app of
`bench/gateway.py`'s configuration (hybrid route, two targets, access log on) in one process
on MemoryState, with every upstream adapter replaced by one that answers at once (it still
encodes the upstream body), and calls `Proxy.handle` on mocked requests: parsing, the
decide, the failover engine, the reply and its headers, metrics, the access line. CPU time
(process time) per request, after a warm-up round.

With `--base REV`, REV is checked out into a temporary `git worktree` and the two trees run
alternately in child processes (A = REV, B = this checkout), each measured by this same
harness, so drift hits both alike; prints the medians and B/A. MemoryState is the state of
both: a change to the Redis state path shows in `bench/ab.py`, not here.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

from _processes import REPO  # bench/ is on sys.path
from gateway import BODY, ROUTE, gateway_config  # the request and config bench/gateway.py uses

REPLY = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":16,"completion_tokens":3,"total_tokens":19}}'
)


def measure(requests: int, rounds: int) -> list[float]:
    """CPU us per request of `rounds` rounds (after one warm-up round), this process, on
    uvloop when it is installed (what `edgeroute serve` runs on), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_measure(requests, rounds))
    return uvloop.run(_measure(requests, rounds))


async def _measure(requests: int, rounds: int) -> list[float]:
    import yaml
    from aiohttp import streams, web
    from aiohttp.test_utils import make_mocked_request

    from edgeroute import accesslog
    from edgeroute.config import parse_config
    from edgeroute.providers import UpstreamReply, UpstreamRequest
    from edgeroute.providers.base import Usage
    from edgeroute.server import PROXY, create_app
    from edgeroute.state.memory import MemoryState

    class Instant:
        """An upstream that answers at once; the body is still encoded, as a real one is."""

        async def send(self, request: UpstreamRequest) -> UpstreamReply:
            request.body()
            return UpstreamReply(200, REPLY, "application/json", Usage(16, 3))

    # The access line goes to a writer thread, as `edgeroute serve` does it.
    accesslog.install(os.open(os.devnull, os.O_WRONLY))
    logging.getLogger("edgeroute.access").setLevel(logging.INFO)
    document = yaml.safe_load(gateway_config("http://127.0.0.1:9/v1", None, "bench"))
    app = create_app(parse_config(document, env={}), state=MemoryState())
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        proxy = app[PROXY]
        adapters: Any = proxy.live.current.adapters
        for name in list(adapters):
            adapters[name] = Instant()
        loop = asyncio.get_running_loop()

        def request() -> web.Request:
            payload = streams.StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=loop)
            payload.feed_data(BODY)
            payload.feed_eof()
            headers = {"Content-Length": str(len(BODY)), "Content-Type": "application/json"}
            return make_mocked_request(
                "POST", "/v1/chat/completions", headers=headers, payload=payload, app=app
            )

        per_request: list[float] = []
        for round_no in range(rounds + 1):
            # The first round (a few hundred) warms up; mocked requests are built outside
            # the timed loop (building them costs more than serving them).
            count = requests if round_no else min(requests, 500)
            batch = [request() for _ in range(count)]
            # The batch's mocks are a large object graph a serving process does not have:
            # frozen, the cyclic GC leaves them out of its full collections.
            gc.collect()
            gc.freeze()
            started = time.process_time()
            for http in batch:
                response = await proxy.handle(http, "chat")
            elapsed = time.process_time() - started
            gc.unfreeze()
            if response.status != 200 or response.headers["x-edgeroute-route"] != ROUTE:
                raise RuntimeError(f"the gateway answered {response.status}")
            if round_no:
                per_request.append(elapsed / count * 1e6)
        return per_request
    finally:
        await runner.cleanup()
        accesslog.close()


def child(tree: Path, requests: int, rounds: int) -> list[float]:
    """`measure` in a child process on `tree`'s edgeroute (this harness, that code)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEROUTE_")}
    env["PYTHONPATH"] = str(tree)
    argv = [sys.executable, __file__, "--child", "--requests", str(requests)]
    out = subprocess.run(
        [*argv, "--rounds", str(rounds)], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"the run on {tree} failed:\n{out.stderr[-3000:]}")
    figures: list[float] = json.loads(out.stdout)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="a git revision to compare against (A), side by side")
    parser.add_argument("--rounds", type=int, default=6, help="alternations (with --base)")
    parser.add_argument("--requests", type=int, default=5000, help="requests per round")
    parser.add_argument("--quick", action="store_true", help="a few hundred requests")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    requests, rounds = (300, 2) if args.quick else (args.requests, args.rounds)
    if args.child:
        print(json.dumps(measure(requests, 1)))
        return 0
    trees = {"B": REPO}
    worktree: Path | None = None
    if args.base:
        worktree = Path(tempfile.mkdtemp(prefix="edgeroute-requestpath-")) / "base"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.base],
            capture_output=True,
            check=True,
        )
        trees = {"A": worktree, "B": REPO}
    figures: dict[str, list[float]] = {name: [] for name in trees}
    try:
        for round_no in range(rounds):
            order = list(trees) if round_no % 2 == 0 else list(reversed(trees))
            for name in order:
                us = child(trees[name], requests, 1)[0]
                figures[name].append(us)
                if not args.json:
                    print(f"round {round_no + 1} {name}: {us:6.1f} us CPU/request", flush=True)
    finally:
        if worktree is not None:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)],
                capture_output=True,
            )
            shutil.rmtree(worktree.parent, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in figures.items()}
    report: dict[str, Any] = {"requests_per_round": requests, "rounds": figures}
    report["median_us_per_request"] = medians
    if "A" in medians:
        report["base"] = args.base
        report["cpu_ratio_b_over_a"] = medians["B"] / medians["A"]
    if args.json:
        print(json.dumps(report))
        return 0
    print()
    for name, value in medians.items():
        label = f"{name} = {args.base}" if name == "A" else f"{name} = this checkout"
        print(f"  {label}: median {value:.1f} us CPU/request")
    if "A" in medians:
        print(f"  B/A CPU per request {report['cpu_ratio_b_over_a']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
