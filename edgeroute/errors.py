"""The error hierarchy callers catch: routing errors for the library, ConfigError for loaders."""

from __future__ import annotations


class EdgerouteError(Exception):
    """Base of every error edgeroute raises on purpose."""


class ConfigError(EdgerouteError, ValueError):
    """A configuration problem; the message is one line that names the `$.path` at fault."""


class RoutingError(EdgerouteError):
    """A request could not be routed to a healthy target."""


class NoProvidersAvailable(RoutingError):
    """Every target of the route is excluded right now (open breaker, cooldown, probes taken).

    `retry_after_s` is the shortest wait after which some target may be admitted again.
    """

    def __init__(self, route: str, retry_after_s: float, detail: str = "") -> None:
        self.route = route
        self.retry_after_s = retry_after_s
        message = f"no provider available for route {route!r}; retry after {retry_after_s:.3f}s"
        super().__init__(f"{message}: {detail}" if detail else message)


class AllProvidersFailed(RoutingError):
    """Every attempt of a request failed; `attempts` lists (provider, model, error class)."""

    def __init__(self, route: str, attempts: list[tuple[str, str, str]]) -> None:
        self.route = route
        self.attempts = attempts
        tried = ", ".join(f"{p}/{m}: {cls}" for p, m, cls in attempts) or "nothing tried"
        super().__init__(f"all providers failed for route {route!r} ({tried})")


class CircuitBreakerOpen(RoutingError):
    """The breaker guarding `provider` refuses calls until its open timeout ends."""

    def __init__(self, provider: str, retry_after_s: float = 0.0) -> None:
        self.provider = provider
        self.retry_after_s = retry_after_s
        super().__init__(f"circuit breaker open for {provider!r}")


class StateUnavailable(EdgerouteError):
    """The shared state backend did not answer within its timeout (or refused the call).

    The gateway reacts by routing on local state until the backend comes back.
    """
