"""Throw-away real Redis servers for tests: standalone, cluster and sentinel.

Every server is a ``redis-server`` (or ``valkey-server``) child process bound to 127.0.0.1 on a
free port, with its own temporary directory holding its data, generated config and log file
(stdout and stderr of the process). Nothing is persisted (``--save "" --appendonly no``).

Cleanup is layered so that a crashing test run never leaves servers behind:

* ``stop()`` / the context managers terminate the process and delete the temporary directory;
* an ``atexit`` hook kills whatever is still running when the interpreter exits;
* on Linux, children spawned from the main thread also get ``PR_SET_PDEATHSIG`` (SIGKILL), so
  they die even if the test process itself is killed with SIGKILL/SIGTERM.

The readiness checks talk RESP directly over a socket (stdlib only), so these helpers do not
depend on the redis-py version under test.

Example::

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        client.ping()
        server.kill()      # connections now fail
        server.restart()   # same port, empty data set
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

__all__ = [
    "HOST",
    "RedisCluster",
    "RedisSentinelSetup",
    "RedisServer",
    "RedisServerError",
    "SentinelServer",
    "find_redis_cli_binary",
    "find_redis_server_binary",
    "free_port",
]

HOST = "127.0.0.1"
DEFAULT_STARTUP_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
LOG_NAME = "server.log"
_CLUSTER_BUS_OFFSET = 10000  # Redis < 7 has no cluster-port option: bus port = port + 10000
_MAX_PORT = 65535


class RedisServerError(RuntimeError):
    """A test Redis server could not be started, configured or reached."""


class _PortInUseError(RedisServerError):
    pass


class _RespError(Exception):
    """An error reply (``-ERR ...``) from the server."""


# --------------------------------------------------------------------------------------------
# Ports and binaries
# --------------------------------------------------------------------------------------------

_issued_ports: set[int] = set()
_issued_lock = threading.Lock()


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (and not handed out before by us)."""
    with _issued_lock:
        for _ in range(200):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((HOST, 0))
                port = int(sock.getsockname()[1])
            if port not in _issued_ports:
                _issued_ports.add(port)
                return port
    raise RedisServerError("could not find a free TCP port on 127.0.0.1")


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free as well."""
    for _ in range(200):
        port = free_port()
        bus = port + _CLUSTER_BUS_OFFSET
        if bus <= _MAX_PORT and _port_is_free(bus):
            return port
    raise RedisServerError("could not find a free port pair (port, port+10000) for a cluster node")


def find_redis_server_binary() -> str | None:
    """Path of ``redis-server`` (or else ``valkey-server``) on PATH, or None."""
    for name in ("redis-server", "valkey-server"):
        path = shutil.which(name)
        if path:
            return path
    return None


def find_redis_cli_binary(server_binary: str | None = None) -> str | None:
    """Path of ``redis-cli``/``valkey-cli``, preferring the one next to ``server_binary``."""
    names = ["redis-cli", "valkey-cli"]
    if server_binary and Path(server_binary).name.startswith("valkey"):
        names.reverse()
    if server_binary:
        for name in names:
            sibling = Path(server_binary).with_name(name)
            if sibling.is_file() and os.access(sibling, os.X_OK):
                return str(sibling)
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


# --------------------------------------------------------------------------------------------
# Minimal RESP2 client (readiness checks only)
# --------------------------------------------------------------------------------------------

RespValue = str | int | None | list["RespValue"]


class _RespConnection:
    def __init__(self, port: int, *, password: str | None = None, timeout: float = 1.0) -> None:
        self._sock = socket.create_connection((HOST, port), timeout=timeout)
        self._file = self._sock.makefile("rb")
        try:
            if password is not None:
                self.call("AUTH", password)
        except BaseException:
            self.close()
            raise

    def call(self, *args: str) -> RespValue:
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg.encode()
            parts += [b"$%d\r\n" % len(data), data, b"\r\n"]
        self._sock.sendall(b"".join(parts))
        return self._read()

    def _read(self) -> RespValue:
        line = self._file.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("connection closed by server")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise _RespError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            return self._file.read(size + 2)[:-2].decode(errors="replace")
        if kind == b"*":
            size = int(rest)
            if size < 0:
                return None
            return [self._read() for _ in range(size)]
        raise ConnectionError(f"unexpected RESP reply: {line!r}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            self._sock.close()


def _call(port: int, *args: str, password: str | None = None, timeout: float = 1.0) -> RespValue:
    conn = _RespConnection(port, password=password, timeout=timeout)
    try:
        return conn.call(*args)
    finally:
        conn.close()


def _parse_info(text: RespValue) -> dict[str, str]:
    info: dict[str, str] = {}
    for line in str(text).splitlines():
        if line and not line.startswith("#") and ":" in line:
            key, _, value = line.partition(":")
            info[key] = value.strip()
    return info


def _pairs(reply: RespValue) -> dict[str, str]:
    items = reply if isinstance(reply, list) else []
    return {str(items[i]): str(items[i + 1]) for i in range(0, len(items) - 1, 2)}


# --------------------------------------------------------------------------------------------
# Process helpers
# --------------------------------------------------------------------------------------------


def _tail(path: Path, lines: int = 30, offset: int = 0) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            start = max(offset, size - 64 * 1024)
            fh.seek(start)
            data = fh.read()
    except OSError as exc:
        return f"<log unavailable: {exc}>"
    text = data.decode(errors="replace").rstrip("\n")
    return "\n".join(text.splitlines()[-lines:]) or "<empty log>"


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


_PR_SET_PDEATHSIG = 1


def _death_signal_preexec() -> Callable[[], None] | None:
    """preexec_fn making the child die with us (Linux, main thread only).

    PDEATHSIG fires when the *thread* that forked the child exits, so it is only used from the
    main thread, whose exit is the process exit.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # parent already gone before prctl took effect
            os._exit(1)

    return preexec


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]


def _password_from_args(args: Sequence[str]) -> str | None:
    password = None
    for i, arg in enumerate(args):
        if arg == "--requirepass" and i + 1 < len(args):
            password = args[i + 1]
    return password


_live_servers: set[RedisServer] = set()
_live_lock = threading.Lock()


def _kill_leftovers() -> None:
    with _live_lock:
        leftovers = list(_live_servers)
    for server in leftovers:
        with contextlib.suppress(Exception):
            server._emergency_stop()


atexit.register(_kill_leftovers)


def _stop_all(servers: Iterable[RedisServer | None]) -> None:
    """Stop several servers concurrently: SIGTERM all first, then wait for each."""
    present = [s for s in servers if s is not None]
    for server in present:
        with contextlib.suppress(Exception):
            server._send_terminate()
    errors: list[BaseException] = []
    for server in present:
        try:
            server.stop()
        except Exception as exc:  # keep stopping the rest
            errors.append(exc)
    if errors:
        raise errors[0]


def _wait_until(
    condition: Callable[[], str | None], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll ``condition`` (returns None when satisfied, else a description of what is missing)."""
    deadline = time.monotonic() + timeout
    last = "not checked"
    while True:
        try:
            missing = condition()
        except (OSError, _RespError) as exc:
            missing = f"{type(exc).__name__}: {exc}"
        if missing is None:
            return
        last = missing
        if time.monotonic() >= deadline:
            raise RedisServerError(f"timed out after {timeout:.1f}s waiting for {what}: {last}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------------
# Standalone server
# --------------------------------------------------------------------------------------------


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1, on a free port, in its own temp dir.

    The server is started by the constructor. ``extra_args`` are appended to the command line
    (e.g. ``["--requirepass", "s3cret"]``; the password is then used by the readiness check and
    included in :attr:`url`).
    """

    _kind = "redis"

    def __init__(
        self,
        extra_args: Sequence[str] = (),
        *,
        port: int | None = None,
        binary: str | None = None,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
        name: str | None = None,
        port_factory: Callable[[], int] = free_port,
    ) -> None:
        found = binary or find_redis_server_binary()
        if found is None:
            raise RedisServerError("no redis-server or valkey-server binary found on PATH")
        self._binary: str = found
        self._extra_args = list(extra_args)
        self._password = _password_from_args(self._extra_args)
        self._fixed_port = port is not None
        self._port_factory = port_factory
        self._port = port if port is not None else port_factory()
        self._startup_timeout = startup_timeout
        self._name = name or self._kind
        self._dir = Path(tempfile.mkdtemp(prefix=f"edgeroute-{self._name}-"))
        self._log_path = self._dir / LOG_NAME
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._term_sent = False
        self._stopped = False
        with _live_lock:
            _live_servers.add(self)
        try:
            self.start()
        except BaseException:
            self._emergency_stop()
            raise

    # -- properties ---------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return (HOST, self._port)

    @property
    def password(self) -> str | None:
        return self._password

    @property
    def url(self) -> str:
        auth = f":{quote(self._password, safe='')}@" if self._password else ""
        return f"redis://{auth}{HOST}:{self._port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def workdir(self) -> Path:
        return self._dir

    @property
    def log_path(self) -> Path:
        return self._log_path

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def paused(self) -> bool:
        return self._paused and self.running

    def log_tail(self, lines: int = 30) -> str:
        return _tail(self._log_path, lines)

    def __repr__(self) -> str:
        state = "paused" if self.paused else "running" if self.running else "down"
        return f"<{type(self).__name__} {self._name} {HOST}:{self._port} pid={self.pid} {state}>"

    # -- lifecycle ----------------------------------------------------------------------------

    def _command(self) -> list[str]:
        return [
            self._binary,
            "--port", str(self._port),
            "--bind", HOST,
            "--dir", str(self._dir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", "",
            # Replicas sync immediately instead of waiting for more replicas (default 5 s).
            "--repl-diskless-sync-delay", "0",
            *self._extra_args,
        ]  # fmt: skip

    def _prepare(self) -> None:
        """Hook for subclasses: write config files before each (re)start."""

    def start(self) -> None:
        """Start the process (the constructor does this; use after kill()/restart internals)."""
        if self._stopped:
            raise RedisServerError(f"{self!r} was stopped; create a new server instead")
        if self.running:
            raise RedisServerError(f"{self!r} is already running")
        attempts = 1 if self._fixed_port else 5
        for attempt in range(attempts):
            try:
                self._spawn_and_wait()
                return
            except _PortInUseError:
                if attempt == attempts - 1:
                    raise
                self._port = self._port_factory()

    def _spawn_and_wait(self) -> None:
        self._prepare()
        command = self._command()
        with self._log_path.open("ab") as log:
            offset = log.tell()
            log.write(f"=== edgeroute test harness: {' '.join(command)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                command,
                cwd=self._dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_death_signal_preexec(),
            )
        self._paused = False
        self._term_sent = False
        deadline = time.monotonic() + self._startup_timeout
        last_error = "no answer yet"
        while True:
            code = self._proc.poll()
            if code is not None:
                tail = _tail(self._log_path, 30, offset)
                message = (
                    f"{self._kind} server on port {self._port} exited with code {code} during "
                    f"startup\ncommand: {' '.join(command)}\nlog tail ({self._log_path}):\n"
                    f"{_indent(tail)}"
                )
                self._proc = None
                if "Address already in use" in tail:
                    raise _PortInUseError(message)
                raise RedisServerError(message)
            try:
                if self._is_ready():
                    return
            except (OSError, _RespError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                tail = _tail(self._log_path, 30, offset)
                self._kill_process()
                raise RedisServerError(
                    f"{self._kind} server on port {self._port} did not answer PING within "
                    f"{self._startup_timeout:.1f}s (last error: {last_error})\n"
                    f"command: {' '.join(command)}\nlog tail ({self._log_path}):\n{_indent(tail)}"
                )
            time.sleep(0.02)

    def _is_ready(self) -> bool:
        assert self._proc is not None
        try:
            reply = _call(self._port, "INFO", "server", password=self._password, timeout=0.5)
        except _RespError as exc:
            if str(exc).startswith("LOADING"):
                return False
            if str(exc).startswith(("NOAUTH", "WRONGPASS")):
                # Answering with an auth error means it is up; we cannot verify the pid.
                return True
            raise
        # Make sure we talk to *our* process, not something else that grabbed the port.
        return _parse_info(reply).get("process_id") == str(self._proc.pid)

    def _send_terminate(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None or self._term_sent:
            return
        self._term_sent = True
        if self._paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            self._paused = False
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()

    def _terminate_process(self) -> None:
        """SIGTERM, wait, SIGKILL fallback. Keeps the temp dir."""
        proc = self._proc
        if proc is None:
            return
        self._send_terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)
        self._proc = None
        self._paused = False

    def _kill_process(self) -> None:
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_TIMEOUT)
        self._proc = None
        self._paused = False

    def _forget(self) -> None:
        self._stopped = True
        shutil.rmtree(self._dir, ignore_errors=True)
        with _live_lock:
            _live_servers.discard(self)

    def _emergency_stop(self) -> None:
        self._kill_process()
        self._forget()

    def stop(self) -> None:
        """Terminate gracefully (SIGTERM, then SIGKILL after a timeout) and delete the temp dir.

        Idempotent; the server cannot be restarted afterwards.
        """
        try:
            self._terminate_process()
        finally:
            self._forget()

    def kill(self) -> None:
        """SIGKILL the process (simulates a crash). The handle stays usable for restart()."""
        if self._proc is None:
            return
        self._kill_process()

    def pause(self) -> None:
        """SIGSTOP the process: connections are accepted by the kernel but never answered."""
        proc = self._require_running()
        os.kill(proc.pid, signal.SIGSTOP)
        self._paused = True
        self._await_proc_state(proc.pid, stopped=True)

    def resume(self) -> None:
        """SIGCONT a paused process."""
        proc = self._require_running()
        os.kill(proc.pid, signal.SIGCONT)
        self._paused = False
        self._await_proc_state(proc.pid, stopped=False)

    def restart(self) -> None:
        """Stop (if running) and start again on the same port with an empty data set."""
        if self._stopped:
            raise RedisServerError(f"{self!r} was stopped; create a new server instead")
        self._terminate_process()
        for entry in self._dir.iterdir():
            if entry.name == LOG_NAME:
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        fixed = self._fixed_port
        self._fixed_port = True
        try:
            self.start()
        finally:
            self._fixed_port = fixed

    def _require_running(self) -> subprocess.Popen[bytes]:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise RedisServerError(f"{self!r} is not running")
        return proc

    @staticmethod
    def _await_proc_state(pid: int, *, stopped: bool) -> None:
        if not sys.platform.startswith("linux"):
            return
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            state = _proc_state(pid)
            if state is None or (state in ("T", "t")) == stopped:
                return
            time.sleep(0.005)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Cluster
# --------------------------------------------------------------------------------------------


class RedisCluster:
    """A Redis Cluster of ``primaries`` primaries, each with ``replicas_per_primary`` replicas.

    Nodes are :class:`RedisServer` handles (``nodes``); the cluster is created with
    ``redis-cli --cluster create`` and the constructor returns once every node reports
    ``cluster_state:ok``, knows all other nodes, and every replica is in sync.
    """

    def __init__(
        self,
        primaries: int = 3,
        replicas_per_primary: int = 0,
        *,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
        cli_binary: str | None = None,
        node_timeout_ms: int = 5000,
        startup_timeout: float = 30.0,
    ) -> None:
        if primaries < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 primaries")
        if replicas_per_primary < 0:
            raise ValueError("replicas_per_primary must be >= 0")
        self._binary = binary or find_redis_server_binary()
        if self._binary is None:
            raise RedisServerError("no redis-server or valkey-server binary found on PATH")
        self._cli = cli_binary or find_redis_cli_binary(self._binary)
        if self._cli is None:
            raise RedisServerError("no redis-cli or valkey-cli binary found (needed for clusters)")
        self._primaries = primaries
        self._replicas_per_primary = replicas_per_primary
        self._startup_timeout = startup_timeout
        self._nodes: list[RedisServer] = []
        self._password = _password_from_args(extra_args)
        args = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms),
            *extra_args,
        ]  # fmt: skip
        try:
            for i in range(primaries * (1 + replicas_per_primary)):
                self._nodes.append(
                    RedisServer(
                        args,
                        binary=self._binary,
                        name=f"cluster-node{i}",
                        port_factory=_free_cluster_port,
                    )
                )
            self._create()
            _wait_until(self._unready_reason, startup_timeout, "the cluster to become ready")
        except BaseException as exc:
            details = self._node_logs() if isinstance(exc, RedisServerError) else ""
            with contextlib.suppress(Exception):
                self.stop()
            if details:
                raise RedisServerError(f"{exc}\n{details}") from exc
            raise

    @property
    def nodes(self) -> list[RedisServer]:
        return list(self._nodes)

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(HOST, node.port) for node in self._nodes]

    @property
    def url(self) -> str:
        auth = f":{quote(self._password, safe='')}@" if self._password else ""
        return f"redis://{auth}{HOST}:{self._nodes[0].port}"

    @property
    def password(self) -> str | None:
        return self._password

    def _node_logs(self) -> str:
        return "\n".join(
            f"log tail of node {node.port} ({node.log_path}):\n{_indent(node.log_tail(15))}"
            for node in self._nodes
        )

    def _create(self) -> None:
        assert self._cli is not None
        command = [
            self._cli,
            "--cluster", "create",
            *(f"{HOST}:{node.port}" for node in self._nodes),
            "--cluster-replicas", str(self._replicas_per_primary),
            "--cluster-yes",
        ]  # fmt: skip
        if self._password:
            command += ["-a", self._password, "--no-auth-warning"]
        try:
            result = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=self._startup_timeout,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RedisServerError(
                f"`{' '.join(command)}` timed out after {self._startup_timeout:.0f}s"
            ) from exc
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            raise RedisServerError(
                f"`{' '.join(command)}` failed with code {result.returncode}:\n{_indent(output)}"
            )

    def _unready_reason(self) -> str | None:
        total = len(self._nodes)
        for node in self._nodes:
            info = _parse_info(
                _call(node.port, "CLUSTER", "INFO", password=self._password, timeout=0.5)
            )
            if info.get("cluster_state") != "ok":
                return f"node {node.port}: cluster_state={info.get('cluster_state')}"
            if info.get("cluster_known_nodes") != str(total):
                return f"node {node.port}: knows {info.get('cluster_known_nodes')}/{total} nodes"
            repl = _parse_info(
                _call(node.port, "INFO", "replication", password=self._password, timeout=0.5)
            )
            if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                return f"replica {node.port}: master_link_status={repl.get('master_link_status')}"
        return None

    def stop(self) -> None:
        """Stop every node and delete their temp dirs. Idempotent."""
        _stop_all(self._nodes)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Sentinel
# --------------------------------------------------------------------------------------------


class SentinelServer(RedisServer):
    """A ``redis-server --sentinel`` process monitoring one primary (config regenerated on
    every (re)start, so restart() forgets all sentinel state)."""

    _kind = "sentinel"

    def __init__(
        self,
        master_name: str,
        primary_port: int,
        *,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        binary: str | None = None,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
        name: str | None = None,
    ) -> None:
        self._master_name = master_name
        self._primary_port = primary_port
        self._quorum = quorum
        self._down_after_ms = down_after_ms
        self._failover_timeout_ms = failover_timeout_ms
        super().__init__(binary=binary, startup_timeout=startup_timeout, name=name)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self._port}"

    @property
    def config_path(self) -> Path:
        return self._dir / "sentinel.conf"

    def _prepare(self) -> None:
        name = self._master_name
        self.config_path.write_text(
            "\n".join(
                [
                    f"port {self._port}",
                    f"bind {HOST}",
                    "daemonize no",
                    'logfile ""',
                    f'dir "{self._dir}"',
                    f"sentinel monitor {name} {HOST} {self._primary_port} {self._quorum}",
                    f"sentinel down-after-milliseconds {name} {self._down_after_ms}",
                    f"sentinel failover-timeout {name} {self._failover_timeout_ms}",
                    f"sentinel parallel-syncs {name} 1",
                    "",
                ]
            )
        )

    def _command(self) -> list[str]:
        return [self._binary, str(self.config_path), "--sentinel", *self._extra_args]


class RedisSentinelSetup:
    """One primary, one replica and ``sentinel_count`` sentinels monitoring them.

    ``primary`` and ``replica`` are the *original* roles' :class:`RedisServer` handles (after a
    failover the replica is the primary); use :meth:`discover_primary` for the current one.
    The constructor returns once every sentinel sees the primary (not down), the replica
    (connected, link up) and all other sentinels, so a failover can be authorised right away.
    """

    def __init__(
        self,
        master_name: str = "edgeroute-primary",
        *,
        sentinel_count: int = 3,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        binary: str | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self._master_name = master_name
        self._sentinels: list[SentinelServer] = []
        self.primary: RedisServer | None = None
        self.replica: RedisServer | None = None
        try:
            self.primary = RedisServer(binary=binary, name="sentinel-primary")
            self.replica = RedisServer(
                ["--replicaof", HOST, str(self.primary.port)],
                binary=binary,
                name="sentinel-replica",
            )
            _wait_until(self._replica_unsynced, startup_timeout, "the replica to sync")
            for i in range(sentinel_count):
                self._sentinels.append(
                    SentinelServer(
                        master_name,
                        self.primary.port,
                        quorum=quorum,
                        down_after_ms=down_after_ms,
                        failover_timeout_ms=failover_timeout_ms,
                        binary=binary,
                        name=f"sentinel{i}",
                    )
                )
            _wait_until(
                self._sentinels_unready, startup_timeout, "the sentinels to discover everything"
            )
        except BaseException as exc:
            details = self._logs() if isinstance(exc, RedisServerError) else ""
            with contextlib.suppress(Exception):
                self.stop()
            if details:
                raise RedisServerError(f"{exc}\n{details}") from exc
            raise

    @property
    def master_name(self) -> str:
        return self._master_name

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        return [(HOST, s.port) for s in self._sentinels]

    @property
    def sentinel_servers(self) -> list[SentinelServer]:
        return list(self._sentinels)

    def discover_primary(self) -> tuple[str, int] | None:
        """The primary address the first answering sentinel reports, or None."""
        for sentinel in self._sentinels:
            try:
                reply = _call(
                    sentinel.port,
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self._master_name,
                    timeout=0.5,
                )  # fmt: skip
            except (OSError, _RespError):
                continue
            if isinstance(reply, list) and len(reply) == 2:
                return (str(reply[0]), int(str(reply[1])))
        return None

    def _logs(self) -> str:
        servers = [s for s in (self.primary, self.replica, *self._sentinels) if s is not None]
        return "\n".join(
            f"log tail of {s!r} ({s.log_path}):\n{_indent(s.log_tail(15))}" for s in servers
        )

    def _replica_unsynced(self) -> str | None:
        assert self.replica is not None
        repl = _parse_info(_call(self.replica.port, "INFO", "replication", timeout=0.5))
        if repl.get("master_link_status") != "up":
            return f"replica master_link_status={repl.get('master_link_status')}"
        return None

    def _sentinels_unready(self) -> str | None:
        assert self.primary is not None and self.replica is not None
        others = str(len(self._sentinels) - 1)
        for sentinel in self._sentinels:
            port = sentinel.port
            master = _pairs(_call(port, "SENTINEL", "MASTER", self._master_name, timeout=0.5))
            if master.get("flags") != "master":
                return f"sentinel {port}: primary flags={master.get('flags')}"
            if master.get("num-other-sentinels") != others:
                return f"sentinel {port}: knows {master.get('num-other-sentinels')} other sentinels"
            replicas = _call(port, "SENTINEL", "REPLICAS", self._master_name, timeout=0.5)
            entries = [_pairs(r) for r in replicas] if isinstance(replicas, list) else []
            if not any(
                e.get("port") == str(self.replica.port)
                and e.get("flags") == "slave"
                and e.get("master-link-status") == "ok"
                for e in entries
            ):
                return f"sentinel {port}: replica not (yet) healthy in {entries}"
        return None

    def stop(self) -> None:
        """Stop sentinels and data nodes and delete their temp dirs. Idempotent."""
        _stop_all([*self._sentinels, self.replica, self.primary])

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
