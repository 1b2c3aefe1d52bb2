"""How many replicas share the limits, and what a limit does while Redis is away.

The count is the fleet view's (edgeroute/fleet.py): every replica writes a heartbeat under
`{prefix:#fleet}` every few seconds and reads how many are live; that one writer feeds both
/admin/fleet and this count. The last count seen is kept while Redis is unreachable. A
limit's `on_state_loss` then says how the replica counts on its own:

- `local_share` (default): its share, the limit divided by the live replicas (at least 1),
  so the fleet as a whole stays near the limit without talking;
- `fail_open`: no limit while shared state is away (availability first);
- `fail_closed`: nothing admitted under that limit until shared state is back.
"""

from __future__ import annotations


class Replicas:
    """The live replica count as the fleet heartbeat last read it (1 without Redis)."""

    __slots__ = ("live",)

    def __init__(self, live: int = 1) -> None:
        self.live = live

    def seen(self, count: int) -> None:
        """A fleet read counted `count` live heartbeats (this replica's own among them)."""
        self.live = max(1, count)

    def share(self, limit: int) -> int:
        """This replica's part of a fleet-wide `limit` (never 0: 0 means no limit)."""
        return max(1, limit // max(1, self.live))
