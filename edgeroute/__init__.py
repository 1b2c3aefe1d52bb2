"""edgeroute: a cluster-consistent LLM routing gateway and the routing library under it."""

from edgeroute.breaker import CircuitBreaker
from edgeroute.config import Config, load_config, loads_config
from edgeroute.errors import (
    AllProvidersFailed,
    CircuitBreakerOpen,
    ConfigError,
    EdgerouteError,
    NoProvidersAvailable,
    RoutingError,
    StateUnavailable,
)
from edgeroute.router import AttemptFailed, Router, UnknownRoute
from edgeroute.state import MemoryState, RedisState
from edgeroute.strategy import Candidate, RoutingDecision, RoutingStrategy
from edgeroute.types import Admission, CircuitState, Outcome, OutcomeKind

__version__ = "0.1.0"

__all__ = [
    "Admission",
    "AllProvidersFailed",
    "AttemptFailed",
    "Candidate",
    "CircuitBreaker",
    "CircuitBreakerOpen",
    "CircuitState",
    "Config",
    "ConfigError",
    "EdgerouteError",
    "MemoryState",
    "NoProvidersAvailable",
    "Outcome",
    "OutcomeKind",
    "RedisState",
    "Router",
    "RoutingDecision",
    "RoutingError",
    "RoutingStrategy",
    "StateUnavailable",
    "UnknownRoute",
    "__version__",
    "load_config",
    "loads_config",
]
