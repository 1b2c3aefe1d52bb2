"""Shared pytest fixtures for the edgeroute test suite.

Fixture sections are owned by different parts of the suite; append new sections below and keep
each one clearly delimited.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn, Protocol

import pytest

# Make ``tests.support`` importable regardless of pytest's import mode / rootdir handling.
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tests.support.ci import missing  # noqa: E402
from tests.support.redis_servers import (  # noqa: E402
    RedisCluster,
    RedisSentinelSetup,
    RedisServer,
    RedisServerError,
    find_redis_server_binary,
)

# ============================================================================================
# Real Redis servers (see tests/support/redis_servers.py)
#
#   redis_url      session   URL of a real Redis: $EDGEROUTE_TEST_REDIS_URL, else a
#                            testcontainers Redis (if a Docker engine answers), else a spawned
#                            redis-server. Shared by the whole session: use unique key prefixes.
#   redis_server   function  a private RedisServer handle (kill/pause/restart freely).
#   redis_cluster  session   a RedisCluster with 3 primaries.
#   redis_server_binary      path of redis-server/valkey-server, for tests that build their own
#                            RedisServer / RedisCluster / RedisSentinelSetup.
#
# When no server can be provided the test is skipped locally, but FAILS when $CI is "true":
# CI must never silently skip the real-Redis tests. 127.0.0.1:6379 is never used implicitly.
# ============================================================================================

REDIS_URL_ENV = "EDGEROUTE_TEST_REDIS_URL"
REDIS_CONTAINER_IMAGE = "redis:7-alpine"
_DOCKER_PROBE_TIMEOUT = 3.0


def _redis_unavailable(reason: str) -> NoReturn:
    missing(
        f"a real Redis server ({reason})",
        install=f"install redis-server/valkey-server, provide a Docker engine, or set "
        f"{REDIS_URL_ENV}",
    )


def _docker_socket_candidates() -> list[Path]:
    home = Path.home()
    candidates = [Path("/var/run/docker.sock"), home / ".docker/run/docker.sock"]
    if runtime_dir := os.environ.get("XDG_RUNTIME_DIR"):
        candidates.append(Path(runtime_dir) / "docker.sock")
    candidates += [home / ".colima/default/docker.sock", home / ".rd/docker.sock"]
    return candidates


def _docker_engine_answers() -> tuple[bool, str]:
    """Quick check (a few seconds at most, usually instant) whether a Docker engine answers."""
    if not os.environ.get("DOCKER_HOST") and not any(
        p.exists() for p in _docker_socket_candidates()
    ):
        return False, "no DOCKER_HOST and no docker socket"
    try:
        import docker  # type: ignore[import-untyped]
    except ImportError:
        docker = None
    if docker is not None:
        try:
            client = docker.from_env(timeout=_DOCKER_PROBE_TIMEOUT)
            try:
                client.ping()
            finally:
                client.close()
        except Exception as exc:
            return False, f"docker engine did not answer: {exc}"
        return True, "docker engine answers"
    cli = shutil.which("docker")
    if cli is None:
        return False, "docker SDK and CLI unavailable"
    try:
        result = subprocess.run(
            [cli, "info"], capture_output=True, timeout=_DOCKER_PROBE_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"`docker info` failed: {exc}"
    if result.returncode != 0:
        return False, "`docker info` failed"
    return True, "docker engine answers"


class _Container(Protocol):
    def stop(self) -> object: ...


def _start_redis_container() -> tuple[_Container, str]:
    try:
        from testcontainers.community.redis import RedisContainer
    except ImportError:
        from testcontainers.redis import RedisContainer
    container = RedisContainer(REDIS_CONTAINER_IMAGE)
    container.start()
    try:
        host = container.get_container_host_ip()
        port = container.get_exposed_port(6379)
    except BaseException:
        container.stop()
        raise
    return container, f"redis://{host}:{port}/0"


def _spawn_redis_server() -> RedisServer:
    if find_redis_server_binary() is None:
        _redis_unavailable("no redis-server or valkey-server binary on PATH")
    try:
        return RedisServer()
    except RedisServerError as exc:
        _redis_unavailable(f"could not start redis-server: {exc}")


@pytest.fixture(scope="session")
def redis_server_binary() -> str:
    """Path of redis-server/valkey-server (skip locally / fail under CI when missing)."""
    binary = find_redis_server_binary()
    if binary is None:
        _redis_unavailable("no redis-server or valkey-server binary on PATH")
    return binary


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis server for the whole session (see the section comment)."""
    env_url = os.environ.get(REDIS_URL_ENV, "").strip()
    if env_url:
        yield env_url
        return

    reasons: list[str] = []
    docker_ok, docker_reason = _docker_engine_answers()
    if docker_ok:
        try:
            container, url = _start_redis_container()
        except Exception as exc:  # fall back to a local binary
            reasons.append(f"testcontainers Redis failed: {exc}")
        else:
            try:
                yield url
            finally:
                container.stop()
            return
    else:
        reasons.append(docker_reason)

    if find_redis_server_binary() is None:
        reasons.append("no redis-server or valkey-server binary on PATH")
        _redis_unavailable(f"{REDIS_URL_ENV} unset; " + "; ".join(reasons))
    try:
        server = RedisServer()
    except RedisServerError as exc:
        reasons.append(f"could not start redis-server: {exc}")
        _redis_unavailable(f"{REDIS_URL_ENV} unset; " + "; ".join(reasons))
    with server:
        yield server.url


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private, isolated redis-server for this test only (safe to kill/pause/restart)."""
    with _spawn_redis_server() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A Redis Cluster of 3 primaries shared by the session."""
    if find_redis_server_binary() is None:
        _redis_unavailable("no redis-server or valkey-server binary on PATH")
    try:
        cluster = RedisCluster(primaries=3)
    except RedisServerError as exc:
        _redis_unavailable(f"could not start a Redis cluster: {exc}")
    with cluster:
        yield cluster


# ============================================================================================
# End of the real Redis servers section.
# ============================================================================================


# ============================================================================================
# The state backend table (see tests/support/backends.py)
#
#   fakeredis_url   session   fakeredis over TCP (runs the same Lua through lupa)
#   redis_sentinel  session   a RedisSentinelSetup: primary, replica, three sentinels
# ============================================================================================


@pytest.fixture(scope="session")
def fakeredis_url() -> Iterator[str]:
    import threading

    from fakeredis import TcpFakeServer

    server = TcpFakeServer(("127.0.0.1", 0), server_type="redis")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{server.server_address[1]}/0"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinelSetup]:
    from tests.support.backends import SENTINEL_MASTER

    if find_redis_server_binary() is None:
        _redis_unavailable("no redis-server or valkey-server binary on PATH")
    with RedisSentinelSetup(master_name=SENTINEL_MASTER) as setup:
        yield setup
