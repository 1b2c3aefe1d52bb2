"""OpenTelemetry tracing, optional and configured only by the standard `OTEL_*` variables.

Tracing is on when the `otel` extra is installed (`pip install 'edgeroute[otel]'`), an OTLP
endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`),
`OTEL_SDK_DISABLED` is not `true` and `OTEL_TRACES_EXPORTER` is not `none`. Everything else
(`OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_BSP_*`, `OTEL_PROPAGATORS`) is read by the SDK itself.
An endpoint is required on purpose: an image built with the extra must not make every
replica retry exports to localhost:4318 where no collector listens.

This module never imports OpenTelemetry: `TRACER` is None when tracing is off, and the
request path checks it once per request, so tracing off costs one global read.
"""

from __future__ import annotations

import contextvars
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeroute.tracing_otel import Tracer

log = logging.getLogger("edgeroute.tracing")

TRACER: Tracer | None = None

# The trace id of the request this task serves, for its access line. Set only when tracing
# is on; aiohttp runs each request in its own task, so the value never leaks across requests.
_TRACE_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "edgeroute_trace_id", default=None
)


def wanted(env: Mapping[str, str]) -> bool:
    """Whether the environment asks for traces (the SDK's own switches, nothing new)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if exporter == "none":
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def configure(env: Mapping[str, str] | None = None) -> bool:
    """Turn tracing on for this process if the environment asks for it. True when on."""
    global TRACER
    env = os.environ if env is None else env
    if TRACER is not None or not wanted(env):
        return TRACER is not None
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if protocol.strip() != "http/protobuf":
        log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s: edgeroute exports http/protobuf", protocol)
    try:
        from edgeroute.tracing_otel import Tracer
    except ImportError:
        log.warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but tracing is off: "
            "the otel extra is not installed (pip install 'edgeroute[otel]')"
        )
        return False
    TRACER = Tracer.from_env(env)
    return True


def shutdown() -> None:
    """Flush and stop the exporter (blocks up to the SDK's export timeout)."""
    global TRACER
    tracer, TRACER = TRACER, None
    if tracer is not None:
        tracer.shutdown()


def current_trace_id() -> str | None:
    """The trace id of the request being served, for its access line; None when off."""
    if TRACER is None:
        return None
    return _TRACE_ID.get()


def set_trace_id(trace_id: str) -> None:
    _TRACE_ID.set(trace_id)


def breaker_transition(route: str, target: str, to: str, generation: int) -> None:
    """A breaker moved (seen by the breaker poller, off the request path)."""
    if TRACER is not None:
        TRACER.breaker_transition(route, target, to, generation)


__all__ = [
    "TRACER",
    "breaker_transition",
    "configure",
    "current_trace_id",
    "shutdown",
    "wanted",
]
