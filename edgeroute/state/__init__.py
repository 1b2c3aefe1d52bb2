"""State backends: `MemoryState` (one process) and `RedisState` (a fleet), one contract.

`build_state` is the one place that turns a config into a backend: the gateway, the CLI,
the library's `Router` and the benchmarks all get theirs from it.
"""

from __future__ import annotations

from collections.abc import Callable

from edgeroute.config import StateConfig
from edgeroute.errors import ConfigError
from edgeroute.state.base import RouteSpec, StateBackend, StateHealth, StateView
from edgeroute.state.fallback import FallbackState
from edgeroute.state.memory import MemoryState
from edgeroute.state.redis import RedisState


def build_state(
    config: StateConfig,
    *,
    degrade: bool = True,
    min_timeout_ms: float = 0.0,
    on_change: Callable[[bool], None] | None = None,
    on_error: Callable[[str], None] | None = None,
    on_latency: Callable[[str, float], None] | None = None,
    on_repair: Callable[[int], None] | None = None,
) -> StateBackend:
    """No Redis URL: in-memory state. Otherwise the fleet-wide Redis state, wrapped for
    degraded mode unless `degrade` is false (the CLI wants Redis's answer or an error).

    `min_timeout_ms` raises the per-call timeout for callers that can afford to wait (the
    CLI); the callbacks feed metrics: degraded on/off, failed calls, call latency, keys of
    the wrong type replaced.
    """
    url = config.redis_url
    if not url:
        return MemoryState()
    try:
        redis = RedisState(
            url,
            key_prefix=config.key_prefix,
            timeout_ms=max(config.timeout_ms, min_timeout_ms),
            cluster=config.cluster,
            on_repair=on_repair,
        )
    except (ValueError, OSError) as exc:  # bad URL, unreadable CA file
        raise ConfigError(f"$.state.redis_url: {exc}") from None
    if not degrade:
        return redis
    return FallbackState(redis, on_change=on_change, on_error=on_error, on_latency=on_latency)


__all__ = [
    "FallbackState",
    "MemoryState",
    "RedisState",
    "RouteSpec",
    "StateBackend",
    "StateHealth",
    "StateView",
    "build_state",
]
