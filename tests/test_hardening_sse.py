"""The SSE reader on its own (issue 9, item 3): linear in what arrives, bounded in size and time.

A fake response hands the reader chunks exactly as a test scripts them, so chunk boundaries
(a CRLF split in two, a blank line split across reads, one huge event in one read) are
deliberate rather than whatever TCP happened to do.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import cast

import pytest

from edgeroute.providers.base import ErrorClass, UpstreamError
from edgeroute.providers.http1 import Response
from edgeroute.providers.sse import EventReader, StreamLimits

LIMITS = StreamLimits(idle_timeout_s=5.0, total_timeout_s=None, max_event_bytes=1 << 20)


class _Content:
    def __init__(self, chunks: Iterable[bytes], gap_s: float) -> None:
        self._chunks = iter(chunks)
        self._gap_s = gap_s
        self.reads = 0

    async def readany(self) -> bytes:
        self.reads += 1
        if self._gap_s:
            await asyncio.sleep(self._gap_s)
        return next(self._chunks, b"")


class FakeResponse:
    def __init__(self, chunks: Iterable[bytes], gap_s: float = 0.0) -> None:
        self.content = _Content(chunks, gap_s)
        self.closed = False

    async def read_chunk(self) -> bytes:
        return await self.content.readany()

    def close(self) -> None:
        self.closed = True


def reader(
    chunks: Iterable[bytes], limits: StreamLimits = LIMITS, gap_s: float = 0.0
) -> EventReader:
    return EventReader(cast(Response, FakeResponse(chunks, gap_s)), limits)


async def read_all(events: EventReader) -> list[bytes]:
    blocks = []
    while (block := await events.read_block()) is not None:
        blocks.append(block)
    return blocks


async def test_line_ends_are_normalised_across_chunk_boundaries() -> None:
    chunks = [b"data: a\r", b"\n\r", b"\ndata: b\r\r", b"data: c\n", b"\n", b"data: tail"]
    blocks = await read_all(reader(chunks))
    assert b"".join(blocks) == b"data: a\n\ndata: b\n\ndata: c\n\ndata: tail\n\n"
    assert all(block.endswith(b"\n\n") for block in blocks)


async def test_one_event_in_many_small_pieces_costs_its_length_not_its_square() -> None:
    # 4 MiB in 64-byte pieces: re-concatenating the buffer on every read, as the old reader
    # did, copies ~140 GB here; scanning each byte once takes a fraction of a second.
    piece = b"x" * 64
    count = (4 << 20) // len(piece)
    chunks = [b"data: ", *([piece] * count), b"\n\n"]
    limits = StreamLimits(idle_timeout_s=60.0, total_timeout_s=None, max_event_bytes=8 << 20)
    started = time.monotonic()
    [block] = await read_all(reader(chunks, limits))
    assert len(block) == 6 + 64 * count + 2
    assert time.monotonic() - started < 10  # a bound, not a benchmark: quadratic never ends


async def test_an_event_over_the_bound_is_refused_while_it_grows() -> None:
    limits = StreamLimits(idle_timeout_s=5.0, total_timeout_s=None, max_event_bytes=4096)
    events = reader([b"data: ", *([b"y" * 1000] * 100)], limits)
    with pytest.raises(UpstreamError) as caught:
        await read_all(events)
    assert caught.value.error_class is ErrorClass.TOO_LARGE
    content = cast(FakeResponse, events._response).content
    assert content.reads < 10  # stopped once over the bound, not at the end of the body


async def test_an_event_over_the_bound_in_one_read_is_refused_but_many_small_ones_pass() -> None:
    limits = StreamLimits(idle_timeout_s=5.0, total_timeout_s=None, max_event_bytes=4096)
    with pytest.raises(UpstreamError) as caught:
        await read_all(reader([b"data: " + b"z" * 10_000 + b"\n\n"], limits))
    assert caught.value.error_class is ErrorClass.TOO_LARGE
    many = b"data: small\n\n" * 2000  # 26 KB in one read, each event tiny
    assert b"".join(await read_all(reader([many], limits))) == many


async def test_time_counts_between_events_not_bytes() -> None:
    limits = StreamLimits(idle_timeout_s=0.3, total_timeout_s=None, max_event_bytes=1 << 20)
    # A byte every 50 ms never completes an event within 0.3 s.
    trickle = [bytes([b]) for b in b"data: this event never ends in time\n\n"]
    events = reader(trickle, limits, gap_s=0.05)
    with pytest.raises(UpstreamError) as caught:
        await events.read_block()
    assert caught.value.error_class is ErrorClass.TIMEOUT
    assert "no event" in caught.value.message


async def test_total_stream_deadline() -> None:
    limits = StreamLimits(idle_timeout_s=5.0, total_timeout_s=0.3, max_event_bytes=1 << 20)
    events = reader([b"data: {}\n\n"] * 1000, limits, gap_s=0.02)
    with pytest.raises(UpstreamError) as caught:
        await read_all(events)
    assert caught.value.error_class is ErrorClass.TIMEOUT
    assert "ran past" in caught.value.message
