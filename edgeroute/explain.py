"""One JSON schema for explanations: HTTP explain, `/admin/state`, CLI `explain --json` and
`edgeroute state --json` all render through these two functions."""

from __future__ import annotations

from typing import Any

from edgeroute.router import Explanation
from edgeroute.state.base import StateHealth


def explanation_json(explanation: Explanation) -> dict[str, Any]:
    """One route: what the next request would get and why, every target's state.

    `rank` is 1 for the next request's target (None: excluded); `rr_cursor` is the
    round-robin cursor the next request takes; `excluded` is the backend's reason code
    and `excluded_because` the same in words. `fallbacks` are the route's lists as
    configured; `fallback_chain` is the order of routes a request walks while each one is
    exhausted (this route first, each fallback's own fallbacks depth first).
    """
    strategy = explanation.strategy
    fallbacks = explanation.fallbacks
    spec = explanation.spec
    affinity = spec.affinity if spec is not None else None
    groups: dict[int, list[str]] = {}
    if strategy.kind == "priority":
        for item in explanation.targets:
            groups.setdefault(item.spec.priority, []).append(item.spec.id)
    return {
        "route": explanation.route,
        "strategy": strategy.kind,
        "weights": (
            {
                "cost": strategy.cost_weight,
                "latency": strategy.latency_weight,
                "reliability": strategy.reliability_weight,
            }
            if strategy.scoring == "hybrid"
            else None
        ),
        # strategy priority: the groups, lower first, and what orders each of them.
        "within": strategy.within or None,
        "priority_groups": (
            [{"priority": level, "targets": groups[level]} for level in sorted(groups)]
            if groups
            else None
        ),
        "breaker_scope": spec.breaker_scope if spec is not None else "target",
        # Sticky sessions: where the key comes from and the route's live pins (whether a
        # request's own pin moved is its x-edgeroute-affinity header: new, kept, moved).
        "affinity": (
            {
                "key": f"{affinity.source}:{affinity.name}",
                "ttl_s": affinity.ttl_ms / 1000,
                "max_pins": affinity.max_pins,
                "pins": explanation.snapshot.pins,
            }
            if affinity is not None
            else None
        ),
        "order": list(explanation.order),
        "reason": explanation.reason,
        "rr_cursor": explanation.snapshot.rr_cursor,
        "fallbacks": {
            "fallbacks": list(fallbacks.exhausted),
            "context_window_fallbacks": list(fallbacks.context_window),
            "content_policy_fallbacks": list(fallbacks.content_policy),
        },
        "fallback_chain": list(explanation.chain),
        "targets": [
            {
                "target": item.spec.id,
                "provider": item.spec.provider,
                "model": item.spec.model,
                "price_per_mtok": item.spec.price_per_mtok,
                "priority": item.spec.priority if strategy.kind == "priority" else None,
                # strategy weighted: its share and its smooth round-robin current weight
                # (the next request goes to the highest current weight plus weight).
                "weight": item.spec.weight if strategy.kind == "weighted" else None,
                "current_weight": (
                    item.snapshot.current_weight if strategy.kind == "weighted" else None
                ),
                # The target's provider quotas and what they do while Redis is away.
                "quota": (
                    {
                        "rpm": item.spec.rpm or None,
                        "tpm": item.spec.tpm or None,
                        "max_concurrency": item.spec.max_concurrency or None,
                        "on_state_loss": item.spec.on_state_loss,
                    }
                    if item.spec.has_quota
                    else None
                ),
                "breaker": item.snapshot.state.value,
                "generation": item.snapshot.generation,
                "consecutive_failures": item.snapshot.consecutive_failures,
                "half_open_successes": item.snapshot.half_open_successes,
                "open_remaining_ms": item.snapshot.open_remaining_ms,
                "open_timeout_ms": item.snapshot.open_timeout_ms,
                "cooldown_remaining_ms": item.snapshot.cooldown_remaining_ms,
                "in_flight": item.snapshot.inflight,
                "probes_in_use": item.snapshot.probes_in_use,
                "window": {
                    "successes": item.snapshot.successes,
                    "failures": item.snapshot.failures,
                    "latency_ms": item.snapshot.latency_ms,
                    "success_rate": item.snapshot.success_rate,
                    "input_tokens": item.snapshot.input_tokens,
                    "output_tokens": item.snapshot.output_tokens,
                },
                # What latency and hybrid rank by: the time-decayed estimate, how old it is,
                # and whether the exploration budget is re-measuring it.
                "estimate": {
                    "latency_ms": item.snapshot.estimate_ms,
                    "age_ms": item.snapshot.estimate_age_ms,
                    "error_rate": item.snapshot.error_rate,
                    "stale": item.snapshot.stale,
                    "explorations_in_flight": item.snapshot.explorations_in_use,
                    "waiting_ms": item.snapshot.waiting_ms,
                    "explored_next": item.explore,
                },
                "admissible": item.admissible,
                "excluded": item.snapshot.excluded,
                "excluded_for_ms": item.snapshot.excluded_ms,
                "excluded_because": item.excluded_because,
                "held": item.held,
                "score": item.score,
                "rank": item.rank,
            }
            for item in explanation.targets
        ],
    }


def state_document(health: StateHealth, explanations: list[Explanation]) -> dict[str, Any]:
    """Every route of a replica (or of the fleet, read from Redis), keyed by route name."""
    document: dict[str, Any] = {
        "state_backend": health.backend,
        "shared_state": health.shared_state,
    }
    if health.error:
        document["state_error"] = health.error
    document["routes"] = {e.route: explanation_json(e) for e in explanations}
    return document
