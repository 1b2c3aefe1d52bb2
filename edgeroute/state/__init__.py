"""State backends: `MemoryState` (one process) and `RedisState` (a fleet), one contract."""

from __future__ import annotations

from edgeroute.config import StateConfig
from edgeroute.errors import ConfigError
from edgeroute.state.base import RouteSpec, StateBackend
from edgeroute.state.memory import MemoryState
from edgeroute.state.redis import RedisState


def state_from_config(config: StateConfig) -> MemoryState | RedisState:
    """No Redis URL: in-memory state. Otherwise the fleet-wide Redis state."""
    if not config.redis_url:
        return MemoryState()
    try:
        return RedisState(
            config.redis_url,
            key_prefix=config.key_prefix,
            timeout_ms=config.timeout_ms,
            cluster=config.cluster,
        )
    except (ValueError, OSError) as exc:  # bad URL, unreadable CA file
        raise ConfigError(f"$.state.redis_url: {exc}") from None


__all__ = ["MemoryState", "RedisState", "RouteSpec", "StateBackend", "state_from_config"]
