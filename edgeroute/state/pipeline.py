"""One coalescing connection to one Redis server.

While one batch is on the wire, new commands queue; the next batch goes out as one
pipelined write the moment the previous replies are in. A busy gateway therefore pays one
network round trip per batch instead of per request, and each command is still exactly one
Redis command (one EVALSHA per decide). No command waits longer than the timeout from the
moment it was queued.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import hiredis

from edgeroute.errors import StateUnavailable
from edgeroute.state.resp import Endpoint, RespConnection, command, encode_args
from edgeroute.state.scripts import Script

_ASKING = command(1, encode_args(["ASKING"]))

Resolver = Callable[[], Awaitable[Endpoint]]
Check = Callable[[RespConnection], Awaitable[None]]


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
        self._queue: list[tuple[bytes, asyncio.Future[Any], float, bool]] = []
        self._runner: asyncio.Task[None] | None = None
        self._connection: RespConnection | None = None
        self.batches = 0

    def submit(self, cmd: bytes, *, asking: bool = False) -> asyncio.Future[Any]:
        """Queue one command; `asking` sends ASKING right before it (cluster migrations)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((cmd, future, loop.time(), asking))
        if self._runner is None:
            self._runner = loop.create_task(self._run())
        return future

    async def _run(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._send(batch)
        finally:
            self._runner = None

    async def _connect(self) -> RespConnection:
        connection = await RespConnection.open(await self._resolve())
        try:
            if self._check is not None:
                await self._check(connection)
            # Load up front: a fresh server (or a promoted replica) has no scripts.
            await self.load_scripts(connection)
        except BaseException:
            connection.close()
            raise
        return connection

    async def _send(self, batch: list[tuple[bytes, asyncio.Future[Any], float, bool]]) -> None:
        deadline = batch[0][2] + self._timeout
        self.batches += 1
        try:
            async with asyncio.timeout_at(deadline):
                if self._connection is None:
                    self._connection = await self._connect()
                replies = await self._execute(self._connection, batch)
                missing = [i for i, reply in enumerate(replies) if _is_noscript(reply)]
                if missing:
                    # SCRIPT FLUSH or a failover: load the scripts, replay what bounced.
                    await self.load_scripts(self._connection)
                    again = await self._execute(self._connection, [batch[i] for i in missing])
                    for i, reply in zip(missing, again, strict=True):
                        replies[i] = reply
        except (TimeoutError, OSError, ConnectionError, hiredis.ProtocolError) as exc:
            self.drop_connection()
            error = StateUnavailable(f"redis did not answer: {type(exc).__name__}: {exc}".strip())
            for _, future, _, _ in batch:
                if not future.done():
                    future.set_exception(error)
            return
        except BaseException:
            self.drop_connection()
            for _, future, _, _ in batch:
                if not future.done():
                    future.cancel()
            raise
        for (_, future, _, _), reply in zip(batch, replies, strict=True):
            if not future.done():
                future.set_result(reply)

    @staticmethod
    async def _execute(
        connection: RespConnection, batch: list[tuple[bytes, asyncio.Future[Any], float, bool]]
    ) -> list[Any]:
        if not any(asking for _, _, _, asking in batch):
            return await connection.execute([cmd for cmd, _, _, _ in batch])
        commands: list[bytes] = []
        for cmd, _, _, asking in batch:
            if asking:
                commands.append(_ASKING)
            commands.append(cmd)
        raw = await connection.execute(commands)
        replies, position = [], 0
        for _, _, _, asking in batch:
            position += 1 if asking else 0  # ASKING's own +OK
            replies.append(raw[position])
            position += 1
        return replies

    async def load_scripts(self, connection: RespConnection) -> None:
        replies = await connection.execute(
            [
                command(3, encode_args(["SCRIPT", "LOAD", script.source]))
                for script in self._scripts.values()
            ]
        )
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                raise ConnectionError(f"redis refused to load the edgeroute scripts: {reply}")

    def drop_connection(self) -> None:
        """Forget the connection: the next batch reconnects (and re-resolves the server)."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner
        self.drop_connection()


def _is_noscript(reply: Any) -> bool:
    return isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT")
