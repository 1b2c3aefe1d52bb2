"""Repeated identical log errors, rate-limited: one line per kind per window, then a count.

Under attack or resource exhaustion the same error can fire thousands of times a second
(every refused `accept()` on EMFILE used to log a full traceback): the log grows by tens of
megabytes, the disk and the log pipeline suffer, and the one useful line drowns. Records at
WARNING and above that share a logger, a level, a message template and an exception type
are let through once per `window_s`; the first one after a quiet window says how many were
dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RepeatFilter(logging.Filter):
    """Passes the first of identical WARNING+ records per window; counts the rest."""

    def __init__(
        self,
        window_s: float = 10.0,
        *,
        max_kinds: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.window_s = window_s
        self.max_kinds = max_kinds  # bounded memory whatever varies in the messages
        self._clock = clock
        self._seen: dict[tuple[object, ...], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        exc_type = record.exc_info[0] if record.exc_info else None
        key = (record.name, record.levelno, str(record.msg), exc_type)
        now = self._clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.window_s:
            self._seen[key] = (seen[0], seen[1] + 1)
            return False
        if seen is None and len(self._seen) >= self.max_kinds:
            self._forget(now)
        if seen is not None and seen[1]:
            record.msg = f"{record.msg} [{seen[1]} identical messages suppressed]"
        self._seen[key] = (now, 0)
        return True

    def _forget(self, now: float) -> None:
        expired = [k for k, (since, _) in self._seen.items() if now - since >= self.window_s]
        for key in expired or list(self._seen)[: len(self._seen) // 2]:
            del self._seen[key]


def install(window_s: float = 10.0) -> RepeatFilter:
    """Attach one shared RepeatFilter to the root logger's handlers.

    On the handlers, not on loggers: a logger's filters see only records logged on that very
    logger, while every logger's records (ours, aiohttp's, asyncio's) reach the root handlers.
    Installing again replaces the previous filter.
    """
    shared = RepeatFilter(window_s)
    for handler in logging.getLogger().handlers:
        for existing in [f for f in handler.filters if isinstance(f, RepeatFilter)]:
            handler.removeFilter(existing)
        handler.addFilter(shared)
    return shared
