"""The Lua wire contract, written once: every ARGV field and reply field of every script.

Python packs arguments and decodes replies from these tuples, and each script's header
comment lists the same names (`tests/test_wire_contract.py` holds the two equal), so a field
added on one side and not the other fails a test instead of shifting every field after it.

Codes that cross the wire (breaker states, outcome kinds, strategies, exclusion reasons)
are defined here and nowhere else in Python; `lua/lib.lua` declares the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgeroute.types import CircuitState, OutcomeKind

# ---- codes -------------------------------------------------------------------------------

STATE_CODES: tuple[CircuitState, ...] = (
    CircuitState.CLOSED,  # 0
    CircuitState.OPEN,  # 1
    CircuitState.HALF_OPEN,  # 2
)
STATE_CODE = {state: code for code, state in enumerate(STATE_CODES)}

STRATEGY_CODES: dict[str, int] = {
    "cost": 0,
    "latency": 1,
    "hybrid": 2,
    "round_robin": 3,
    "least_busy": 4,
    "priority": 5,
    "weighted": 6,
}

# Why a target is not admissible right now (0: it is). Decide and explain report these;
# nothing else re-derives them.
EXCLUSION_REASONS: tuple[str | None, ...] = (
    None,  # 0 admissible
    "breaker_open",  # 1 until its open timeout ends
    "rate_limited",  # 2 a Retry-After cooldown is in force
    "probes_full",  # 3 half-open, every probe reservation is taken
    "quota_concurrency",  # 4 targets[].max_concurrency requests in flight fleet-wide
    "quota_rpm",  # 5 targets[].rpm requests admitted in the last minute
    "quota_tpm",  # 6 targets[].tpm tokens (reserved, then corrected) in the last minute
    "learned_limit",  # 7 the provider's rate-limit headers said 0 remaining until a reset
)
# A decide that admits nothing because of one of these answers 429, not 503.
QUOTA_REASONS = frozenset(("quota_concurrency", "quota_rpm", "quota_tpm", "learned_limit"))

# Decide modes: what a call may change.
MODE_DECIDE = 0  # admit the best target (a failover: the cursor stays)
MODE_ADVANCE = 1  # admit the best target and advance the round-robin cursor (first decide)
MODE_EXPLAIN = 2  # change nothing; rank as the next advancing decide would, report every target

# ---- arguments ---------------------------------------------------------------------------

# ARGV[1..] of every script: the route's parameters (static per route, encoded once).
ROUTE_PARAMS = (
    "strategy",
    "w_cost",
    "w_latency",
    "w_reliability",
    "failure_threshold",
    "open_timeout_ms",
    "success_threshold",
    "half_open_max_probes",
    "max_open_timeout_ms",
    "probe_ttl_ms",
    "bucket_ms",
    "buckets",
    "lease_ttl_ms",
    "key_ttl_ms",
    "max_cooldown_ms",
    "half_life_ms",
    "explore_after_ms",
    "explore_max",
    "explore_every",
    "explore_ttl_ms",
    "load_penalty",
    "tolerance",
    "within",  # strategy priority: the code of the strategy inside a group (else -1)
    "breaker_scope",  # 0: a breaker per target; 1: per provider (KEYS[4], shared by routes)
    "affinity_ttl_ms",  # sticky sessions: a pin's idle lifetime (0: no affinity)
    "max_pins",  # sticky sessions: the most pins the route keeps
)

# One finished attempt, as decide (a failover's report) and record carry it.
OUTCOME_FIELDS = (
    "target_id",
    "kind",
    "latency_us",
    "generation",
    "token",
    "probe",
    "retry_after_ms",
    "input_tokens",
    "output_tokens",
    "reserved_tokens",  # what the decide reserved against the target's tpm (0: none)
    "reserved_at_ms",  # the decide's now_ms: the reservation's bucket
    "limit_reset_ms",  # a learned provider limit: out until this long from now (0: none)
    "provider",  # breaker_scope provider: the target's provider, whose breaker it moves
)

# What follows the route parameters, per script. `*` marks a repeated group: its count comes
# first. Every script's last ARGV is `clock_ms`: 0 means Redis TIME (always, in production);
# a positive value is a test clock (see RedisState's `clock`).
SCRIPT_ARGS: dict[str, tuple[str, ...]] = {
    "decide": (
        "n",
        "*(target_id price priority weight provider)",
        "q",
        "*(position rpm tpm max_concurrency)",
        "b",
        "*[request]",
        "clock_ms",
    ),
    "record": ("k", "*[outcome]", "clock_ms"),
    "reset": ("target_id", "provider", "clock_ms"),
    # server.clients[]: one key per client, {prefix:client:<name>}; no route parameters.
    "client": (
        "op",
        "rpm",
        "tpm",
        "max_concurrency",
        "budget_micro",
        "period",
        "token",
        "tokens",
        "reserved",
        "reserved_at_ms",
        "used_tokens",
        "cost_micro",
        "lease_ttl_ms",
        "key_ttl_ms",
        "clock_ms",
    ),
}
# One request of a decide batch (`b` of them, run in order by one script call).
DECIDE_REQUEST = (
    "mode",
    "token",
    "limit",
    "tokens",
    "session",
    "m",
    "*(excluded_id)",
    "has_outcome",
    "[outcome]",
)
# KEYS of the client script, in order (both share the client's hash tag: one slot).
CLIENT_KEYS = ("client", "leases")
CLIENT_OPS = {"admit": 0, "settle": 1, "read": 2}
CLIENT_PERIODS = {"day": 0, "month": 1}
# Why a client's request is refused (0: admitted).
CLIENT_REASONS: tuple[str | None, ...] = (
    None,
    "rpm",
    "tpm",
    "concurrency",
    "budget",
    "state_loss",  # shared state is away and the client's on_state_loss is fail_closed
)

# ---- replies -----------------------------------------------------------------------------

DECIDE_HEAD = (
    "admitted",
    "generation",
    "probe",
    "wait_ms",
    "rr_cursor",
    "count",
    "admissible",
    "now_ms",
    "repaired",  # keys of the wrong type this call replaced (0 but after tampering)
    "reserved",  # tokens the admission reserved against the target's tpm
    "quota_limited",  # 1: nothing admitted, and a quota or learned limit kept a target out
    "affinity",  # AFFINITY_STATES: what this decide did with the request's session pin
    "pin_from",  # a moved pin: the 1-based position of the target it left (0: none)
    "pins",  # explain: the route's live session pins
)
# One request's reply in a decide batch's reply (one per request, in order).
DECIDE_REPLY = (*DECIDE_HEAD, "*[candidate]", "*[target] (explain)")
# What a decide with a session key did with its pin (0: no affinity or no session key).
AFFINITY_STATES: tuple[str, ...] = ("", "new", "kept", "moved")
# One ranked candidate, best first (`count` of them). estimate_us and error_rate are the
# time-decayed estimate (strings: Redis truncates Lua numbers); estimate_us and
# estimate_age_ms are -1 for a target never measured; explore: this decide re-measures it;
# waiting_ms: how long it has had requests in flight and no answer (a lower bound on the
# oldest one's age), which ranks as a latency when it exceeds the estimate.
CANDIDATE_ROW = (
    "position",
    "state",
    "score",
    "successes",
    "latency_us",
    "failures",
    "inflight",
    "held",
    "estimate_us",
    "error_rate",
    "estimate_age_ms",
    "explore",
    "waiting_ms",
    "credit",  # strategy weighted: the round-robin credit it ranked by (0 otherwise)
)
# Explain mode only: one row per target in configuration order, after the candidates.
TARGET_ROW = (
    "state",
    "generation",
    "consecutive_failures",
    "half_open_successes",
    "open_remaining_ms",
    "open_timeout_ms",
    "cooldown_remaining_ms",
    "inflight",
    "probes_in_use",
    "successes",
    "failures",
    "latency_us",
    "input_tokens",
    "output_tokens",
    "excluded",
    "excluded_ms",
    "estimate_us",
    "error_rate",
    "estimate_age_ms",
    "explorations_in_use",
    "stale",
    "waiting_ms",
    "current_weight",  # strategy weighted: its smooth weighted round-robin current weight
)
SCRIPT_REPLIES: dict[str, tuple[str, ...]] = {
    "decide": ("*[reply]",),
    "record": ("applied", "repaired"),
    "reset": ("generation", "repaired"),
    "client": (
        "admitted",
        "reason",
        "wait_ms",
        "requests",
        "tokens",
        "inflight",
        "spent_micro",
        "reset_requests_ms",
        "reset_tokens_ms",
        "period_end_ms",
        "reserved",
        "now_ms",
    ),
}


class Row:
    """Named access into one flat reply row: `row[field]` reads by the wire table's name."""

    __slots__ = ("_index", "_values")

    def __init__(self, names: Sequence[str], values: Sequence[Any]) -> None:
        self._index = _INDEXES.setdefault(tuple(names), {n: i for i, n in enumerate(names)})
        self._values = values

    def __getitem__(self, name: str) -> Any:
        return self._values[self._index[name]]


_INDEXES: dict[tuple[str, ...], dict[str, int]] = {}


def rows(reply: Sequence[Any], start: int, names: Sequence[str], count: int) -> list[Row]:
    """`count` consecutive rows of `names` fields each, from `reply[start]` on."""
    width = len(names)
    return [Row(names, reply[start + i * width : start + (i + 1) * width]) for i in range(count)]


def outcome_kind_codes() -> dict[str, int]:
    """The outcome kinds by name, as lib.lua declares them (for the contract test)."""
    return {kind.name: int(kind) for kind in OutcomeKind}
