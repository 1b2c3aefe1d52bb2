"""Config reload without restart: SIGHUP on a real process under continuous openai-SDK load,
the file watcher following a Kubernetes-style ConfigMap symlink swap, and refusals."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from openai.types.chat import ChatCompletionMessageParam

from edgeroute.mock_provider import MockSettings
from edgeroute.reload import file_hash
from edgeroute.server import LIVE, RELOADER, create_app
from tests.support.gateway import (
    GatewayProcess,
    Mock,
    SdkLoad,
    gateway_config,
    get_json,
    loads,
    mock_upstreams,
    running_app,
    wait_until,
)
from tests.support.redis_servers import free_port

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def write_atomically(path: Path, document: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(document) if not isinstance(document, str) else document)
    os.replace(tmp, path)


async def metric(url: str, name: str, labels: str = "") -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        text = await response.text()
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+-]+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def models(url: str) -> set[str]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/v1/models") as response:
        return {m["id"] for m in (await response.json())["data"]}


def two_targets(mocks: dict[str, Mock]) -> dict[str, Any]:
    return gateway_config(
        mocks,
        [
            {
                "model": "chat",
                "strategy": "round_robin",
                "targets": [{"provider": "a", "model": "m-a"}, {"provider": "b", "model": "m-b"}],
            }
        ],
    )


async def test_sighup_reloads_under_load_without_a_failed_request(tmp_path: Path) -> None:
    async with mock_upstreams(a=MockSettings(), b=MockSettings()) as mocks:
        document = two_targets(mocks)
        gateway = GatewayProcess(
            document, tmp_path, port=free_port(), env={"EDGEROUTE_CONFIG_WATCH_S": "0"}
        )
        try:
            await asyncio.to_thread(gateway.wait_ready)
            url = gateway.url
            load = SdkLoad(
                lambda: openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            )

            async def reload_to(document: Any, result: str, count: float) -> None:
                write_atomically(gateway.config_path, document)
                gateway.process.send_signal(signal.SIGHUP)
                labels = f'result="{result}"'
                await wait_until(
                    lambda: _at_least(url, "edgeroute_config_reloads_total", labels, count),
                    timeout=10,
                )

            await load.more(20)

            # 1. A route is added.
            added = {**document, "routes": [*document["routes"], _route("chat2", "a")]}
            await reload_to(added, "success", 1)
            assert await models(url) == {"chat", "chat2"}
            hash_added = file_hash(gateway.config_path)
            assert await metric(url, "edgeroute_config_info", f'hash="{hash_added}"') == 1

            # 2. A target is removed: b gets no new requests once the reload is done.
            removed = {**added, "routes": [_route("chat", "a"), _route("chat2", "a")]}
            await reload_to(removed, "success", 2)
            hash_removed = file_hash(gateway.config_path)
            served_by_b = await mocks["b"].requests()
            await load.more(20)

            # 3. An invalid config is refused: the old one keeps serving.
            invalid = {**removed, "routes": [_route("chat", "nowhere")]}
            await reload_to(invalid, "failure", 1)
            assert await models(url) == {"chat", "chat2"}
            await load.more(20)

            await load.stop()
            assert await mocks["b"].requests() == served_by_b
        finally:
            await asyncio.to_thread(gateway.terminate)

    assert load.failed == 0, load.errors[:5]
    assert load.ok > 60
    log = gateway.log()
    refused = [line for line in log.splitlines() if "config reload refused" in line]
    assert len(refused) == 1, log[-2000:]
    assert "$.routes[0].targets[0].provider" in refused[0]
    assert refused[0].endswith(f"still serving config {hash_removed}")
    assert "sk-" not in log


async def _at_least(url: str, name: str, labels: str, count: float) -> bool:
    return await metric(url, name, labels) >= count


def _route(name: str, provider: str) -> dict[str, Any]:
    return {"model": name, "targets": [{"provider": provider, "model": f"m-{provider}"}]}


async def test_configmap_symlink_swap_reloads_and_unchanged_targets_keep_their_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEROUTE_CONFIG_WATCH_S", "0.05")
    async with mock_upstreams(bad=MockSettings(error_rate=1.0), good=MockSettings()) as mocks:
        chat = {
            "model": "chat",
            "strategy": "cost",
            "targets": [
                {"provider": "bad", "model": "m", "input_cost_per_mtok": 0.1},
                {"provider": "good", "model": "m", "input_cost_per_mtok": 1.0},
            ],
        }
        first = gateway_config(mocks, [chat])
        # The kubelet's layout: config.yaml -> ..data/config.yaml, ..data -> ..<version>.
        mount = tmp_path / "configmap"
        (mount / "..v1").mkdir(parents=True)
        (mount / "..v1" / "config.yaml").write_text(yaml.safe_dump(first))
        (mount / "..data").symlink_to("..v1")
        (mount / "config.yaml").symlink_to("..data/config.yaml")

        app = create_app(loads(first), config_path=mount / "config.yaml")
        async with running_app(app) as url, aiohttp.ClientSession() as session:
            body = {"model": "chat", "messages": MESSAGES}
            async with session.post(f"{url}/v1/chat/completions", json=body) as response:
                assert response.status == 200
                assert response.headers["x-edgeroute-attempts"] == "2"
            before = app[LIVE].current
            bad_id = before.router.routes["chat"].targets[0].id

            second = gateway_config(mocks, [chat, _route("chat2", "good")])
            (mount / "..v2").mkdir()
            (mount / "..v2" / "config.yaml").write_text(yaml.safe_dump(second))
            (mount / "..data_tmp").symlink_to("..v2")
            os.replace(mount / "..data_tmp", mount / "..data")  # atomic, as the kubelet does

            await wait_until(lambda: "chat2" in app[LIVE].current.router.routes, timeout=10)
            after = app[LIVE].current
            assert after.router is not before.router
            assert after.router.state is before.router.state  # the same state backend
            assert after.adapters["good"] is before.adapters["good"]  # unchanged provider
            snapshot = await after.router.snapshot("chat")
            bad = next(t for t in snapshot.targets if t.target_id == bad_id)
            assert bad.consecutive_failures == 1  # kept across the reload
            assert await metric(url, "edgeroute_config_info", f'hash="{after.hash}"') == 1
            assert await metric(url, "edgeroute_config_info", f'hash="{before.hash}"') == 0


async def test_changes_only_a_restart_can_apply_are_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edgeroute.reload")
    async with mock_upstreams(a=MockSettings(), b=MockSettings()) as mocks:
        document = two_targets(mocks)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(document))
        app = create_app(loads(document), config_path=path)
        async with running_app(app):
            reloader = app[RELOADER]
            assert await reloader.reload("test")  # the same file: unchanged
            write_atomically(path, {**document, "state": {"key_prefix": "elsewhere"}})
            assert not await reloader.reload("test")
            write_atomically(path, {**document, "server": {"header_timeout_s": 3}})
            assert not await reloader.reload("test")
            write_atomically(path, "routes: [unclosed")
            assert not await reloader.reload("test")
            write_atomically(path, {**document, "server": {"max_attempts": 2}})
            assert await reloader.reload("test")  # the failover policy reloads
            assert app[LIVE].current.router.policy.max_attempts == 2
            assert app[LIVE].current.config.state.key_prefix == "edgeroute"
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 3
    assert "$.state: changed, and only a restart can apply it" in refused[0]
    assert "$.server.header_timeout_s: changed" in refused[1]
    assert "invalid YAML" in refused[2]


async def test_a_reload_adds_a_client_and_changes_client_and_target_rpm_on_redis(
    tmp_path: Path, redis_url: str
) -> None:
    """server.clients and targets[].rpm come from the live config at each request's start:
    a reload that adds a client, or changes a client's or a target's rpm, applies at once,
    with what was already counted in Redis kept."""

    def document(team_rpm: int, target_rpm: int, new_rpm: int = 0) -> dict[str, Any]:
        clients = [{"name": "team", "key": "sk-team", "rpm": team_rpm}]
        if new_rpm:
            clients.append({"name": "new", "key": "sk-new", "rpm": new_rpm})
        return gateway_config(
            mocks,
            [{"model": "chat", "targets": [{"provider": "a", "model": "m", "rpm": target_rpm}]}],
            server={"admin_token": "admin", "clients": clients},
            # A generous state timeout: this is about shared counts, never degraded mode.
            state={"redis_url": redis_url, "key_prefix": prefix, "timeout_ms": 3000},
        )

    prefix = f"reload-{uuid.uuid4().hex[:8]}"
    async with mock_upstreams(a=MockSettings()) as mocks:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(document(2, 10)))
        app = create_app(loads(document(2, 10)), config_path=path)
        async with running_app(app) as url:

            async def chat(key: str) -> int | str:
                """200, or the refusal: `client <its rpm>`, or `target` (its rpm is spent)."""
                async with openai.AsyncOpenAI(
                    base_url=f"{url}/v1", api_key=key, max_retries=0
                ) as client:
                    try:
                        await client.chat.completions.create(model="chat", messages=MESSAGES)
                    except openai.RateLimitError as exc:
                        limit = exc.response.headers.get("x-ratelimit-limit-requests")
                        return f"client {limit}" if limit else "target"
                    except openai.AuthenticationError:
                        return 401
                return 200

            async def reload_to(changed: dict[str, Any]) -> None:
                write_atomically(path, changed)
                assert await app[RELOADER].reload("test")

            assert [await chat("sk-team") for _ in range(3)] == [200, 200, "client 2"]
            assert await chat("sk-new") == 401
            # The target has counted 3 (a client's refusal keeps the decide's count: it ran
            # alongside, in the same round trip).
            await reload_to(document(3, 4, new_rpm=1))
            assert await chat("sk-team") == 200  # its 3rd this minute: rpm 3 now
            assert await chat("sk-new") == "target"  # a client now; the target's 4 are spent
            await reload_to(document(3, 10, new_rpm=2))
            assert [await chat("sk-new") for _ in range(2)] == [200, "client 2"]
            assert await chat("sk-team") == "client 3"
            status, listed = await get_json(
                f"{url}/admin/clients", headers={"Authorization": "Bearer admin"}
            )
            assert status == 200
            used = {c["name"]: c["requests"] for c in listed["clients"]}
            assert used == {
                "team": {"limit": 3, "used": 3, "remaining": 0},
                "new": {"limit": 2, "used": 2, "remaining": 0},
            }
