"""The request path: decode what routing needs, decide, attempt, fail over, answer, record.

The first attempt runs straight through; only once it has failed does the tenacity policy
(max attempts, a total deadline, jittered backoff after a whole round of candidates has
failed) take over. Every failover reports the failure and picks the next target in one
state call; everything else is recorded off the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import tenacity
from aiohttp import web

from edgeroute.config import Config
from edgeroute.errors import StateUnavailable
from edgeroute.failover import (
    Attempt,
    AttemptBudget,
    Exhausted,
    RequestContext,
    Retry,
    RoundBackoff,
)
from edgeroute.metrics import Metrics
from edgeroute.providers import (
    ProviderAdapter,
    UpstreamError,
    UpstreamReply,
    UpstreamRequest,
    UpstreamStream,
)
from edgeroute.providers.base import Endpoint, ErrorClass
from edgeroute.recorder import Recorder
from edgeroute.responses import (
    access_log,
    error_response,
    new_request_id,
    too_large,
    write_access_line,
)
from edgeroute.router import Router
from edgeroute.state.base import RouteSpec
from edgeroute.strategy import RoutingDecision
from edgeroute.types import Admission, Outcome, OutcomeKind

_encode = msgspec.json.encode
_FIELDS = msgspec.json.Decoder(dict[str, msgspec.Raw])
_STR = msgspec.json.Decoder(str)
_BOOL = msgspec.json.Decoder(bool)


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


_STREAM_OPTIONS = msgspec.json.Decoder(_StreamOptions)
_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


@dataclass(slots=True)
class _Served:
    decision: RoutingDecision
    admission: Admission
    result: UpstreamReply | UpstreamStream
    attempt_started: float
    first_byte: float


class Proxy:
    def __init__(
        self,
        config: Config,
        router: Router,
        adapters: dict[str, ProviderAdapter],
        recorder: Recorder,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.router = router
        self.adapters = adapters
        self.recorder = recorder
        self.metrics = metrics
        self.max_attempts = config.server.max_attempts
        self.deadline_s = config.server.request_timeout_s
        self.in_flight = 0
        metrics.in_flight.set_function(lambda: self.in_flight)  # read at scrape time

    # ---- entry -------------------------------------------------------------------------

    async def handle(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = request.headers.get("x-request-id") or new_request_id()
        self.in_flight += 1
        try:
            response = await self._handle(request, endpoint, request_id, started)
        finally:
            self.in_flight -= 1
        return response

    async def _handle(
        self, request: web.Request, endpoint: Endpoint, request_id: str, started: float
    ) -> web.StreamResponse:
        parsed = await self._parse(request, endpoint, request_id)
        if isinstance(parsed, web.Response):
            parsed.headers["x-request-id"] = request_id
            code = "model_not_found" if parsed.status == 404 else "invalid_request"
            self._complete(request_id, "", parsed.status, started, code, error=code)
            return parsed
        route, upstream_request = parsed
        context = RequestContext(route, upstream_request, started)
        try:
            served = await self._serve(context)
        except Exhausted as exhausted:
            return self._exhausted(context, exhausted, request_id)
        except UpstreamError as exc:  # not retryable: the client's own mistake, passed through
            return self._passthrough(context, exc, request_id)
        except asyncio.CancelledError:
            if context.pending is not None:
                self.recorder.submit(route, context.pending)
            self._complete(
                request_id,
                route.name,
                499,
                started,
                "client_disconnected",
                attempts=len(context.attempts),
                error="client_disconnected",
            )
            raise
        if isinstance(served.result, UpstreamReply):
            return self._reply(context, served, request_id)
        return await self._stream(request, context, served, request_id)

    async def _parse(
        self, request: web.Request, endpoint: Endpoint, request_id: str
    ) -> tuple[RouteSpec, UpstreamRequest] | web.Response:
        limit = self.config.server.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return too_large(limit)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return too_large(limit)
        if len(body) > limit:
            return too_large(limit)
        try:
            fields = _FIELDS.decode(body)
        except msgspec.DecodeError as exc:
            return error_response(
                400,
                f"request body is not a JSON object: {exc}",
                type_="invalid_request_error",
                code="invalid_json",
            )
        raw_model = fields.get("model")
        if raw_model is None:
            return error_response(
                400,
                "you must provide a model parameter",
                type_="invalid_request_error",
                param="model",
                code="missing_required_parameter",
            )
        try:
            model = _STR.decode(raw_model)
            raw_stream = fields.get("stream")
            stream = _BOOL.decode(raw_stream) if raw_stream is not None else False
            raw_options = fields.get("stream_options")
            wants_usage = (
                raw_options is not None
                and raw_options != b"null"
                and _STREAM_OPTIONS.decode(raw_options).include_usage
            )
        except msgspec.DecodeError as exc:
            return error_response(
                400,
                f"invalid request: {exc}",
                type_="invalid_request_error",
                code="invalid_type",
            )
        if endpoint == "chat" and "messages" not in fields:
            return error_response(
                400,
                "you must provide a messages parameter",
                type_="invalid_request_error",
                param="messages",
                code="missing_required_parameter",
            )
        route = self.router.routes.get(model)
        if route is None:
            return error_response(
                404,
                f"The model `{model}` does not exist (no edgeroute route serves it)",
                type_="invalid_request_error",
                param="model",
                code="model_not_found",
            )
        if stream and endpoint == "embeddings":
            stream = False
        return route, UpstreamRequest(endpoint, fields, model, stream, wants_usage, request_id)

    # ---- attempts ----------------------------------------------------------------------

    async def _serve(self, context: RequestContext) -> _Served:
        try:
            return await self._attempt(context, first=True)
        except Retry:
            pass
        retrying = tenacity.AsyncRetrying(
            stop=AttemptBudget(context, self.max_attempts, self.deadline_s),
            wait=RoundBackoff(context),
            retry=tenacity.retry_if_exception_type(Retry),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._attempt(context, first=False)
        except Retry:
            pass
        raise Exhausted(0.0)

    async def _decide(self, context: RequestContext, *, first: bool) -> RoutingDecision:
        route = context.route
        pending, context.pending = context.pending, None
        try:
            return await self.router.state.decide(
                route, exclude=context.tried, outcome=pending, advance=first, limit=2
            )
        except StateUnavailable:  # a plain RedisState without fallback: nothing to route on
            self.metrics.state_errors.labels("decide").inc()
            raise Exhausted(1.0) from None

    async def _attempt(self, context: RequestContext, *, first: bool) -> _Served:
        decision = await self._decide(context, first=first)
        admission = decision.admission
        if admission is None:
            if context.attempts and context.tried:
                # Every target was tried this round: start a new round after a backoff.
                context.tried.clear()
                context.round_failed = True
                raise Retry
            raise Exhausted(decision.retry_after_s)
        target = decision.chosen.target
        if context.attempts:
            # This request really moves on: count the failover from the last failure.
            last = context.attempts[-1]
            self.metrics.failovers.labels(context.route.name, last.provider, last.error).inc()
        adapter = self.adapters[target.provider]
        request = context.request
        request.model = target.model
        attempt_started = time.perf_counter()
        remaining = self.deadline_s - (attempt_started - context.started)
        try:
            async with asyncio.timeout(max(0.001, remaining)):
                result = await adapter.send(request)
        except UpstreamError as exc:
            self._failed(context, decision, admission, exc, attempt_started)
            if not exc.retryable:
                raise
            raise Retry from None
        except TimeoutError:
            deadline = UpstreamError(ErrorClass.TIMEOUT, "request deadline reached")
            self._failed(context, decision, admission, deadline, attempt_started)
            raise Exhausted(0.0) from None
        except asyncio.CancelledError:
            # The client went away: the attempt counts for nothing, the lease is returned.
            self.recorder.submit(
                context.route, Outcome.for_admission(admission, OutcomeKind.NEUTRAL)
            )
            raise
        first_byte = time.perf_counter()
        context.upstream_s += first_byte - attempt_started
        return _Served(decision, admission, result, attempt_started, first_byte)

    def _failed(
        self,
        context: RequestContext,
        decision: RoutingDecision,
        admission: Admission,
        exc: UpstreamError,
        attempt_started: float,
    ) -> None:
        target = decision.chosen.target
        elapsed = time.perf_counter() - attempt_started
        context.upstream_s += elapsed
        context.attempts.append(
            Attempt(
                target.provider,
                target.model,
                exc.error_class.value,
                exc.status,
                exc.retry_after_s,
            )
        )
        self.metrics.attempts.labels(target.provider, target.model, exc.error_class.value).inc()
        self.metrics.upstream_duration.labels(target.provider, target.model).observe(elapsed)
        outcome = Outcome.for_admission(
            admission, exc.outcome, elapsed * 1000, retry_after_s=exc.retry_after_s
        )
        if exc.retryable:
            context.tried.append(target.id)
            context.pending = outcome  # reported by the next decide, in the same round trip
        else:
            self.recorder.submit(context.route, outcome)

    # ---- answers -----------------------------------------------------------------------

    def _headers(self, context: RequestContext, served: _Served, request_id: str) -> dict[str, str]:
        target = served.decision.chosen.target
        return {
            "x-edgeroute-provider": target.provider,
            "x-edgeroute-model": target.model,
            "x-edgeroute-attempts": str(len(context.attempts) + 1),
            "x-edgeroute-reason": served.decision.reason,
            "x-request-id": request_id,
        }

    def _success(
        self,
        context: RequestContext,
        served: _Served,
        latency_s: float,
        prompt: int,
        completion: int,
    ) -> None:
        target = served.decision.chosen.target
        route = context.route
        outcome = Outcome.for_admission(
            served.admission,
            OutcomeKind.SUCCESS,
            latency_s * 1000,
            input_tokens=prompt,
            output_tokens=completion,
        )
        self.recorder.submit(route, outcome)
        bound = self.metrics.target(route.name, target.provider, target.model)
        bound.attempt_ok.inc()
        bound.upstream_duration.observe(latency_s)
        if prompt or completion:
            bound.prompt_tokens.inc(prompt)
            bound.completion_tokens.inc(completion)
            cost = prompt * target.input_cost_per_mtok + completion * target.output_cost_per_mtok
            if cost:
                bound.cost.inc(cost / 1_000_000)

    def _reply(self, context: RequestContext, served: _Served, request_id: str) -> web.Response:
        reply = served.result
        assert isinstance(reply, UpstreamReply)
        self._success(
            context,
            served,
            served.first_byte - served.attempt_started,
            reply.usage.prompt_tokens,
            reply.usage.completion_tokens,
        )
        response = web.Response(
            status=reply.status, body=reply.body, headers=self._headers(context, served, request_id)
        )
        response.content_type = reply.content_type.split(";")[0] or "application/json"
        self._served(context, served, response.status, request_id, "success")
        return response

    async def _stream(
        self, http: web.Request, context: RequestContext, served: _Served, request_id: str
    ) -> web.StreamResponse:
        stream = served.result
        assert not isinstance(stream, UpstreamReply)
        target = served.decision.chosen.target
        ttft = served.first_byte - served.attempt_started
        response = web.StreamResponse(
            status=200, headers={**_SSE_HEADERS, **self._headers(context, served, request_id)}
        )
        try:
            await response.prepare(http)
            async for block in stream:
                await response.write(block)
        except UpstreamError as exc:
            # After the first byte there is no failover: tell the client, blame the provider.
            error = exc.error_class.value
            self.metrics.attempts.labels(target.provider, target.model, error).inc()
            message = {
                "error": {
                    "message": f"upstream {target.provider} failed mid-stream: {exc.message}",
                    "type": "upstream_error",
                    "param": None,
                    "code": error,
                }
            }
            with contextlib.suppress(ConnectionError, RuntimeError):
                await response.write(b"data: " + _encode(message) + b"\n\n")
                await response.write_eof()
            self._record_stream(context, served, OutcomeKind.FAILURE, ttft, stream)
            self._served(context, served, 200, request_id, "stream_error", ttft=ttft, error=error)
            return response
        except (ConnectionError, asyncio.CancelledError) as exc:
            # The client went away: stop the upstream too, count nothing against anyone.
            await stream.aclose()
            self._record_stream(context, served, OutcomeKind.NEUTRAL, ttft, stream)
            self._served(
                context,
                served,
                499,
                request_id,
                "client_disconnected",
                ttft=ttft,
                error="client_disconnected",
            )
            if isinstance(exc, asyncio.CancelledError):
                raise
            return response
        finally:
            await stream.aclose()
        usage = stream.usage
        self._success(context, served, ttft, usage.prompt_tokens, usage.completion_tokens)
        self.metrics.target(context.route.name, target.provider, target.model).ttft.observe(ttft)
        self._served(context, served, 200, request_id, "success", ttft=ttft)
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response

    def _record_stream(
        self,
        context: RequestContext,
        served: _Served,
        kind: OutcomeKind,
        ttft: float,
        stream: UpstreamStream,
    ) -> None:
        usage = stream.usage
        outcome = Outcome.for_admission(
            served.admission,
            kind,
            ttft * 1000,
            input_tokens=usage.prompt_tokens,
            output_tokens=usage.completion_tokens,
        )
        self.recorder.submit(context.route, outcome)

    def _exhausted(
        self, context: RequestContext, exhausted: Exhausted, request_id: str
    ) -> web.Response:
        route = context.route.name
        if context.pending is not None:
            self.recorder.submit(context.route, context.pending)
            context.pending = None
        if not context.attempts:
            retry_after = max(1, math.ceil(exhausted.retry_after_s))
            self._complete(
                request_id,
                route,
                503,
                context.started,
                "no_providers_available",
                error="no_providers_available",
            )
            return error_response(
                503,
                f"no provider is available for model `{route}` right now "
                "(every target's breaker is open or rate-limited)",
                type_="service_unavailable",
                code="no_providers_available",
                headers={"Retry-After": str(retry_after), "x-request-id": request_id},
            )
        attempts = [
            {"provider": a.provider, "model": a.model, "error": a.error, "status": a.status}
            for a in context.attempts
        ]
        if all(a.error == ErrorClass.RATE_LIMITED.value for a in context.attempts):
            return self._all_rate_limited(context, attempts, request_id)
        self._complete_tried(
            context, request_id, 502, "all_providers_failed", error="all_providers_failed"
        )
        return error_response(
            502,
            f"all providers failed for model `{route}` after {len(attempts)} attempts: "
            + ", ".join(f"{a.provider}/{a.model}: {a.error}" for a in context.attempts),
            type_="upstream_error",
            code="all_providers_failed",
            headers={"x-request-id": request_id, "x-edgeroute-attempts": str(len(attempts))},
            extra={"attempts": attempts},
        )

    def _all_rate_limited(
        self, context: RequestContext, attempts: list[dict[str, Any]], request_id: str
    ) -> web.Response:
        """Every target said 429: the client should slow down, for as long as they asked."""
        route = context.route.name
        waits = [a.retry_after_s for a in context.attempts if a.retry_after_s > 0]
        retry_after = max(1, math.ceil(min(waits))) if waits else 1
        self._complete_tried(context, request_id, 429, "rate_limited", error="rate_limited")
        return error_response(
            429,
            f"every provider for model `{route}` is rate-limiting; retry after {retry_after}s",
            type_="rate_limit_exceeded",
            code="rate_limited",
            headers={
                "Retry-After": str(retry_after),
                "x-request-id": request_id,
                "x-edgeroute-attempts": str(len(attempts)),
            },
            extra={"attempts": attempts},
        )

    def _passthrough(
        self, context: RequestContext, exc: UpstreamError, request_id: str
    ) -> web.Response:
        last = context.attempts[-1]
        status = exc.status or 400
        body = exc.body or _encode(
            {
                "error": {
                    "message": exc.message,
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            }
        )
        response = web.Response(
            status=status,
            body=body,
            headers={
                "x-request-id": request_id,
                "x-edgeroute-provider": last.provider,
                "x-edgeroute-model": last.model,
                "x-edgeroute-attempts": str(len(context.attempts)),
            },
        )
        response.content_type = exc.content_type.split(";")[0] or "application/json"
        self._complete_tried(
            context, request_id, status, "client_error", error=exc.error_class.value
        )
        return response

    def _served(
        self,
        context: RequestContext,
        served: _Served,
        status: int,
        request_id: str,
        outcome: str,
        *,
        ttft: float | None = None,
        error: str | None = None,
    ) -> None:
        """A request that reached a target: account for it once, whatever happened next."""
        target = served.decision.chosen.target
        route = context.route.name
        total = time.perf_counter() - context.started
        bound = self.metrics.target(route, target.provider, target.model)
        if outcome == "success":
            bound.success.inc()
        else:
            self.metrics.requests.labels(route, target.provider, target.model, outcome).inc()
        bound.request_duration.observe(total)
        if ttft is None:
            self.metrics.overhead.observe(max(0.0, total - context.upstream_s))
        if access_log.isEnabledFor(logging.INFO):
            write_access_line(
                request_id,
                route,
                status,
                total,
                attempts=len(context.attempts) + 1,
                provider=target.provider,
                model=target.model,
                target=target.id,
                upstream_s=context.upstream_s,
                ttft=ttft,
                error=error,
            )

    def _complete_tried(
        self, context: RequestContext, request_id: str, status: int, outcome: str, *, error: str
    ) -> None:
        """A request that tried targets and ended without a served answer."""
        last = context.attempts[-1]
        self._complete(
            request_id,
            context.route.name,
            status,
            context.started,
            outcome,
            provider=last.provider,
            model=last.model,
            attempts=len(context.attempts),
            upstream_s=context.upstream_s,
            error=error,
        )

    def _complete(
        self,
        request_id: str,
        route: str,
        status: int,
        started: float,
        outcome: str,
        *,
        provider: str = "",
        model: str = "",
        attempts: int = 0,
        upstream_s: float | None = None,
        error: str | None = None,
    ) -> None:
        """A request that ended without an answer from a target (errors, mostly).

        `route` is "" when the request never matched one: client-chosen strings never
        become metric labels.
        """
        total = time.perf_counter() - started
        self.metrics.requests.labels(route, provider, model, outcome).inc()
        if route:
            self.metrics.request_duration.labels(route).observe(total)
        if access_log.isEnabledFor(logging.INFO):
            write_access_line(
                request_id,
                route or None,
                status,
                total,
                attempts=attempts,
                provider=provider or None,
                model=model or None,
                upstream_s=upstream_s,
                error=error,
            )
