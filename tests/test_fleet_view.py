"""The fleet view: replicas' heartbeats in a real Redis, /admin/fleet and `edgeroute fleet`."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from edgeroute.mock_provider import MockSettings
from edgeroute.reload import file_hash
from edgeroute.server import LIVE, create_app
from tests.support.gateway import (
    gateway_config,
    get_json,
    loads,
    mock_upstreams,
    running_app,
    wait_until,
)

ADMIN = {"Authorization": "Bearer fleet-admin"}


def _route(name: str, provider: str) -> dict[str, Any]:
    return {"model": name, "targets": [{"provider": provider, "model": "m"}]}


async def _fleet(url: str) -> dict[str, Any]:
    status, body = await get_json(f"{url}/admin/fleet", headers=ADMIN)
    assert status == 200, body
    assert isinstance(body, dict)
    return body


async def test_two_replicas_with_different_configs_show_as_mismatched(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEROUTE_HEARTBEAT_S", "0.2")
    monkeypatch.setenv("EDGEROUTE_CONFIG_WATCH_S", "0")
    prefix = f"fleet-{secrets.token_hex(4)}"
    async with mock_upstreams(a=MockSettings(), b=MockSettings()) as mocks:
        sections = {
            "state": {"redis_url": redis_url, "key_prefix": prefix},
            "server": {"admin_token": "fleet-admin"},
        }
        one = gateway_config(mocks, [_route("chat", "a")], **sections)
        two = gateway_config(mocks, [_route("chat", "a"), _route("chat2", "b")], **sections)
        paths = [tmp_path / "one.yaml", tmp_path / "two.yaml"]
        for path, document in zip(paths, (one, two), strict=True):
            path.write_text(yaml.safe_dump(document))
        first = create_app(loads(one), config_path=paths[0])
        second = create_app(loads(two), config_path=paths[1])
        async with running_app(first) as url:
            async with running_app(second):
                await wait_until(lambda: _count(url, 2), timeout=10)
                view = await _fleet(url)
                assert view["shared"] is True
                assert view["consistent"] is False
                hashes = {first[LIVE].current.hash, second[LIVE].current.hash}
                assert set(view["config_hashes"]) == hashes and len(hashes) == 2
                # One replica each: no majority, so both are flagged.
                assert [r["config_mismatch"] for r in view["replicas"]] == [True, True]
                assert sum(r["self"] for r in view["replicas"]) == 1
                for replica in view["replicas"]:
                    assert replica["version"] and replica["started_at"] > 0
                    assert replica["shared_state"] == "live"
                await wait_until(lambda: _gauge(url, "edgeroute_fleet_config_hashes", 2))

                # The CLI compares with the file it is given: `two` is the odd one out.
                result = await asyncio.to_thread(
                    subprocess.run,
                    [sys.executable, "-m", "edgeroute.cli", "fleet", "-c", str(paths[0]), "--json"],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert result.returncode == 1, result.stderr
                listed = json.loads(result.stdout)
                assert listed["config_file_hash"] == file_hash(paths[0])
                flagged = {r["config_hash"] for r in listed["replicas"] if r["config_mismatch"]}
                assert flagged == {second[LIVE].current.hash}
            # The second replica left: its heartbeat is gone at once, the fleet agrees.
            await wait_until(lambda: _count(url, 1), timeout=10)
            view = await _fleet(url)
            assert view["consistent"] is True
            assert view["replicas"][0]["config_mismatch"] is False

        table = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "edgeroute.cli", "fleet", "-c", str(paths[0])],
            capture_output=True,
            text=True,
            timeout=60,
        )
    # Both replicas have left; their heartbeats are deleted on shutdown.
    assert table.returncode == 0, table.stderr
    assert "no live replicas" in table.stdout


async def _count(url: str, n: int) -> bool:
    return len((await _fleet(url))["replicas"]) == n


async def _gauge(url: str, name: str, value: float) -> bool:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        text = await response.text()
    found = re.search(rf"^{name} ([0-9.]+)$", text, re.MULTILINE)
    return found is not None and float(found.group(1)) == value


async def test_without_redis_the_fleet_is_this_replica() -> None:
    async with mock_upstreams(a=MockSettings()) as mocks:
        document = gateway_config(
            mocks, [_route("chat", "a")], server={"admin_token": "fleet-admin"}
        )
        async with running_app(create_app(loads(document))) as url:
            view = await _fleet(url)
    assert view["shared"] is False
    assert view["consistent"] is True
    (replica,) = view["replicas"]
    assert replica["self"] is True and replica["shared_state"] == "local"


def test_the_odd_replica_out_is_flagged_against_the_majority() -> None:
    from edgeroute.fleet import Heartbeat, fleet_view

    def beat(replica: str, config_hash: str) -> Heartbeat:
        return Heartbeat(
            replica=replica,
            version="0",
            config_hash=config_hash,
            started_at=1.0,
            shared_state="live",
        )

    replicas = [beat("r1", "aaa"), beat("r2", "aaa"), beat("r3", "bbb")]
    view = fleet_view(replicas, me="r1")
    assert view["reference_hash"] == "aaa"
    assert [r["config_mismatch"] for r in view["replicas"]] == [False, False, True]
    assert view["consistent"] is False
    # Against a given file (the CLI), the majority does not matter.
    against_file = fleet_view(replicas, me=None, expected="bbb")
    assert [r["config_mismatch"] for r in against_file["replicas"]] == [True, True, False]
    assert fleet_view([], me=None)["consistent"] is True


async def test_a_heartbeat_whose_redis_call_swallows_the_cancel_still_stops() -> None:
    """Shutdown cancels the heartbeat loop. A Redis client that swallows that cancellation
    inside a call (redis-py's asyncio connections have done so) must not leave the loop
    beating forever and the gateway's cleanup waiting on it: an in-process gateway on Redis
    used to hang in teardown now and then."""
    import contextlib
    import types

    from edgeroute import fleet

    entered = asyncio.Event()
    swallowing = [True]

    class Swallowing:
        interval_s = 0.01
        client = types.SimpleNamespace(aclose=lambda: asyncio.sleep(0))

        async def beat(self, heartbeat: object) -> None:
            entered.set()
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                if not swallowing[0]:
                    raise

        async def read(self) -> list[Any]:
            return []

        async def leave(self, replica: str) -> None:
            return None

    gauge = types.SimpleNamespace(set=lambda value: None)
    metrics = types.SimpleNamespace(fleet_replicas=gauge, fleet_config_hashes=gauge)
    context = fleet.heartbeat_context(
        Swallowing(),  # type: ignore[arg-type]
        lambda: types.SimpleNamespace(replica="r"),  # type: ignore[arg-type,return-value]
        metrics,  # type: ignore[arg-type]
        asyncio.Event(),
        lambda count: None,
    )
    steps = context(None)  # type: ignore[arg-type]
    await steps.__anext__()
    await entered.wait()

    async def leave() -> None:
        with contextlib.suppress(StopAsyncIteration):
            await steps.__anext__()

    # A hang, not a duration: the cleanup ends at once or never (and cancelling a cleanup
    # stuck in there would be swallowed too, so it runs aside).
    cleanup = asyncio.create_task(leave())
    try:
        done, _ = await asyncio.wait({cleanup}, timeout=30)
        assert cleanup in done, "the heartbeat loop never stopped"
    finally:
        swallowing[0] = False  # a failed run must still let the event loop close
