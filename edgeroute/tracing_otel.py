"""The spans themselves; imported only when tracing is on (see `edgeroute.tracing`).

One trace per client request:
  server span   `POST /v1/chat/completions`: route, strategy, status, attempts; failovers
                as `edgeroute.failover` events
  ├─ decision   `edgeroute.decide`, one per state decide: chosen target, score, reason,
  │             candidate count, shared state live/degraded/local; a half-open probe
  │             admission as a `edgeroute.breaker.probe` event
  └─ client     `chat <model>`, one per upstream attempt, OpenTelemetry GenAI conventions;
                its context goes upstream as `traceparent`
Breaker transitions are seen by the breaker poller, off any request: each becomes a short
`edgeroute.breaker` span carrying an `edgeroute.breaker.transition` event.

Spans are parented explicitly (never through the global context), so nothing here depends
on which task or callback runs the code. Attributes never carry keys, bodies or headers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

import msgspec
from aiohttp import web
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, StatusCode

from edgeroute import __version__, tracing
from edgeroute.failover import Attempt, Cause, Failure, Observer
from edgeroute.providers.base import (
    ProviderAdapter,
    UpstreamError,
    UpstreamReply,
    UpstreamRequest,
    UpstreamStream,
    Usage,
)
from edgeroute.state.base import RouteSpec, StateHealth
from edgeroute.strategy import Candidate, RoutingDecision
from edgeroute.types import TargetSpec

# gen_ai.operation.name per endpoint, gen_ai.system per adapter kind (semconv values).
_OPERATIONS = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings"}
_SYSTEMS = {"openai": "openai", "azure": "az.ai.openai", "anthropic": "anthropic"}


class _ResponseModel(msgspec.Struct):
    model: str | None = None


_MODEL_DECODER = msgspec.json.Decoder(_ResponseModel)


def _response_model(body: bytes) -> str | None:
    try:
        return _MODEL_DECODER.decode(body).model
    except msgspec.DecodeError:
        return None


def _error_type(exc: BaseException) -> str:
    if isinstance(exc, UpstreamError):
        return exc.error_class.value
    if isinstance(exc, TimeoutError):
        return "timeout"
    return type(exc).__qualname__


def _server_address(adapter: ProviderAdapter) -> tuple[str | None, int | None]:
    config = getattr(adapter, "config", None)
    url = getattr(config, "base_url", None)
    if not isinstance(url, str):
        return None, None
    parts = urlsplit(url)  # hostname and port only: userinfo (a credential) never leaves
    try:
        return parts.hostname, parts.port
    except ValueError:
        return parts.hostname, None


class Tracer:
    """The process's tracer provider, OTLP/HTTP exporter and batch processor."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("edgeroute", __version__)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Tracer:
        attributes: dict[str, str] = {"service.version": __version__}
        if not env.get("OTEL_SERVICE_NAME") and "service.name=" not in env.get(
            "OTEL_RESOURCE_ATTRIBUTES", ""
        ):
            attributes["service.name"] = "edgeroute"
        # The sampler comes from OTEL_TRACES_SAMPLER (default: parent-based, always on).
        provider = TracerProvider(resource=Resource.create(attributes))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return cls(provider)

    def request(self, http: web.Request, endpoint: str) -> RequestTrace:
        return RequestTrace(self.tracer, http, endpoint)

    def breaker_transition(self, route: str, target: str, to: str, generation: int) -> None:
        attributes: dict[str, str | int] = {
            "edgeroute.route": route,
            "edgeroute.target": target,
            "edgeroute.breaker.state": to,
            "edgeroute.breaker.generation": generation,
        }
        span = self.tracer.start_span(
            "edgeroute.breaker", context=Context(), kind=SpanKind.INTERNAL, attributes=attributes
        )
        span.add_event("edgeroute.breaker.transition", attributes)
        span.end()

    def shutdown(self) -> None:
        self.provider.shutdown()


class RequestTrace:
    """The spans of one client request."""

    __slots__ = (
        "_attempts",
        "_context",
        "_route",
        "_stream_span",
        "_tracer",
        "span",
        "trace_id",
    )

    def __init__(self, tracer: trace.Tracer, http: web.Request, endpoint: str) -> None:
        self._tracer = tracer
        parent = propagate.extract(http.headers)  # the client's traceparent, if any
        self.span = tracer.start_span(
            f"{http.method} {http.path}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": http.method,
                "http.route": http.path,
                "url.path": http.path,
                "gen_ai.operation.name": _OPERATIONS.get(endpoint, endpoint),
            },
        )
        self._context = trace.set_span_in_context(self.span)
        self.trace_id = format(self.span.get_span_context().trace_id, "032x")
        self._attempts = 0
        self._route: str | None = None  # the route of the latest decide: attempts run there
        self._stream_span: Span | None = None
        tracing.set_trace_id(self.trace_id)

    def observer(self, delegate: Observer, health: Callable[[], StateHealth]) -> Observer:
        return _TracingObserver(self, delegate, health)

    # ---- one upstream attempt ----------------------------------------------------------

    async def attempt(
        self,
        candidate: Candidate,
        upstream: UpstreamRequest,
        adapter: ProviderAdapter,
    ) -> UpstreamReply | UpstreamStream:
        target = candidate.target
        self._attempts += 1
        operation = _OPERATIONS.get(upstream.endpoint, upstream.endpoint)
        host, port = _server_address(adapter)
        attributes: dict[str, str | int] = {
            "gen_ai.operation.name": operation,
            "gen_ai.system": _SYSTEMS.get(adapter.kind, adapter.kind),
            "gen_ai.request.model": target.model,
            "edgeroute.provider": target.provider,
            "edgeroute.target": target.id,
            "edgeroute.attempt": self._attempts,
        }
        if self._route is not None:
            attributes["edgeroute.route"] = self._route
        if host:
            attributes["server.address"] = host
        if port:
            attributes["server.port"] = port
        span = self._tracer.start_span(
            f"{operation} {target.model}",
            context=self._context,
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span, self._context))
        upstream.extra_headers = carrier
        started = time.perf_counter()
        try:
            result = await adapter.send(upstream)
        except BaseException as exc:
            error = _error_type(exc)
            span.set_attribute("error.type", error)
            if isinstance(exc, UpstreamError) and exc.status is not None:
                span.set_attribute("http.response.status_code", exc.status)
            span.set_status(StatusCode.ERROR, error)
            span.end()
            raise
        finally:
            upstream.extra_headers = None
        span.set_attribute("http.response.status_code", result.status)
        if isinstance(result, UpstreamReply):
            span.set_attribute(
                "gen_ai.response.model", _response_model(result.body) or target.model
            )
            _set_usage(span, result.usage)
            span.end()
            return result
        # A stream: the span lasts until the stream ends (tokens are known only then).
        ttft = time.perf_counter() - started
        span.set_attribute("gen_ai.response.model", target.model)
        span.set_attribute("gen_ai.server.time_to_first_token", ttft)
        span.add_event("gen_ai.first_token")
        self._stream_span = span
        return result

    def stream_ended(self, usage: Usage, error: str | None) -> None:
        span, self._stream_span = self._stream_span, None
        if span is None:
            return
        _set_usage(span, usage)
        if error is not None:
            span.set_attribute("error.type", error)
            span.set_status(StatusCode.ERROR, error)
        span.end()

    # ---- the request's end -------------------------------------------------------------

    def end(self, status: int) -> None:
        if self._stream_span is not None:  # a stream cut short by cancellation
            self.stream_ended(Usage(), "cancelled")
        span = self.span
        span.set_attribute("http.response.status_code", status)
        span.set_attribute("edgeroute.attempts", self._attempts)
        if status >= 500:
            span.set_attribute("error.type", str(status))
            span.set_status(StatusCode.ERROR)
        span.end()

    def _decided(
        self, route: RouteSpec, decision: RoutingDecision, elapsed_s: float, shared_state: str
    ) -> None:
        server = self.span
        # With a fallback chain the last decide's route is the one that served.
        self._route = route.name
        server.set_attribute("edgeroute.route", route.name)
        server.set_attribute("edgeroute.strategy", route.strategy.kind)
        end = time.time_ns()
        attributes: dict[str, str | int | float | bool] = {
            "edgeroute.route": route.name,
            "edgeroute.strategy": route.strategy.kind,
            "edgeroute.decision.candidates": decision.admissible,
            "edgeroute.shared_state": shared_state,
        }
        admission = decision.admission
        if admission is not None and decision.candidates:
            chosen = decision.chosen
            attributes["edgeroute.decision.target"] = chosen.target.id
            attributes["edgeroute.decision.provider"] = chosen.target.provider
            attributes["edgeroute.decision.score"] = chosen.score
            attributes["edgeroute.decision.reason"] = decision.reason
            attributes["edgeroute.breaker.state"] = chosen.state.value
        else:
            attributes["edgeroute.decision.retry_after_s"] = decision.retry_after_s
        span = self._tracer.start_span(
            "edgeroute.decide",
            context=self._context,
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            start_time=end - int(elapsed_s * 1e9),
        )
        if admission is not None and admission.probe:
            span.add_event(
                "edgeroute.breaker.probe",
                {"edgeroute.target": admission.target_id, "edgeroute.breaker.state": "half_open"},
            )
        span.end(end_time=end)

    def _failover(self, last: Attempt) -> None:
        self.span.add_event(
            "edgeroute.failover",
            {
                "edgeroute.from_target": last.target.id,
                "edgeroute.from_provider": last.provider,
                "error.type": last.error,
            },
        )

    def _fallback(self, route: RouteSpec, to: RouteSpec, cause: Cause) -> None:
        # The server span's `edgeroute.route` follows the decides: the serving route.
        self.span.add_event(
            "edgeroute.fallback",
            {
                "edgeroute.from_route": route.name,
                "edgeroute.to_route": to.name,
                "edgeroute.fallback.cause": cause,
            },
        )


def _set_usage(span: Span, usage: Usage) -> None:
    span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)


class _TracingObserver:
    """The engine's observer for a traced request: metrics as usual, plus spans and events."""

    __slots__ = ("_delegate", "_health", "_trace")

    def __init__(
        self, trace: RequestTrace, delegate: Observer, health: Callable[[], StateHealth]
    ) -> None:
        self._trace = trace
        self._delegate = delegate
        self._health = health

    def decided(self, route: RouteSpec, decision: RoutingDecision, elapsed_s: float) -> None:
        self._delegate.decided(route, decision, elapsed_s)
        self._trace._decided(route, decision, elapsed_s, self._health().shared_state)

    def attempt_failed(
        self, route: RouteSpec, target: TargetSpec, failure: Failure, elapsed_s: float
    ) -> None:
        self._delegate.attempt_failed(route, target, failure, elapsed_s)

    def failover(self, route: RouteSpec, last: Attempt) -> None:
        self._delegate.failover(route, last)
        self._trace._failover(last)

    def fallback(self, route: RouteSpec, to: RouteSpec, cause: Cause) -> None:
        self._delegate.fallback(route, to, cause)
        self._trace._fallback(route, to, cause)


__all__ = ["RequestTrace", "Tracer"]
