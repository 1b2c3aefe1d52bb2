"""`edgeroute serve --workers N`: N gateway processes on one port, supervised by this one.

Each worker is a whole gateway (`edgeroute.server.serve`) in its own interpreter, listening
with SO_REUSEPORT, so the kernel spreads connections over them. On Redis state the workers
are simply more replicas: every routing decision is already fleet-consistent. The
supervisor serves nothing itself; it

- holds the port (bound with SO_REUSEPORT, never listening: the kernel hands connections
  only to listening sockets) so a restarted worker can always bind it again, and so port 0
  means one port for every worker;
- hands each worker the parsed config and its hash on its stdin and keeps that pipe open: a
  worker that reads EOF knows the supervisor is gone and drains itself (no orphans after a
  SIGKILL);
- reloads the config for all of them (SIGHUP, and the file watch of edgeroute.reload, run
  here only so N workers never race over one file): it reads and checks the file once,
  refuses a bad one with one log line before any worker sees it, and sends a good one down
  every worker's pipe; each swaps it in between requests. Worker 0 alone counts reloads in
  `edgeroute_config_reloads_total`, so one reload counts once;
- restarts a worker that dies, with a growing delay while workers keep dying young (no
  restart storm), and logs each exit and restart;
- on SIGTERM/SIGINT passes SIGTERM on; every worker drains within `server.shutdown_timeout_s`
  (the same drain as a single process) and whatever outlives that plus a grace is killed;
- owns the private `PROMETHEUS_MULTIPROC_DIR` the workers' metrics live in (see
  edgeroute.metrics): created before the first worker, a dead worker's files marked dead
  (its live gauges vanish, its counters stay), removed at exit.
"""

from __future__ import annotations

import logging
import math
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import msgspec
from prometheus_client import multiprocess

from edgeroute import reload
from edgeroute.config import Config
from edgeroute.metrics import MULTIPROC_DIR_ENV, WORKER_INDEX_ENV

if TYPE_CHECKING:
    from aiohttp import web

    from edgeroute.reload import Reloader

log = logging.getLogger("edgeroute.workers")

READY_FD_ENV = "EDGEROUTE_WORKER_READY_FD"
# A worker that lived this long was healthy: its next restart starts the backoff over.
STABLE_AFTER_S = 10.0
RESTART_DELAY_S = 0.25
MAX_RESTART_DELAY_S = 30.0
START_TIMEOUT_S = 60.0
# After the drain (shutdown_timeout_s), what a worker may take to close its connections,
# flush its records and exit before it is killed.
EXIT_GRACE_S = 3.0
_POLL_S = 0.1
_LENGTH = struct.Struct("!I")
# The worker that counts reloads (and polls breakers: see Metrics.polls_breakers).
_COUNTING_WORKER = 0


class Start(msgspec.Struct, frozen=True):
    """The first message down a worker's pipe: what to serve."""

    config: Config
    hash: str


class Reload(msgspec.Struct, frozen=True):
    """Every later message: a reload the supervisor has checked.

    `config` is the config to serve from now on (None: a refused or unchanged reload, sent
    only to be counted); `count` is the result to count, sent to the counting worker only.
    """

    reason: str
    hash: str
    config: Config | None = None
    count: str | None = None


def _frame(message: Start | Reload) -> bytes:
    body = msgspec.msgpack.encode(message)
    return _LENGTH.pack(len(body)) + body


class WorkersError(Exception):
    """`--workers` cannot be honoured: one line for the user."""


# --- how many -------------------------------------------------------------------------------


def available_cpus(
    cgroup_root: Path = Path("/sys/fs/cgroup"), affinity: set[int] | None = None
) -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup CPU quota.

    A container limited to 1.5 CPUs on a 16-core node gets 1 (whole CPUs the quota covers;
    a worker more than that only adds throttling). cgroup v2 `cpu.max`, then v1's
    `cpu.cfs_quota_us` / `cpu.cfs_period_us`; no limit or unreadable files: no cap.
    """
    if affinity is None:
        try:
            affinity = os.sched_getaffinity(0)
        except AttributeError:  # not on Linux
            affinity = set(range(os.cpu_count() or 1))
    cpus = max(1, len(affinity))
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return cpus


def _cgroup_quota(root: Path) -> float | None:
    try:
        limit, period = (root / "cpu.max").read_text().split()[:2]
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        pass
    try:
        limit_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if limit_us <= 0 or period_us <= 0 else limit_us / period_us


def parse_workers(value: str) -> int | None:
    """`N` (≥ 1) or `auto`; None for `auto`, which the caller resolves once it knows the state."""
    if value.strip().lower() == "auto":
        return None
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise WorkersError(f"--workers: expected a number ≥ 1 or `auto`, got {value!r}")
    return count


def resolve_workers(value: str, config: Config) -> tuple[int, str | None]:
    """How many workers `--workers VALUE` means for this config, and a note to print, if any.

    More than one worker on in-memory state would split the routing state per process
    (each worker its own breakers, windows and cursors): an explicit N > 1 is refused,
    `auto` runs one worker and says why.
    """
    count = parse_workers(value)
    shared = bool(config.state.redis_url)
    if count is None:
        cpus = available_cpus()
        if cpus > 1 and not shared:
            return 1, (
                f"note: --workers auto runs 1 worker, not {cpus}: state is in-memory "
                "(set state.redis_url or EDGEROUTE_REDIS_URL to use every CPU)"
            )
        return cpus, None
    if count > 1 and not shared:
        raise WorkersError(
            f"--workers {count} needs shared state (state.redis_url or EDGEROUTE_REDIS_URL): "
            "with in-memory state each worker would route on its own breakers and counters"
        )
    return count, None


# --- the supervisor -------------------------------------------------------------------------


@dataclass(slots=True)
class _Slot:
    index: int
    process: subprocess.Popen[bytes] | None = None
    ready_fd: int | None = None  # read end of the worker's readiness pipe until it is ready
    started: float = 0.0
    restart_at: float | None = None
    quick_deaths: int = 0
    ready: bool = False
    exits: int = 0  # how many times this slot's worker has exited


class Supervisor:
    def __init__(self, config: Config, workers: int, config_path: str | None = None) -> None:
        self.config = config
        self.workers = workers
        self.path = Path(config_path) if config_path is not None else None
        # Looked at from the start: a change while the workers start up is a change.
        self._watch = reload.FileWatch(self.path) if self.path is not None else None
        self.hash = reload.file_hash(self.path) if self.path else reload.config_hash(config)
        self._payload = b""
        self._slots = [_Slot(i) for i in range(workers)]
        self._stopping = False
        self._reload_asked = False
        # Counts for the counting worker while it is down: it gets them when it is back.
        self._uncounted: list[bytes] = []
        self._metrics_dir = ""
        self._env: dict[str, str] = {}

    # -- entry --

    def run(self) -> int:
        if not hasattr(socket, "SO_REUSEPORT"):
            raise WorkersError("--workers above 1 needs SO_REUSEPORT, which this OS lacks")
        holder, port = self._hold_port()
        # Every worker binds the port the supervisor holds (the config may say 0: any).
        server = msgspec.structs.replace(self.config.server, port=port)
        self.config = msgspec.structs.replace(self.config, server=server)
        self._payload = _frame(Start(self.config, self.hash))
        self._metrics_dir = tempfile.mkdtemp(prefix="edgeroute-metrics-")
        self._env = {**os.environ, MULTIPROC_DIR_ENV: self._metrics_dir}
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hangup)
        try:
            if not self._start_all():
                self._stop_all()
                return 1
            host = self.config.server.host
            state = "redis" if self.config.state.redis_url else "memory"
            print(
                f"edgeroute listening on http://{host}:{port}/v1 (state: {state}) "
                f"with {self.workers} workers",
                flush=True,
            )
            self._supervise()
            return self._stop_all()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            holder.close()
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def _on_hangup(self, signum: int, frame: FrameType | None) -> None:
        self._reload_asked = True  # done by the supervision loop, not inside a handler

    # -- reloads --

    def _reload(self, reason: str) -> None:
        """Check the file once; send a good config to every worker, count the result once."""
        if self.path is None or self._watch is None:
            log.warning("%s: no config file to reload (serving --model)", reason)
            return
        self._watch.mark()
        verdict = reload.check(self.path, self.config, self.hash, reason)
        if verdict.config is not None:
            self.config, self.hash = verdict.config, verdict.hash
            self._payload = _frame(Start(self.config, self.hash))  # for workers started later
            for slot in self._slots:
                counted = slot.index == _COUNTING_WORKER
                message = Reload(
                    reason, self.hash, self.config, count=verdict.result if counted else None
                )
                if not self._send(slot, _frame(message)) and counted:
                    self._uncounted.append(_frame(Reload(reason, self.hash, count="success")))
        else:
            counted_only = _frame(Reload(reason, self.hash, count=verdict.result))
            if not self._send(self._slots[_COUNTING_WORKER], counted_only):
                self._uncounted.append(counted_only)
        verdict.log()

    def _send(self, slot: _Slot, frame: bytes) -> bool:
        """Down a running worker's pipe; False when there is none (it restarts with the
        latest config anyway)."""
        process = slot.process
        if process is None or process.stdin is None or process.poll() is not None:
            return False
        try:
            process.stdin.write(frame)
            process.stdin.flush()
        except (BrokenPipeError, ValueError):
            return False  # it is dying; the supervision loop restarts it
        return True

    def _hold_port(self) -> tuple[socket.socket, int]:
        """Bind (not listen) the port with SO_REUSEPORT; its number when the config says 0."""
        host, port = self.config.server.host, self.config.server.port
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        holder = socket.socket(family, kind, proto)
        try:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            holder.bind(address)
        except OSError:
            holder.close()
            raise
        return holder, int(holder.getsockname()[1])

    # -- workers --

    def _spawn(self, slot: _Slot) -> None:
        read_fd, write_fd = os.pipe()
        env = {**self._env, WORKER_INDEX_ENV: str(slot.index), READY_FD_ENV: str(write_fd)}
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "edgeroute.workers"],
                stdin=subprocess.PIPE,
                env=env,
                pass_fds=(write_fd,),
            )
        finally:
            os.close(write_fd)
        assert process.stdin is not None
        pending = self._uncounted if slot.index == _COUNTING_WORKER else []
        try:
            process.stdin.write(self._payload + b"".join(pending))
            process.stdin.flush()
            pending.clear()
        except BrokenPipeError:
            pass  # it died at once; the supervision loop sees the exit
        # stdin stays open: its EOF is how the worker learns the supervisor is gone.
        slot.process, slot.ready_fd, slot.ready = process, read_fd, False
        slot.started, slot.restart_at = time.monotonic(), None

    def _start_all(self) -> bool:
        """Start every worker and wait until all listen; False if one dies first."""
        for slot in self._slots:
            self._spawn(slot)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(slot.ready for slot in self._slots):
            if self._stopping:
                return False
            if time.monotonic() > deadline:
                log.error("workers did not start within %.0f s", START_TIMEOUT_S)
                return False
            self._wait_ready(_POLL_S)
            for slot in self._slots:
                assert slot.process is not None
                code = slot.process.poll()
                if code is not None and not slot.ready:
                    log.error(
                        "worker %d (pid %d) exited before it was ready (%s)",
                        slot.index,
                        slot.process.pid,
                        _describe(code),
                    )
                    return False
        return True

    def _wait_ready(self, timeout: float) -> None:
        """Sleep up to `timeout`, waking when a starting worker says it listens."""
        fds = {slot.ready_fd: slot for slot in self._slots if slot.ready_fd is not None}
        if not fds:
            time.sleep(timeout)
            return
        readable, _, _ = select.select(list(fds), [], [], timeout)
        for fd in readable:
            slot = fds[fd]
            data = os.read(fd, 64)
            os.close(fd)
            slot.ready_fd = None
            slot.ready = data.startswith(b"ready")
            if slot.ready and slot.exits:
                assert slot.process is not None
                log.warning("worker %d (pid %d) is serving again", slot.index, slot.process.pid)

    def _supervise(self) -> None:
        watch = self._watch
        interval = reload.watch_interval(os.environ) if watch is not None else 0.0
        next_look = time.monotonic() + interval
        while not self._stopping:
            self._wait_ready(_POLL_S)
            now = time.monotonic()
            if self._reload_asked:
                self._reload_asked = False
                self._reload("SIGHUP")
            elif watch is not None and interval > 0 and now >= next_look:
                next_look = now + interval
                if watch.changed():
                    self._reload("file changed")
            for slot in self._slots:
                process = slot.process
                if slot.restart_at is not None:
                    if now >= slot.restart_at:
                        self._spawn(slot)
                        assert slot.process is not None
                        log.warning("worker %d restarted (pid %d)", slot.index, slot.process.pid)
                    continue
                if process is None or (code := process.poll()) is None:
                    continue
                self._reap(slot)
                lived = now - slot.started
                slot.quick_deaths = slot.quick_deaths + 1 if lived < STABLE_AFTER_S else 0
                delay = min(
                    MAX_RESTART_DELAY_S, RESTART_DELAY_S * 2 ** max(0, slot.quick_deaths - 1)
                )
                slot.restart_at = now + delay
                log.warning(
                    "worker %d (pid %d) exited (%s) after %.1f s; restarting in %.2f s",
                    slot.index,
                    process.pid,
                    _describe(code),
                    lived,
                    delay,
                )

    def _reap(self, slot: _Slot) -> None:
        assert slot.process is not None
        slot.exits += 1
        if slot.process.stdin is not None:
            slot.process.stdin.close()
        if slot.ready_fd is not None:
            os.close(slot.ready_fd)
            slot.ready_fd = None
        # Its live gauges (in-flight, degraded, breaker state) leave /metrics with it.
        multiprocess.mark_process_dead(slot.process.pid, self._metrics_dir)  # type: ignore[no-untyped-call]
        slot.process = None

    def _stop_all(self) -> int:
        """SIGTERM every worker, wait for their drain, kill what outlives it; the exit code."""
        running = [slot for slot in self._slots if slot.process is not None]
        if running:
            log.warning(
                "stopping %d workers: each drains for up to %ss",
                len(running),
                self.config.server.shutdown_timeout_s,
            )
        for slot in running:
            assert slot.process is not None
            if slot.process.poll() is None:
                slot.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.server.shutdown_timeout_s + EXIT_GRACE_S
        failed = False
        for slot in running:
            assert slot.process is not None
            try:
                code = slot.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d (pid %d) did not exit: killed", slot.index, slot.process.pid)
                slot.process.kill()
                code = slot.process.wait()
            # Killed by our SIGTERM before it could install its handler: still a clean stop.
            failed |= code not in (0, -signal.SIGTERM)
            self._reap(slot)
        return 1 if failed else 0


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


# --- one worker -----------------------------------------------------------------------------


def _read_start(stdin: int) -> Start:
    def read_exactly(size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = os.read(stdin, size - len(data))
            if not chunk:
                raise SystemExit(1)  # the supervisor is already gone
            data += chunk
        return data

    (size,) = _LENGTH.unpack(read_exactly(_LENGTH.size))
    return msgspec.msgpack.decode(read_exactly(size), type=Start)


class _Frames:
    """Whole messages out of the bytes the pipe gives, however they are split."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(self._buffer)
            end = _LENGTH.size + size
            if len(self._buffer) < end:
                break
            frames.append(self._buffer[_LENGTH.size : end])
            self._buffer = self._buffer[end:]
        return frames


def worker_main() -> int:
    """`python -m edgeroute.workers`, started by the Supervisor only."""
    import asyncio

    from edgeroute.launch import configure_logging, freeze_startup_objects, run
    from edgeroute.server import RELOADER, serve

    stdin = sys.stdin.fileno()
    ready_fd = int(os.environ[READY_FD_ENV])
    index = os.environ.get(WORKER_INDEX_ENV, "?")
    start = _read_start(stdin)
    config = start.config
    configure_logging()

    def ready(url: str) -> None:
        freeze_startup_objects()
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        frames = _Frames()

        def listen_to_supervisor(app: web.Application) -> None:
            reloader = app[RELOADER]

            def on_message() -> None:
                try:
                    data = os.read(stdin, 65536)
                except OSError:
                    data = b""
                if not data:
                    # EOF: the supervisor exited without stopping us. Drain as on SIGTERM
                    # rather than serve on as an orphan nobody will stop.
                    loop.remove_reader(stdin)
                    log.warning("worker %s: supervisor gone, draining", index)
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
                for frame in frames.feed(data):
                    _apply(reloader, msgspec.msgpack.decode(frame, type=Reload), index)

            def on_hangup() -> None:
                log.warning(
                    "worker %s: SIGHUP ignored: send it to the supervisor (pid %d), which "
                    "reloads every worker",
                    index,
                    os.getppid(),
                )

            loop.add_reader(stdin, on_message)
            loop.add_signal_handler(signal.SIGHUP, on_hangup)

        return await serve(
            config, ready=ready, reuse_port=True, digest=start.hash, on_app=listen_to_supervisor
        )

    try:
        return run(main)
    except OSError as exc:
        print(
            f"edgeroute: worker {index}: cannot listen on "
            f"{config.server.host}:{config.server.port}: "
            f"{exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1


def _apply(reloader: Reloader, message: Reload, index: str) -> None:
    """One reload from the supervisor, which has checked it already (and logged it)."""
    result = message.count
    if message.config is not None:
        try:
            reloader.apply(message.config, message.hash)
        except Exception:
            # The supervisor compiled the same routes: only a bug gets here. Keep serving.
            log.exception(
                "worker %s: cannot apply config %s; serving the old one", index, message.hash
            )
            result = "failure" if result is not None else None
    if result is not None:
        reloader.metrics.ops.config_reloads.labels(result).inc()


if __name__ == "__main__":
    code = worker_main()
    # Skip the interpreter's teardown: the loop, Redis connections and access log are closed
    # by now, and its final garbage collection over the whole heap took ~1 s on a busy
    # 2-core machine: time that counts against the drain budget of the supervisor.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
