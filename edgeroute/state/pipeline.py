"""One continuously pipelined connection to one Redis server, on redis-py's Connection.

redis-py does the connection work: TCP or TLS (`SSLConnection`), AUTH with an ACL user or a
password, SELECT, and reply parsing with hiredis. This module only decides when to write
and whose each reply is. Commands submitted during one event-loop iteration go out in one
write (a writer task); a reader task hands replies back in order as they arrive. Writing
never waits for earlier replies, so the client's Python work and the server's Lua overlap
instead of taking turns, and a busy gateway pays one network round trip per loop iteration
rather than per request — which redis-py's own clients do not do: a `Redis` client waits
for each reply before its connection takes the next command, and its explicit pipelines
batch only what one caller gathered. Each command is still exactly one Redis command (one
EVALSHA per call; RedisState gathers the decides of a route into one call before that, and
`before_write` lets it hand them over right before the write).

No command waits longer than the timeout from the moment it was submitted: one timer
watches the oldest outstanding command, and when it expires the connection is presumed
stuck (a frozen or partitioned server), closed, and every waiting command fails with
StateUnavailable. The next submit reconnects, re-resolving the server and reloading the
scripts. redis-py's own socket timeouts stay off: one timer per batch is cheaper than a
timeout context per reply.

Connecting is not bounded by the commands waiting for it: they fail at their own deadlines,
but the attempt (finding the server, TLS, AUTH, ROLE, loading the scripts) goes on for up
to CONNECT_TIMEOUT_S, so on a slow machine or after a failover the next command finds the
connection ready instead of starting the same attempt over and abandoning it again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from redis.asyncio.connection import AbstractConnection, Connection
from redis.exceptions import NoScriptError, RedisError, ResponseError

from edgeroute.errors import StateUnavailable
from edgeroute.state.resp import command, encode_args
from edgeroute.state.scripts import Script
from edgeroute.state.topology import Address, StateTarget

_ASKING = command(1, encode_args(["ASKING"]))
_ROLE = command(1, encode_args(["ROLE"]))

# The longest a connection attempt may take (or the state timeout, if that is longer).
CONNECT_TIMEOUT_S = 1.0

# (future or None for a reply nobody waits for, deadline, the command for a NOSCRIPT replay)
_Item = tuple["asyncio.Future[Any] | None", float, bytes]
# Builds an unconnected redis-py connection to one address.
ConnectionFactory = Callable[[Address], AbstractConnection]


class Resolver(Protocol):
    """Where the server is now (fixed, or asked of Sentinel) and what became of it."""

    last_error: str  # why no address is known, if none is

    async def resolve(self) -> Address: ...

    def failed(self, address: Address) -> None:
        """A connection to `address` could not be made or checked: look again."""


class FixedAddress:
    last_error = ""

    def __init__(self, address: Address) -> None:
        self.address = address

    async def resolve(self) -> Address:
        return self.address

    def failed(self, address: Address) -> None:
        pass


class Pipeline:
    """Replies come back raw: error replies are redis-py `ResponseError` values (MovedError,
    ReadOnlyError, ...) for the caller to interpret; transport trouble raises
    StateUnavailable."""

    def __init__(
        self,
        resolver: Resolver,
        factory: ConnectionFactory,
        timeout_s: float,
        scripts: dict[str, Script],
        *,
        check_primary: bool = False,
    ) -> None:
        self._resolver = resolver
        self._factory = factory
        self._check_primary = check_primary
        self._timeout = timeout_s
        self._load = [
            command(3, encode_args(["SCRIPT", "LOAD", script.source]))
            for script in scripts.values()
        ]
        self._outbox: list[bytes] = []
        self._outbox_items: list[_Item] = []
        self._pending: deque[_Item] = deque()
        self._driver: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._outbox_timer: asyncio.TimerHandle | None = None
        self._connecting = False
        self._suspect: _Item | None = None
        self.batches = 0
        # Called by the writer right before each write: a caller's chance to submit what
        # it has been gathering this iteration (RedisState's decide batches) into it.
        self.before_write: Callable[[], None] | None = None

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
        self._kick(loop)
        return future

    def kick(self) -> None:
        """Wake the writer for the next loop iteration without a command yet: something
        will be submitted before it runs (or `before_write` will submit it)."""
        self._kick(asyncio.get_running_loop())

    def _kick(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._driver is None:
            self._driver = loop.create_task(self._drive())
        elif self._connecting:
            if self._outbox_timer is None:
                self._expire_outbox()
        elif self._wake is not None and not self._wake.done():
            # The writer runs on the next loop iteration, after every caller of this
            # iteration has queued its command: they all leave in one write.
            self._wake.set_result(None)

    # ---- the writer: connect, then write whatever has accumulated --------------------

    async def _drive(self) -> None:
        connection: AbstractConnection | None = None
        reader: asyncio.Task[None] | None = None
        try:
            connection = await self._open()
            if connection is None:
                return
            owner = asyncio.current_task()
            reader = asyncio.get_running_loop().create_task(self._read(connection, owner))
            while True:
                if self.before_write is not None:
                    self.before_write()
                if not self._outbox:
                    self._wake = asyncio.get_running_loop().create_future()
                    await self._wake
                    self._wake = None
                    continue
                data = b"".join(self._outbox)
                self._pending.extend(self._outbox_items)
                self._outbox.clear()
                self._outbox_items.clear()
                self.batches += 1
                if self._timer is None:
                    self._arm_timer()
                # Returns at once unless the socket buffer is full (then: back-pressure).
                await connection.send_packed_command(data, check_health=False)
        except asyncio.CancelledError:
            raise
        except (RedisError, OSError) as exc:
            if self._driver is asyncio.current_task():
                self._break(_unavailable(exc))
        finally:
            if reader is not None:
                reader.cancel()
            if connection is not None:
                with contextlib.suppress(Exception):
                    await connection.disconnect(nowait=True)

    async def _open(self) -> AbstractConnection | None:
        address: Address | None = None
        connection: AbstractConnection | None = None
        self._connecting = True
        self._expire_outbox()
        try:
            async with asyncio.timeout(max(CONNECT_TIMEOUT_S, self._timeout)):
                address = await self._resolver.resolve()
                connection = self._factory(address)
                await connection.connect()  # type: ignore[no-untyped-call]
                await self._prepare(connection)
            self._stop_outbox_timer()
            return connection
        except (TimeoutError, RedisError, OSError) as exc:
            self._stop_outbox_timer()
            if connection is not None:
                with contextlib.suppress(Exception):
                    await connection.disconnect(nowait=True)
            if address is not None:
                self._resolver.failed(address)
                error = _unavailable(exc)
            else:
                error = StateUnavailable(
                    f"redis did not answer: no server known yet ({self._resolver.last_error})"
                )
            if self._driver is asyncio.current_task():
                self._driver = None
            self._fail_outbox(error)
            return None
        except BaseException:
            self._stop_outbox_timer()
            if connection is not None:
                with contextlib.suppress(Exception):
                    await connection.disconnect(nowait=True)
            if self._driver is asyncio.current_task():
                self._driver = None
            self._fail_outbox(StateUnavailable("redis connection attempt was cancelled"))
            raise

    async def _prepare(self, connection: AbstractConnection) -> None:
        """ROLE (Sentinel) and SCRIPT LOADs in one round trip, before any command is written.

        Load up front: a fresh server (or a promoted replica) has no scripts. Sentinel may be
        a moment behind a failover: never write to a demoted primary.
        """
        setup = ([_ROLE] if self._check_primary else []) + self._load
        await connection.send_packed_command(b"".join(setup), check_health=False)
        replies = []
        for _ in setup:
            try:
                replies.append(await connection.read_response())
            except ResponseError as error:
                replies.append(error)
        if self._check_primary:
            role = replies.pop(0)
            if not (isinstance(role, list) and role and role[0] == b"master"):
                raise ConnectionError("the server Sentinel named is not a primary (failover)")
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise ConnectionError(f"redis refused to load the edgeroute scripts: {reply}")

    # ---- the reader ------------------------------------------------------------------

    async def _read(self, connection: AbstractConnection, owner: asyncio.Task[Any] | None) -> None:
        pending = self._pending
        read = connection.read_response
        try:
            while True:
                try:
                    reply = await read(disconnect_on_error=False)
                except ResponseError as error:
                    reply = error
                future, _, cmd = pending.popleft()
                if future is None or future.done():
                    continue
                if isinstance(reply, NoScriptError):
                    self._replay(future, cmd)
                else:
                    future.set_result(reply)
        except asyncio.CancelledError:
            raise
        except (RedisError, OSError, IndexError) as exc:
            if self._driver is owner:  # not a connection an earlier failure already replaced
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
        self._kick(loop)

    # ---- deadlines and failure -------------------------------------------------------

    def _expire_outbox(self) -> None:
        """While connecting: fail the commands whose deadline passed, watch the next one."""
        self._outbox_timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        items = self._outbox_items
        expired = 0
        while expired < len(items) and items[expired][1] <= now:
            expired += 1
        if expired:
            error = StateUnavailable("redis did not answer within the state timeout (connecting)")
            for future, _, _ in items[:expired]:
                if future is not None and not future.done():
                    future.set_exception(error)
            del items[:expired]
            del self._outbox[:expired]
        if items:
            self._outbox_timer = loop.call_at(items[0][1], self._expire_outbox)

    def _stop_outbox_timer(self) -> None:
        self._connecting = False
        if self._outbox_timer is not None:
            self._outbox_timer.cancel()
            self._outbox_timer = None

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
        """Drop the connection (its writer closes it) and fail everything waiting on it."""
        driver, self._driver = self._driver, None
        if driver is not None and driver is not asyncio.current_task():
            driver.cancel()
        if self._wake is not None and not self._wake.done():
            self._wake.cancel()
        self._wake = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stop_outbox_timer()
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
        driver = self._driver
        self._break(StateUnavailable("state backend closed"))
        if driver is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await driver


def _unavailable(exc: BaseException) -> StateUnavailable:
    return StateUnavailable(f"redis did not answer: {type(exc).__name__}: {exc}".strip())


def connection_factory(target: StateTarget) -> ConnectionFactory:
    """redis-py connections to any address of `target`, with its credentials, db and TLS."""
    kwargs = target.connection_kwargs()
    connection_class: type[Connection] = kwargs.pop("connection_class")

    def make(address: Address) -> AbstractConnection:
        # No redis-py socket timeouts: the pipeline's deadlines bound every wait.
        return connection_class(
            host=address[0],
            port=address[1],
            socket_timeout=None,
            socket_connect_timeout=None,
            **kwargs,
        )

    return make
