#!/usr/bin/env python
"""Redis high availability as a replica sees it: time to live after a promotion, degraded spells.

    python bench/ha.py [--quick] [--json]

Each scenario runs real servers on loopback (tests/support/redis_servers.py, the launcher the
tests use) and one replica's state stack exactly as the gateway builds it (`build_state`:
RedisState wrapped for degraded mode, 50 ms state timeout) under steady traffic: a decide and
its record every 10 ms on each of 6 routes.

- sentinel:          the primary is SIGKILLed; Sentinel promotes the replica.
- sentinel, 1 hung:  the same, with the first sentinel of the URL frozen (SIGSTOP) throughout.
- cluster:           3 primaries + 3 replicas; the primary owning a busy route is SIGKILLed.

Printed per scenario: when the promotion was seen (from the kill), how long after it the
replica was live on shared state again (goal: within 3 s), how many degraded spells it had
(goal: one per event), how many routes went local (cluster: only the killed node's), and
decisions that could not be made at all (goal: 0: degraded mode always answers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import redis  # noqa: E402
from redis.crc import key_slot  # noqa: E402

from edgeroute.config import StateConfig  # noqa: E402
from edgeroute.state import FallbackState, build_state  # noqa: E402
from edgeroute.state.redis import route_keys  # noqa: E402
from edgeroute.strategy import RoutingStrategy  # noqa: E402
from edgeroute.types import Outcome, OutcomeKind  # noqa: E402
from tests.support.redis_servers import RedisCluster, RedisSentinelSetup  # noqa: E402
from tests.test_state_conformance import make_route  # noqa: E402

MASTER = "ha-primary"
ROUTES = 6


@dataclass
class Result:
    scenario: str
    promoted_after_kill_s: float | None = None
    live_after_promotion_s: float | None = None
    degraded_spells: int = 0
    routes_local: int = 0
    unanswered: int = 0
    decisions: int = 0
    notes: list[str] = field(default_factory=list)


async def drive(
    result: Result,
    url: str,
    *,
    kill: object,
    promoted: object,
    seconds: float,
    kill_at_s: float = 2.0,
) -> None:
    """Traffic on ROUTES routes; kill at `kill_at_s`; watch for the promotion and the return."""
    changes: list[tuple[float, bool]] = []
    state = build_state(
        StateConfig(redis_url=url, key_prefix=f"ha-{uuid.uuid4().hex[:6]}", timeout_ms=50),
        on_change=lambda degraded: changes.append((time.monotonic(), degraded)),
    )
    assert isinstance(state, FallbackState)
    routes = [make_route(RoutingStrategy.round_robin()) for _ in range(ROUTES)]
    loop = asyncio.get_running_loop()
    started = loop.time()
    killed_at = promoted_at = None
    shards_seen: set[int] = set()
    try:
        while loop.time() - started < seconds:
            now = loop.time()
            if killed_at is None and now - started >= kill_at_s:
                kill()  # type: ignore[operator]
                killed_at = time.monotonic()
            if killed_at is not None and promoted_at is None and promoted():  # type: ignore[operator]
                promoted_at = time.monotonic()
            for route in routes:
                try:
                    decision = await state.decide(route)
                except Exception as exc:  # degraded mode should make this impossible
                    result.unanswered += 1
                    result.notes.append(repr(exc))
                    continue
                result.decisions += 1
                if decision.admission is not None:
                    await state.record(
                        route, Outcome.for_admission(decision.admission, OutcomeKind.SUCCESS, 1.0)
                    )
            shards_seen |= set(state.degraded_shards)
            await asyncio.sleep(0.01)
    finally:
        await state.close()
    result.degraded_spells = sum(1 for _, degraded in changes if degraded)
    result.routes_local = sum(1 for r in routes if state.primary.shard_of(r) in shards_seen)
    if killed_at is not None and promoted_at is not None:
        result.promoted_after_kill_s = round(promoted_at - killed_at, 2)
        back = [at for at, degraded in changes if not degraded and at >= promoted_at]
        if back:
            result.live_after_promotion_s = round(back[0] - promoted_at, 2)
        elif not any(degraded for _, degraded in changes):
            result.live_after_promotion_s = 0.0  # never left shared state
    if changes and changes[-1][1]:
        result.notes.append("still degraded at the end")


async def sentinel(seconds: float, *, hung: bool) -> Result:
    result = Result("sentinel, first sentinel hung" if hung else "sentinel")
    with RedisSentinelSetup(master_name=MASTER, down_after_ms=1000) as setup:
        if hung:
            setup.sentinel_servers[0].pause()
        names = ",".join(f"{h}:{p}" for h, p in setup.sentinels)
        old = setup.discover_primary()
        primary = setup.primary
        assert primary is not None

        def promoted() -> bool:
            now = setup.discover_primary()
            return now is not None and now != old

        try:
            await drive(
                result,
                f"redis+sentinel://{names}/{MASTER}/0",
                kill=primary.kill,
                promoted=promoted,
                seconds=seconds,
            )
        finally:
            if hung:
                setup.sentinel_servers[0].resume()
    return result


async def cluster(seconds: float) -> Result:
    result = Result("cluster, a primary killed")
    with RedisCluster(primaries=3, replicas_per_primary=1) as servers:
        url = "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in servers.startup_nodes)
        probe = make_route()
        slot = key_slot(route_keys("x", probe.name)[0].encode())

        def owner() -> int | None:
            for host, port in servers.startup_nodes:
                try:
                    client = redis.Redis(host=host, port=port, socket_timeout=0.3)
                    slots = client.execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
                    for start, end, node, *_ in slots:
                        if start <= slot <= end:
                            return int(node[1])
                except redis.RedisError:
                    continue
            return None

        victim_port = owner()
        victim = next(n for n in servers.nodes if n.port == victim_port)

        def promoted() -> bool:
            now = owner()
            return now is not None and now != victim_port

        await drive(result, url, kill=victim.kill, promoted=promoted, seconds=seconds)
        result.notes.append(f"killed the primary on port {victim_port}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter scenarios")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    seconds = 8.0 if args.quick else 15.0
    results = [
        asyncio.run(sentinel(seconds, hung=False)),
        asyncio.run(sentinel(seconds, hung=True)),
        # A cluster promotes after cluster-node-timeout plus an election: give it longer.
        asyncio.run(cluster(seconds + 10.0)),
    ]
    if args.json:
        print(json.dumps([asdict(r) for r in results]))
        return 0
    print(
        f"{'scenario':32} {'promoted':>9} {'live after':>11} {'spells':>7} {'local':>6} "
        f"{'unanswered':>11}"
    )
    for r in results:
        promoted = "-" if r.promoted_after_kill_s is None else f"{r.promoted_after_kill_s:.2f}s"
        live = "-" if r.live_after_promotion_s is None else f"{r.live_after_promotion_s:.2f}s"
        print(
            f"{r.scenario:32} {promoted:>9} {live:>11} {r.degraded_spells:>7} "
            f"{r.routes_local:>4}/{ROUTES} {r.unanswered:>11}"
        )
        for note in r.notes[:3]:
            print(f"    {note}")
    print("\nGoals: live within 3 s of the promotion (any one sentinel hung), one degraded spell")
    print("per event, only the killed node's routes local, 0 unanswered decisions.")
    for r in results:
        ok = (
            r.live_after_promotion_s is not None
            and r.live_after_promotion_s <= 3.0
            and r.degraded_spells <= 1
            and r.unanswered == 0
        )
        print(f"  {'PASS' if ok else 'MISS'}  {r.scenario}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
