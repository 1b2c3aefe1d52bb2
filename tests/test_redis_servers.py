"""The real-Redis test helpers (tests/support/redis_servers.py) work against real servers."""

from __future__ import annotations

import time
import uuid

import pytest
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode
from redis.cluster import RedisCluster as ClusterClient
from redis.exceptions import ClusterCrossSlotError, MovedError
from redis.retry import Retry
from redis.sentinel import Sentinel

from tests.support.redis_servers import (
    RedisCluster,
    RedisSentinelSetup,
    RedisServer,
    RedisServerError,
)


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


def _client(server: RedisServer, **kwargs: object) -> redis.Redis:
    options: dict[str, object] = {
        "socket_timeout": 1.0,
        "socket_connect_timeout": 1.0,
        "retry": _no_retry(),
    }
    options.update(kwargs)
    return redis.Redis.from_url(server.url, **options)


# -- standalone ---------------------------------------------------------------------------------


def test_redis_url_fixture_answers(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, socket_timeout=2.0)
    key = f"edgeroute:test:{uuid.uuid4().hex}"
    try:
        assert client.ping() is True
        client.set(key, "v", ex=30)
        assert client.get(key) == b"v"
    finally:
        client.delete(key)
        client.close()


def test_standalone_ping_set_get(redis_server: RedisServer) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    client = _client(redis_server, decode_responses=True)
    assert client.ping() is True
    assert client.set("greeting", "hello") is True
    assert client.get("greeting") == "hello"
    assert client.config_get("save") == {"save": ""}
    assert client.config_get("appendonly") == {"appendonly": "no"}
    client.close()


def test_kill_gives_connection_error_and_restart_is_empty(redis_server: RedisServer) -> None:
    port = redis_server.port
    client = _client(redis_server)
    client.set("survives?", "no")
    old_pid = redis_server.pid

    redis_server.kill()
    assert not redis_server.running
    with pytest.raises(redis.ConnectionError):
        client.ping()

    redis_server.restart()
    assert redis_server.running
    assert redis_server.port == port
    assert redis_server.pid != old_pid
    assert client.ping() is True
    assert client.dbsize() == 0
    assert client.get("survives?") is None
    client.close()


def test_restart_of_running_server_drops_data(redis_server: RedisServer) -> None:
    client = _client(redis_server)
    client.set("k", "v")
    redis_server.restart()
    assert client.dbsize() == 0
    client.close()


def test_pause_times_out_and_resume_recovers(redis_server: RedisServer) -> None:
    client = _client(redis_server, socket_timeout=0.2)
    assert client.ping() is True

    redis_server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        assert time.monotonic() - started < 2.0
    finally:
        redis_server.resume()

    assert client.ping() is True
    client.close()


def test_requirepass_extra_args_and_cleanup(redis_server_binary: str) -> None:
    with RedisServer(["--requirepass", "s3cret/pw"]) as server:
        workdir = server.workdir
        assert server.log_path.exists()
        assert server.url == f"redis://:s3cret%2Fpw@127.0.0.1:{server.port}/0"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port, retry=_no_retry()).ping()
        client = _client(server)
        assert client.ping() is True
        client.close()
    assert not server.running
    assert not workdir.exists()
    server.stop()  # idempotent
    with pytest.raises(RedisServerError):
        server.restart()


def test_startup_failure_reports_log_tail(redis_server_binary: str) -> None:
    with pytest.raises(RedisServerError) as excinfo:
        RedisServer(["--no-such-option", "1"])
    message = str(excinfo.value)
    assert "exited with code" in message
    assert "no-such-option" in message  # from the server's own error output


def test_stop_terminates_a_paused_server(redis_server_binary: str) -> None:
    server = RedisServer()
    server.pause()
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 3.0
    assert not server.running


# -- cluster ------------------------------------------------------------------------------------


def _cluster_client(cluster: RedisCluster) -> ClusterClient:
    return ClusterClient(
        startup_nodes=[ClusterNode(host, port) for host, port in cluster.startup_nodes],
        decode_responses=True,
        socket_timeout=2.0,
    )


def test_cluster_distributes_hash_tags_across_nodes(redis_cluster: RedisCluster) -> None:
    assert redis_cluster.url == f"redis://127.0.0.1:{redis_cluster.startup_nodes[0][1]}"
    assert len(redis_cluster.startup_nodes) == 3
    client = _cluster_client(redis_cluster)
    prefix = uuid.uuid4().hex
    owners: dict[str, int] = {}
    for tag in range(20):
        key = f"{{{prefix}-{tag}}}:value"
        client.set(key, key, ex=60)
        node = client.get_node_from_key(key)
        assert node is not None
        owners[key] = int(node.port)
    assert len(set(owners.values())) >= 2, owners

    # The data really lives on the owning node: a plain client there sees it; others redirect.
    for key, port in owners.items():
        with redis.Redis(port=port, decode_responses=True) as direct:
            assert direct.get(key) == key
        other = next(p for _, p in redis_cluster.startup_nodes if p != port)
        with redis.Redis(port=other) as direct, pytest.raises(MovedError) as moved:
            direct.get(key)
        assert moved.value.port == port
    client.close()


def test_cluster_multi_key_commands_with_one_hash_tag(redis_cluster: RedisCluster) -> None:
    client = _cluster_client(redis_cluster)
    tag = f"{{route-{uuid.uuid4().hex}}}"
    keys = [f"{tag}:breaker", f"{tag}:weights", f"{tag}:epoch"]

    assert client.mset({keys[0]: "closed", keys[1]: "1,2,3"}) is True
    assert client.mget(keys[:2]) == ["closed", "1,2,3"]
    script = "redis.call('SET', KEYS[3], ARGV[1]); return redis.call('MGET', KEYS[1], KEYS[3])"
    assert client.eval(script, 3, *keys, "7") == ["closed", "7"]
    client.delete(*keys)

    # Without a shared hash tag the server itself refuses with CROSSSLOT.
    a, b = f"{{a-{tag}}}:x", f"{{b-{tag}}}:x"
    assert client.keyslot(a) != client.keyslot(b)
    node = client.get_node_from_key(a)
    assert node is not None
    with (
        redis.Redis(port=int(node.port)) as direct,
        pytest.raises(ClusterCrossSlotError),
    ):
        direct.execute_command("MSET", a, "1", b, "2")
    client.close()


@pytest.mark.slow
def test_cluster_with_replicas(redis_server_binary: str) -> None:
    with RedisCluster(primaries=3, replicas_per_primary=1) as cluster:
        assert len(cluster.nodes) == 6
        roles = []
        for node in cluster.nodes:
            with redis.Redis(port=node.port, decode_responses=True) as direct:
                roles.append(direct.info("replication")["role"])
        assert sorted(roles) == ["master"] * 3 + ["slave"] * 3
        client = _cluster_client(cluster)
        client.set("{x}:k", "v")
        assert client.get("{x}:k") == "v"
        client.close()
        nodes = cluster.nodes
    assert not any(node.running or node.workdir.exists() for node in nodes)


# -- sentinel -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_sentinel_promotes_replica_after_primary_is_killed(redis_server_binary: str) -> None:
    with RedisSentinelSetup() as setup:
        assert setup.primary is not None and setup.replica is not None
        assert len(setup.sentinels) == 3
        sentinel = Sentinel(setup.sentinels, socket_timeout=0.5)
        assert sentinel.discover_master(setup.master_name) == ("127.0.0.1", setup.primary.port)

        primary = sentinel.master_for(setup.master_name, socket_timeout=0.5, decode_responses=True)
        assert primary.set("before", "1") is True
        assert primary.wait(1, 2000) == 1  # replicated before the crash

        setup.primary.kill()
        deadline = time.monotonic() + 12.0
        promoted = None
        while time.monotonic() < deadline:
            try:
                promoted = sentinel.discover_master(setup.master_name)
            except redis.sentinel.MasterNotFoundError:
                promoted = None
            if promoted == ("127.0.0.1", setup.replica.port):
                break
            time.sleep(0.2)
        assert promoted == ("127.0.0.1", setup.replica.port), "no failover within 12 s"
        assert setup.discover_primary() == ("127.0.0.1", setup.replica.port)

        # The master_for client follows the failover and can write again (the promoted
        # replica may need a moment to leave read-only mode).
        deadline = time.monotonic() + 5.0
        while True:
            try:
                assert primary.set("after", "2") is True
                break
            except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert primary.get("before") == "1"
        assert primary.get("after") == "2"
        primary.close()
