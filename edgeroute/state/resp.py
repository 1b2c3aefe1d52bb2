"""RESP encoding of script calls, in pieces that can be encoded once and joined.

The one hand-written part of the Redis client, kept because it pays: a decide is one
EVALSHA whose arguments are mostly the route's static description, so RedisState encodes
that prefix once per route and per call only the few dynamic arguments, then hands the
bytes to redis-py's `send_packed_command`. redis-py's `pack_command` would encode every
argument of every call (bench/decide.py, "transport" rows, measures both side by side).
Connections, TLS, AUTH, reply parsing (hiredis), Sentinel and the cluster slot map are
redis-py's.
"""

from __future__ import annotations

from collections.abc import Sequence

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
