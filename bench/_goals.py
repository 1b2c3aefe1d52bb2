"""The PASS/MISS table every benchmark prints: a figure next to its target, never an assert."""

from __future__ import annotations

from typing import Any


class Goals:
    """Collects goal rows; `rows` is what the benchmarks print and put in their JSON."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, name: str, value: float | None, goal: float, unit: str, higher: bool) -> None:
        """`higher`: the figure should be at least `goal` (else at most). None: not measured."""
        if value is None:
            status = "n/a"
        else:
            status = "PASS" if (value >= goal if higher else value <= goal) else "MISS"
        self.rows.append(
            {
                "name": name,
                "value": value,
                "goal": goal,
                "unit": unit,
                "comparison": ">=" if higher else "<=",
                "status": status,
            }
        )
