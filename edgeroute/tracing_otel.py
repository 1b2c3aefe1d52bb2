"""The spans themselves; imported only when tracing is on (see `edgeroute.tracing`).

One trace per client request:
  server span   `POST /v1/chat/completions`: route, strategy, status, attempts; failovers
                as `edgeroute.failover` events (from and to target, cause), and the breaker
                transitions this request's own attempts caused as `edgeroute.breaker` events
  ├─ decision   `edgeroute.decide`, one per state decide: chosen target, score, reason,
  │             candidate count, shared state live/degraded/local; a half-open probe
  │             admission as a `edgeroute.breaker.probe` event
  └─ client     `chat <model>`, one per upstream attempt, OpenTelemetry GenAI conventions;
                its context goes upstream as `traceparent`
Breaker transitions are seen by the breaker poller, off any request: each becomes a short
`edgeroute.breaker` span carrying an `edgeroute.breaker.transition` event.

The state scripts do not say which outcome moved a breaker, so a request reads the target
back once its own outcome is applied (a failed attempt's outcome by the next decide, the
last one by the recorder: the server span then ends a moment later, with the end time of the
response): its result moved the breaker when the breaker is now one generation past the one
the attempt was admitted at, in the state that result leads to (a failure: open; a probe's
success: closed). Only traced requests with such an attempt pay that read. Requests that
failed on one target at once may each carry the event of the one transition they caused
together.

Spans are parented explicitly (never through the global context), so nothing here depends
on which task or callback runs the code. Attributes never carry keys, bodies or headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
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
from edgeroute.recorder import Recorder
from edgeroute.state.base import RouteSpec, StateBackend
from edgeroute.strategy import Candidate, RoutingDecision
from edgeroute.types import Admission, CircuitState, OutcomeKind, TargetSpec

# gen_ai.operation.name per endpoint, gen_ai.system per adapter kind (semconv values).
_OPERATIONS = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings"}
_SYSTEMS = {"openai": "openai", "azure": "az.ai.openai", "anthropic": "anthropic"}


class _ResponseModel(msgspec.Struct):
    model: str | None = None


_MODEL_DECODER = msgspec.json.Decoder(_ResponseModel)
# How long the end of a traced request waits for its last outcome to reach the state.
_READ_BACK_TIMEOUT_S = 2.0


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


@dataclass(frozen=True, slots=True)
class _BreakerCheck:
    """An attempt whose result may have moved its target's breaker: read back once applied."""

    route: RouteSpec
    target: str
    generation: int  # the breaker generation the attempt was admitted at
    before: CircuitState
    after: CircuitState  # the state this result leads to, if it moved the breaker


# Ends of requests still reading breakers back: a reference until done.
_FINISHING: set[asyncio.Task[None]] = set()


class RequestTrace:
    """The spans of one client request."""

    __slots__ = (
        "_admitted",
        "_attempts",
        "_checks",
        "_context",
        "_recorder",
        "_route",
        "_state",
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
        # The last admission, with its target's breaker state then; attempts to read back.
        self._admitted: tuple[RouteSpec, Admission, CircuitState] | None = None
        self._checks: list[_BreakerCheck] = []
        self._state: StateBackend | None = None
        self._recorder: Recorder | None = None
        tracing.set_trace_id(self.trace_id)

    def observer(self, delegate: Observer, state: StateBackend, recorder: Recorder) -> Observer:
        """The engine's observer for this request; `state` and `recorder` are where its
        outcomes go, read back for the breaker transitions they caused."""
        self._state, self._recorder = state, recorder
        return _TracingObserver(self, delegate, state)

    # ---- one upstream attempt ----------------------------------------------------------

    async def attempt(
        self,
        candidate: Candidate,
        upstream: UpstreamRequest,
        adapter: ProviderAdapter,
    ) -> UpstreamReply | UpstreamStream:
        if self._checks:  # the previous attempt's outcome came with the decide for this one
            await self._read_breakers()
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
        self._result(OutcomeKind.FAILURE if error is not None else OutcomeKind.SUCCESS)
        _set_usage(span, usage)
        if error is not None:
            span.set_attribute("error.type", error)
            span.set_status(StatusCode.ERROR, error)
        span.end()

    # ---- the request's end -------------------------------------------------------------

    def end(self, status: int) -> None:
        if self._stream_span is not None:  # a stream cut short by cancellation
            self.stream_ended(Usage(), "cancelled")
        elif self._admitted is not None and status < 400:
            self._result(OutcomeKind.SUCCESS)  # a reply (a stream says so when it ends)
        span = self.span
        span.set_attribute("http.response.status_code", status)
        span.set_attribute("edgeroute.attempts", self._attempts)
        if status >= 500:
            span.set_attribute("error.type", str(status))
            span.set_status(StatusCode.ERROR)
        if not self._checks:
            span.end()
            return
        # The last outcome goes to the state through the recorder: read the breaker back
        # once it is there, then end the span at the time the response ended.
        task = asyncio.get_running_loop().create_task(self._finish(time.time_ns()))
        _FINISHING.add(task)
        task.add_done_callback(_FINISHING.discard)

    async def _finish(self, end_time: int) -> None:
        try:
            # A state too slow to take the record costs the event, never the span.
            with contextlib.suppress(TimeoutError):
                if self._recorder is not None:
                    await asyncio.wait_for(self._recorder.written(), _READ_BACK_TIMEOUT_S)
                await self._read_breakers()
        finally:
            self.span.end(end_time=end_time)

    # ---- breakers this request moved -----------------------------------------------------

    def _result(self, kind: OutcomeKind) -> None:
        """The last admitted attempt ended so: queue a read-back if it may move a breaker."""
        admitted, self._admitted = self._admitted, None
        if admitted is None:
            return
        route, admission, before = admitted
        if kind is OutcomeKind.FAILURE:
            after = CircuitState.OPEN  # from closed at the threshold, or a failed probe
        elif kind is OutcomeKind.SUCCESS and admission.probe:
            after = CircuitState.CLOSED  # a half-open probe's success may close it
        else:
            return
        self._checks.append(
            _BreakerCheck(route, admission.target_id, admission.generation, before, after)
        )

    async def _read_breakers(self) -> None:
        checks, self._checks = self._checks, []
        if self._state is None:
            return
        with contextlib.suppress(Exception):  # state trouble is counted by the state layer
            for check in checks:
                snapshot = await self._state.snapshot(check.route)
                now = next(t for t in snapshot.targets if t.target_id == check.target)
                if now.generation == check.generation + 1 and now.state is check.after:
                    self.span.add_event(
                        "edgeroute.breaker",
                        {
                            "edgeroute.route": check.route.name,
                            "edgeroute.target": check.target,
                            "edgeroute.breaker.from": check.before.value,
                            "edgeroute.breaker.to": check.after.value,
                            "edgeroute.breaker.generation": now.generation,
                        },
                    )

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

    def _failover(self, last: Attempt, to: TargetSpec) -> None:
        self.span.add_event(
            "edgeroute.failover",
            {
                "edgeroute.from_target": last.target.id,
                "edgeroute.from_provider": last.provider,
                "edgeroute.to_target": to.id,
                "edgeroute.to_provider": to.provider,
                "error.type": last.error,  # the cause
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

    __slots__ = ("_delegate", "_state", "_trace")

    def __init__(self, trace: RequestTrace, delegate: Observer, state: StateBackend) -> None:
        self._trace = trace
        self._delegate = delegate
        self._state = state

    def decided(self, route: RouteSpec, decision: RoutingDecision, elapsed_s: float) -> None:
        self._delegate.decided(route, decision, elapsed_s)
        self._trace._decided(route, decision, elapsed_s, self._state.health().shared_state)
        if decision.admission is not None and decision.candidates:
            self._trace._admitted = (route, decision.admission, decision.chosen.state)

    def attempt_failed(
        self, route: RouteSpec, target: TargetSpec, failure: Failure, elapsed_s: float
    ) -> None:
        self._delegate.attempt_failed(route, target, failure, elapsed_s)
        self._trace._result(failure.kind)

    def failover(self, route: RouteSpec, last: Attempt, to: TargetSpec) -> None:
        self._delegate.failover(route, last, to)
        self._trace._failover(last, to)

    def fallback(self, route: RouteSpec, to: RouteSpec, cause: Cause) -> None:
        self._delegate.fallback(route, to, cause)
        self._trace._fallback(route, to, cause)


__all__ = ["RequestTrace", "Tracer"]
