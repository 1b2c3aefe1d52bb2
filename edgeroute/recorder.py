"""Outcome records leave the request path: queued, then written in batches by one task."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable

from edgeroute.state.base import RouteSpec, StateBackend
from edgeroute.types import Outcome

log = logging.getLogger("edgeroute.recorder")


class Recorder:
    """A bounded queue in front of `state.record_many`.

    When the state cannot keep up (or is away), the oldest records are dropped and counted:
    memory stays bounded, and a lost latency sample costs less than a stalled gateway.
    """

    def __init__(
        self,
        state: StateBackend,
        *,
        max_pending: int = 10_000,
        max_batch: int = 512,
        on_drop: Callable[[int], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        stop_timeout_s: float = 5.0,
    ) -> None:
        self._state = state
        self._pending: deque[tuple[RouteSpec, Outcome]] = deque()
        self._max_pending = max_pending
        self._max_batch = max_batch
        self._wake = asyncio.Event()
        self._on_drop = on_drop
        self._on_error = on_error
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stop_timeout = stop_timeout_s
        self.dropped = 0
        # Records submitted and records done with (written, failed or dropped), in queue
        # order, and who waits for a count to be done (see `written`).
        self._submitted = 0
        self._done = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def submit(self, route: RouteSpec, outcome: Outcome) -> None:
        self._pending.append((route, outcome))
        self._submitted += 1
        if len(self._pending) > self._max_pending:
            self._pending.popleft()
            self.dropped += 1
            self._settle(1)
            if self._on_drop is not None:
                self._on_drop(1)
        self._wake.set()

    def written(self) -> asyncio.Future[None]:
        """Done once every record submitted so far has reached the state (or failed to, or
        was dropped): for a traced request that reads back what its own outcome did."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._done >= self._submitted:
            waiter.set_result(None)
        else:
            self._waiters.append((self._submitted, waiter))
        return waiter

    def _settle(self, count: int) -> None:
        self._done += count
        if not self._waiters:
            return
        waiting = []
        for mark, waiter in self._waiters:
            if mark > self._done:
                waiting.append((mark, waiter))
            elif not waiter.done():
                waiter.set_result(None)
        self._waiters = waiting

    @property
    def pending(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        while self._pending:
            count = min(len(self._pending), self._max_batch)
            batch = [self._pending.popleft() for _ in range(count)]
            try:
                await self._state.record_many(batch)
            except Exception as exc:  # the state backend reports and falls back on its own
                if self._on_error is not None:
                    self._on_error(exc)
                log.warning("recording %d outcomes failed: %s", len(batch), exc)
            finally:
                self._settle(count)

    async def stop(self) -> None:
        """Write what is queued, the batch already on its way included, then stop.

        The background task finishes its current write and drains the queue; a state that
        does not take them within `stop_timeout_s` costs the records still queued (counted
        as dropped), never a shutdown that hangs.
        """
        task = self._task
        if task is None:
            await self.flush()
            return
        self._stopping = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), self._stop_timeout)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            lost = len(self._pending)
            self._pending.clear()
            self._settle(lost)
            if lost:
                self.dropped += lost
                if self._on_drop is not None:
                    self._on_drop(lost)
                log.warning("stopping: %d outcome records were never written", lost)
        finally:
            self._task = None
