"""A minimal pipelined RESP2 connection: the hot path of RedisState.

Why not redis-py's own connection here: a decide is one EVALSHA whose arguments are mostly
the route's static description. Encoding that once per route and parsing replies with
hiredis in bulk costs a fraction of a generic client's per-command work, and the gateway
issues one of these per request. redis-py still does everything else (URL parsing,
cluster, sentinel discovery, admin commands).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hiredis

Arg = str | bytes | int | float


def encode_args(args: Sequence[Arg]) -> bytes:
    """RESP bulk strings for `args`, without the array header (so pieces can be joined)."""
    out = bytearray()
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, float):
            data = repr(arg).encode()
        else:
            data = str(arg).encode()
        out += b"$%d\r\n%b\r\n" % (len(data), data)
    return bytes(out)


def command(count: int, *encoded: bytes) -> bytes:
    """One RESP command made of `count` arguments already encoded by `encode_args`."""
    return b"*%d\r\n" % count + b"".join(encoded)


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    db: int = 0
    ssl_context: ssl.SSLContext | None = None
    server_hostname: str | None = None


class RespConnection:
    """One TCP (or TLS) connection; callers serialise their use of it (the pipeline does)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._parser = hiredis.Reader()

    @classmethod
    async def open(cls, endpoint: Endpoint) -> RespConnection:
        reader, writer = await asyncio.open_connection(
            endpoint.host,
            endpoint.port,
            ssl=endpoint.ssl_context,
            server_hostname=endpoint.server_hostname if endpoint.ssl_context else None,
        )
        connection = cls(reader, writer)
        setup: list[bytes] = []
        if endpoint.password is not None:
            auth: list[Arg] = ["AUTH"]
            if endpoint.username:
                auth.append(endpoint.username)
            auth.append(endpoint.password)
            setup.append(command(len(auth), encode_args(auth)))
        if endpoint.db:
            setup.append(command(2, encode_args(["SELECT", endpoint.db])))
        if setup:
            for reply in await connection.execute(setup):
                if isinstance(reply, hiredis.ReplyError):
                    connection.close()
                    raise ConnectionError(f"redis refused the connection setup: {reply}")
        return connection

    async def execute(self, commands: Sequence[bytes]) -> list[Any]:
        """Send all commands in one write and return their replies in order.

        Error replies come back as `hiredis.ReplyError` values, not exceptions: one failing
        command must not hide the replies of the others in the same batch.
        """
        self._writer.write(b"".join(commands))
        replies: list[Any] = []
        parser = self._parser
        wanted = len(commands)
        while True:
            reply = parser.gets()
            while reply is not False:
                replies.append(reply)
                if len(replies) == wanted:
                    return replies
                reply = parser.gets()
            data = await self._reader.read(65536)
            if not data:
                raise ConnectionError("redis closed the connection")
            parser.feed(data)

    def write(self, data: bytes) -> None:
        """Queue bytes on the transport (for a caller that reads replies with `replies`)."""
        self._writer.write(data)

    async def replies(self) -> list[Any]:
        """Wait for more data and return every complete reply it finished (maybe none)."""
        data = await self._reader.read(262144)
        if not data:
            raise ConnectionError("redis closed the connection")
        parser = self._parser
        parser.feed(data)
        out = []
        reply = parser.gets()
        while reply is not False:
            out.append(reply)
            reply = parser.gets()
        return out

    def close(self) -> None:
        self._writer.close()
