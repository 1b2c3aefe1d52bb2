"""One continuously pipelined connection to one Redis server.

Commands submitted during one event-loop iteration go out in one write; a reader task hands
replies back in order as they arrive. Writing never waits for earlier replies, so the
client's Python work and the server's Lua overlap instead of taking turns, and a busy
gateway pays one network round trip per loop iteration rather than per request. Each
command is still exactly one Redis command (one EVALSHA per decide).

No command waits longer than the timeout from the moment it was submitted: one timer
watches the oldest outstanding command, and when it expires the connection is presumed
stuck (a frozen or partitioned server), closed, and every waiting command fails with
StateUnavailable. The next submit reconnects, re-resolving the server and reloading the
scripts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import hiredis

from edgeroute.errors import StateUnavailable
from edgeroute.state.resp import Endpoint, RespConnection, command, encode_args
from edgeroute.state.scripts import Script

_ASKING = command(1, encode_args(["ASKING"]))

Resolver = Callable[[], Awaitable[Endpoint]]
Check = Callable[[RespConnection], Awaitable[None]]
# (future or None for a reply nobody waits for, deadline, the command for a NOSCRIPT replay)
_Item = tuple["asyncio.Future[Any] | None", float, bytes]


class Pipeline:
    """Replies come back raw: error replies are `hiredis.ReplyError` values for the caller
    to interpret (MOVED, READONLY, ...); transport trouble raises StateUnavailable."""

    def __init__(
        self,
        resolve: Resolver,
        timeout_s: float,
        scripts: dict[str, Script],
        *,
        check: Check | None = None,
    ) -> None:
        self._resolve = resolve
        self._check = check
        self._timeout = timeout_s
        self._scripts = scripts
        self._load = [
            command(3, encode_args(["SCRIPT", "LOAD", script.source]))
            for script in scripts.values()
        ]
        self._outbox: list[bytes] = []
        self._outbox_items: list[_Item] = []
        self._pending: deque[_Item] = deque()
        self._connection: RespConnection | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._suspect: _Item | None = None
        self._flush_scheduled = False
        self.batches = 0

    # ---- submitting ------------------------------------------------------------------

    def submit(self, cmd: bytes, *, asking: bool = False) -> asyncio.Future[Any]:
        """Queue one command; `asking` sends ASKING right before it (cluster migrations)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        deadline = loop.time() + self._timeout
        if asking:
            self._outbox.append(_ASKING)
            self._outbox_items.append((None, deadline, _ASKING))
        self._outbox.append(cmd)
        self._outbox_items.append((future, deadline, cmd))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._outbox:
            return
        connection = self._connection
        if connection is None:
            if self._connecting is None:
                self._connecting = asyncio.get_running_loop().create_task(self._connect())
            return  # the connect task flushes when it is done
        data = b"".join(self._outbox)
        self._pending.extend(self._outbox_items)
        self._outbox.clear()
        self._outbox_items.clear()
        self.batches += 1
        connection.write(data)
        if self._timer is None:
            self._arm_timer()

    # ---- connecting ------------------------------------------------------------------

    async def _connect(self) -> None:
        deadline = self._outbox_items[0][1] if self._outbox_items else None
        try:
            async with asyncio.timeout_at(deadline):
                connection = await RespConnection.open(await self._resolve())
                try:
                    if self._check is not None:
                        await self._check(connection)
                    # Load up front: a fresh server (or a promoted replica) has no scripts.
                    await self.load_scripts(connection)
                except BaseException:
                    connection.close()
                    raise
        except (TimeoutError, OSError, ConnectionError, hiredis.ProtocolError) as exc:
            self._connecting = None
            self._fail_outbox(_unavailable(exc))
            return
        except BaseException:
            self._connecting = None
            self._fail_outbox(StateUnavailable("redis connection attempt was cancelled"))
            raise
        self._connection = connection
        self._connecting = None
        self._reader = asyncio.get_running_loop().create_task(self._read(connection))
        self._flush()

    async def load_scripts(self, connection: RespConnection) -> None:
        for reply in await connection.execute(self._load):
            if isinstance(reply, hiredis.ReplyError):
                raise ConnectionError(f"redis refused to load the edgeroute scripts: {reply}")

    # ---- reading ---------------------------------------------------------------------

    async def _read(self, connection: RespConnection) -> None:
        pending = self._pending
        try:
            while True:
                for reply in await connection.replies():
                    future, _, cmd = pending.popleft()
                    if future is None or future.done():
                        continue
                    if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
                        self._replay(future, cmd)
                    else:
                        future.set_result(reply)
        except asyncio.CancelledError:
            raise
        except (OSError, ConnectionError, hiredis.ProtocolError, IndexError) as exc:
            if self._connection is connection:
                self._break(_unavailable(exc))

    def _replay(self, future: asyncio.Future[Any], cmd: bytes) -> None:
        """SCRIPT FLUSH or a failover: load the scripts, then send the command again."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        for load in self._load:
            self._outbox.append(load)
            self._outbox_items.append((None, deadline, load))
        self._outbox.append(cmd)
        self._outbox_items.append((future, deadline, cmd))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)

    # ---- deadlines and failure -------------------------------------------------------

    def _arm_timer(self) -> None:
        if self._pending:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(self._pending[0][1], self._on_timer)
        else:
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if not self._pending:
            self._suspect = None
            return
        loop = asyncio.get_running_loop()
        oldest = self._pending[0]
        if loop.time() < oldest[1]:
            self._suspect = None
            self._arm_timer()
        elif self._suspect is not oldest:
            # A stalled event loop runs expired timers before reading the socket: give the
            # reader one more turn so replies that did arrive in time are not thrown away.
            self._suspect = oldest
            self._timer = loop.call_later(min(0.005, self._timeout / 10), self._on_timer)
        else:
            # Still the same command, still unanswered: the server is stuck or gone.
            self._suspect = None
            self._break(StateUnavailable("redis did not answer within the state timeout"))

    def _break(self, error: StateUnavailable) -> None:
        """Close the connection and fail everything waiting on it."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
        self._reader = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, deque()
        for future, _, _ in pending:
            if future is not None and not future.done():
                future.set_exception(error)
        self._fail_outbox(error)

    def _fail_outbox(self, error: StateUnavailable) -> None:
        items = self._outbox_items[:]
        self._outbox.clear()
        self._outbox_items.clear()
        for future, _, _ in items:
            if future is not None and not future.done():
                future.set_exception(error)

    def drop_connection(self) -> None:
        """Forget the connection: the next command reconnects (and re-resolves the server)."""
        self._break(StateUnavailable("redis connection dropped"))

    async def close(self) -> None:
        for task in (self._connecting, self._reader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._break(StateUnavailable("state backend closed"))


def _unavailable(exc: BaseException) -> StateUnavailable:
    return StateUnavailable(f"redis did not answer: {type(exc).__name__}: {exc}".strip())
