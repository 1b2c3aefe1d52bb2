"""Where a Sentinel-managed primary is now, found off the request path.

redis-py's `Sentinel` holds one client per sentinel and judges each answer
(`check_master_state`: a primary, not subjectively or objectively down). Its own
`discover_master` asks the sentinels one after another, so one that accepts connections
but never answers (a hung host, a partition, SIGSTOP) costs its whole timeout before the
next is asked. Here every sentinel is asked at once, each with its own short timeout, the
first acceptable answer wins, and the sentinel that gave it moves to the front of the list.

The primary's address is cached. A connection to it that fails (refused, timed out, not a
primary by ROLE, READONLY) marks it stale and starts one background discovery that keeps
asking until some sentinel names a primary; a connection attempt waits for that discovery
only within its own deadline and never cancels it, so the next attempt finds the answer
ready. A request therefore never waits on a sentinel longer than the state timeout, and a
hung sentinel never waits on anything.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from redis.asyncio.client import Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from edgeroute.state.topology import Address, StateTarget

# Each sentinel must answer within this; a sentinel answers from memory in well under 1 ms.
SENTINEL_TIMEOUT_S = 0.5
# Between rounds when no sentinel names a usable primary (a failover is underway).
_RETRY_MIN_S = 0.05
_RETRY_MAX_S = 0.25
# How long the other sentinels may still take once one has answered "no usable primary".
_STRAGGLER_GRACE_S = 0.1


class MasterNotFound(ConnectionError):
    pass


class SentinelResolver:
    def __init__(self, target: StateTarget, *, sentinel_timeout_s: float = SENTINEL_TIMEOUT_S):
        assert target.master_name is not None
        self.master_name = target.master_name
        self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(target.nodes),
            sentinel_kwargs={
                **target.sentinel_kwargs(),
                "socket_timeout": sentinel_timeout_s,
                "socket_connect_timeout": sentinel_timeout_s,
                # One try each: the next round asks again, and a retried hung sentinel
                # would hold its connection for several timeouts.
                "retry": Retry(NoBackoff(), 0),
            },
        )
        self._sentinel_timeout = sentinel_timeout_s
        self._leftovers: set[asyncio.Task[Any]] = set()
        self._address: Address | None = None
        self._discovery: asyncio.Task[Address] | None = None
        self.last_error = "no sentinel has answered yet"

    async def resolve(self) -> Address:
        if self._address is not None:
            return self._address
        if self._discovery is None:
            self._discovery = asyncio.get_running_loop().create_task(self._discover_until_found())
        # Shielded: the caller's deadline ends its wait, not the discovery.
        return await asyncio.shield(self._discovery)

    def failed(self, address: Address) -> None:
        if self._address == address:
            self._address = None
        if self._discovery is None:
            self._discovery = asyncio.get_running_loop().create_task(self._discover_until_found())

    async def _discover_until_found(self) -> Address:
        delay = _RETRY_MIN_S
        try:
            while True:
                try:
                    address = await self.discover()
                except (RedisError, OSError) as exc:
                    self.last_error = str(exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _RETRY_MAX_S)
                    continue
                self._address = address
                return address
        finally:
            self._discovery = None

    async def discover(self) -> Address:
        """Ask every sentinel at once; the first that names a healthy primary wins.

        Once one sentinel has answered that there is no usable primary (a failover is
        underway), the others get a short grace rather than their whole timeout: a healthy
        sentinel answers in about a millisecond, and a hung one must not slow down the next
        round, which is the one that may see the promoted replica.
        """
        loop = asyncio.get_running_loop()
        sentinels = self._sentinel.sentinels
        tasks = [loop.create_task(self._ask(sentinel)) for sentinel in sentinels]
        errors: list[str] = []
        pending = set(tasks)
        deadline = loop.time() + self._sentinel_timeout
        try:
            while pending:
                done, pending = await asyncio.wait(
                    pending, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    errors.append(f"{len(pending)} sentinel(s) did not answer in time")
                    break
                for task in done:
                    try:
                        address, sentinel = task.result()
                    except (RedisError, OSError) as exc:
                        errors.append(str(exc))
                        deadline = min(deadline, loop.time() + _STRAGGLER_GRACE_S)
                        continue
                    # Prefer the one that answered: it is asked first next time too.
                    sentinels.remove(sentinel)
                    sentinels.insert(0, sentinel)
                    return address
        finally:
            # The slower ones are not waited for: a hung sentinel would hold the answer back.
            for task in tasks:
                if not task.done():
                    task.cancel()
                    self._leftovers.add(task)
                    task.add_done_callback(self._leftover_done)
        raise MasterNotFound(
            f"no sentinel names a healthy primary for {self.master_name!r}: " + "; ".join(errors)
        )

    def _leftover_done(self, task: asyncio.Task[Any]) -> None:
        self._leftovers.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a loser's error is of no interest

    async def _ask(self, sentinel: Redis) -> tuple[Address, Redis]:
        where = _where(sentinel)
        try:
            async with asyncio.timeout(self._sentinel_timeout):
                masters = await sentinel.sentinel_masters()
        except (TimeoutError, RedisError, OSError) as exc:
            raise MasterNotFound(f"sentinel {where}: {type(exc).__name__}: {exc}") from None
        state: dict[str, Any] | None = masters.get(self.master_name)  # type: ignore[union-attr]
        if not state:
            raise MasterNotFound(f"sentinel {where} does not know {self.master_name!r}")
        if not self._sentinel.check_master_state(state, self.master_name):
            raise MasterNotFound(f"sentinel {where} sees {self.master_name!r} down")
        return (str(state["ip"]), int(state["port"])), sentinel

    async def close(self) -> None:
        if self._discovery is not None:
            self._discovery.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._discovery
        for task in list(self._leftovers):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self._sentinel.aclose()


def _where(sentinel: Redis) -> str:
    kwargs = sentinel.connection_pool.connection_kwargs
    return f"{kwargs.get('host')}:{kwargs.get('port')}"
