"""The access log's writer: lines are queued by the event loop and written by a thread.

Writing one line per request to stderr from the loop costs a `logging` record, a lock and a
`write(2)` per request, and a slow reader of the pipe (a log shipper that falls behind)
would stall every request. Here the loop only appends encoded bytes to a bounded queue; a
daemon thread wakes at most every `flush_interval_s`, takes everything queued and writes it
in as few `write(2)` calls as it can. A full queue drops the line and counts it
(`edgeroute_access_log_dropped_total`) instead of growing or blocking.

Each `write(2)` carries whole lines and at most PIPE_BUF bytes (unless one line is longer),
so lines never interleave with other writers of the same pipe: the process's own `logging`
output, or the sibling workers of `edgeroute serve --workers N`.
"""

from __future__ import annotations

import atexit
import os
import select
import threading
from collections import deque
from collections.abc import Callable

# POSIX guarantees that writes of at most PIPE_BUF bytes to a pipe are atomic.
_ATOMIC_WRITE = getattr(select, "PIPE_BUF", 512)


class AccessLogWriter:
    def __init__(
        self,
        fd: int,
        *,
        capacity: int = 16_384,
        flush_interval_s: float = 0.05,
        on_drop: Callable[[], None] | None = None,
    ) -> None:
        self._fd = fd
        self._capacity = capacity
        self._interval = flush_interval_s
        self._on_drop = on_drop
        self._lines: deque[bytes] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()  # wakes the writer out of its batching pause
        self._stopping = False
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="edgeroute-access-log", daemon=True)
        self._thread.start()

    def submit(self, line: bytes) -> None:
        """Queue one line (newline included). Called on the event loop: never blocks."""
        lines = self._lines
        if len(lines) >= self._capacity or self._stopping:
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop()
            return
        lines.append(line)  # deque.append is atomic: the writer thread may popleft meanwhile
        if not self._wake.is_set():  # a plain attribute read; set() takes a lock
            self._wake.set()

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued, then stop the thread."""
        self._stopping = True
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            # Let a batch build up: one wake-up and a few writes per interval, not per line.
            self._stop.wait(self._interval)
            self._wake.clear()
            self._flush()
            if self._stopping and not self._lines:
                return

    def _flush(self) -> None:
        lines = self._lines
        count = len(lines)
        if not count:
            return
        chunk: list[bytes] = []
        size = 0
        for _ in range(count):
            line = lines.popleft()
            if size and size + len(line) > _ATOMIC_WRITE:
                self._write(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            self._write(b"".join(chunk))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._fd, view)
            except BlockingIOError:  # stderr shared with a non-blocking reader: wait for it
                select.select([], [self._fd], [], 1.0)
                continue
            except InterruptedError:
                continue
            except OSError:  # stderr closed or gone: nobody will read these lines
                self.dropped += data.count(b"\n")
                return
            view = view[written:]


_writer: AccessLogWriter | None = None


def install(fd: int, *, on_drop: Callable[[], None] | None = None) -> AccessLogWriter:
    """Route this process's access lines to a writer thread on `fd` (serving processes)."""
    global _writer
    if _writer is None:
        _writer = AccessLogWriter(fd, on_drop=on_drop)
        atexit.register(close)
    return _writer


def writer() -> AccessLogWriter | None:
    """The installed writer, or None: then access lines go through `logging` (library use)."""
    return _writer


def close() -> None:
    global _writer
    if _writer is not None:
        _writer.close()
        _writer = None
