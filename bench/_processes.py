"""Child processes for the benchmarks: started with their output in files, always stopped."""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import IO

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the tests' Redis launcher is the benches' too
    sys.path.insert(0, str(REPO))
from tests.support.redis_servers import RedisServer  # noqa: E402


class Processes:
    """Children started here, each with its stdout/stderr in a file of `workdir`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._children: dict[str, tuple[subprocess.Popen[bytes], list[IO[bytes]]]] = {}
        self._redis: dict[str, RedisServer] = {}

    def redis(self, name: str = "redis") -> RedisServer:
        """A private redis-server from the tests' launcher (tests/support/redis_servers.py):
        one way to start Redis for tests and benches alike. Stopped by `stop_all`."""
        server = self._redis[name] = RedisServer(name=f"bench-{name}")
        return server

    def kill(self, name: str) -> None:
        if name in self._redis:
            self._redis[name].kill()
            return
        proc, _ = self._children[name]
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> int:
        """`cwd`: where it runs; `python -m` puts that directory first on sys.path, ahead of
        PYTHONPATH, so it decides which checkout a `-m edgeroute.cli` imports."""
        out = (self.workdir / f"{name}.out").open("wb")
        err = (self.workdir / f"{name}.err").open("wb")
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        except BaseException:
            out.close()
            err.close()
            raise
        self._children[name] = (proc, [out, err])
        return proc.pid

    def wait_for(self, name: str, pattern: str, timeout_s: float = 30.0) -> re.Match[str]:
        """Wait until the child's stdout matches `pattern`; fail with its stderr if it dies."""
        proc, _ = self._children[name]
        path = self.workdir / f"{name}.out"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = re.search(pattern, path.read_text(errors="replace"))
            if match:
                return match
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        tail = (self.workdir / f"{name}.err").read_text(errors="replace")[-2000:]
        state = f"exited with {proc.returncode}" if proc.poll() is not None else "not ready"
        raise RuntimeError(f"{name} {state} after {timeout_s:.0f} s; stderr:\n{tail}")

    def alive(self, name: str) -> bool:
        return self._children[name][0].poll() is None

    def discard(self, name: str) -> None:
        """Kill a child and forget it (its name can be used again)."""
        self.kill(name)
        _, files = self._children.pop(name)
        for file in files:
            file.close()

    def stop_all(self) -> None:
        """SIGTERM everything (newest first), then SIGKILL whatever is still there after 5 s."""
        children = list(reversed(self._children.values()))
        self._children = {}
        servers, self._redis = list(self._redis.values()), {}
        for server in servers:
            server.stop()
        for proc, _ in children:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        deadline = time.monotonic() + 5.0
        for proc, files in children:
            try:
                proc.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
            for file in files:
                file.close()


def _raise_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def managed_processes(prefix: str) -> Iterator[Processes]:
    """Children stopped (and their logs deleted) however the run ends, SIGTERM included."""
    workdir = Path(tempfile.mkdtemp(prefix=f"edgeroute-bench-{prefix}-"))
    processes = Processes(workdir)
    # SIGTERM/SIGHUP unwind like Ctrl-C does, so the `finally` below always runs.
    previous = {
        sig: signal.signal(sig, _raise_on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)
    }
    try:
        yield processes
    finally:
        processes.stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(workdir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


__all__ = ["REPO", "Processes", "RedisServer", "free_port", "managed_processes"]
