"""The request path: parse, run the router's failover engine, answer, account.

Parsing lives in `request`, the attempt loop in `failover` (through `Router.run`), stream
relaying in `streaming`, and metrics, access line and outcome recording in `accounting`.
This module only joins them and turns each way a request can end into its HTTP answer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web
from multidict import CIMultiDict, istr

from edgeroute import streaming, tracing
from edgeroute.accounting import Accounting
from edgeroute.clients import Admitting, ClientLease, Clients, ClientSpec, Verdict
from edgeroute.config import Config
from edgeroute.failover import Attempt, Exhausted, Failure, Observer, Served
from edgeroute.providers import (
    UpstreamError,
    UpstreamReply,
    UpstreamRequest,
    UpstreamStream,
)
from edgeroute.providers.base import Endpoint, ErrorClass, Usage
from edgeroute.request import (
    Rejected,
    estimate_usage,
    parse_request,
    session_key,
)
from edgeroute.responses import error_response, new_request_id
from edgeroute.router import Router
from edgeroute.state.base import RouteSpec
from edgeroute.strategy import Candidate
from edgeroute.types import OutcomeKind

if TYPE_CHECKING:
    from edgeroute.reload import Generation, Live
    from edgeroute.tracing_otel import RequestTrace

log = logging.getLogger("edgeroute.proxy")
_encode = msgspec.json.encode

Result = UpstreamReply | UpstreamStream
_ATTEMPTS = istr("x-edgeroute-attempts")
_REASON = istr("x-edgeroute-reason")
_REQUEST_ID = istr("x-request-id")
_TARGET_HEADERS_MAX = 4096


class ClientRefused(Exception):
    """A client over one of its limits: `response` is its answer (429, or 503)."""

    def __init__(self, response: web.Response) -> None:
        super().__init__("client refused")
        self.response = response


# Where the auth middleware leaves the calling client (server.clients[]) on the request, and
# where its lease waits to be settled: typed keys where aiohttp has them (3.12+), else names.
_RequestKey: Any = getattr(web, "RequestKey", None)
CLIENT_KEY: Any = _RequestKey("edgeroute_client", ClientSpec) if _RequestKey else "edgeroute.client"
_CLIENT_LEASE: Any = (
    _RequestKey("edgeroute_client_lease", ClientLease) if _RequestKey else "edgeroute.lease"
)


def _carried(http: web.Request, key: Any, *, remove: bool = False) -> Any:
    """What the request carries under `key` (removed, if `remove`), or None.

    aiohttp's Request takes get() and pop() from the Mapping mixin, which raise and catch a
    KeyError for a missing key: three times per request without a client key (the client,
    and the lease twice). Most requests carry nothing at all, and an empty request has no
    key to look up."""
    if not len(http):
        return None
    return http.pop(key, None) if remove else http.get(key)


def classify(exc: BaseException) -> Failure:
    """How a failed attempt counts. Anything that is not a classified upstream error is
    still this target's failure: another target is tried, the lease goes back."""
    if isinstance(exc, UpstreamError):
        return Failure(
            exc.outcome,
            exc.error_class.value,
            exc.retryable,
            exc.retry_after_s,
            exc.status,
            exc.limit_reset_s,
            fallback=exc.fallback,
        )
    log.warning("attempt failed unexpectedly: %r", exc)
    return Failure(OutcomeKind.FAILURE, ErrorClass.BAD_RESPONSE.value)


class Proxy:
    def __init__(self, live: Live, accounting: Accounting, clients: Clients | None = None) -> None:
        # A reload swaps `live.current`; each request reads it once, at its start.
        self.live = live
        self.clients = clients
        self.accounting = accounting
        self.in_flight = 0
        self._target_headers: dict[tuple[str, str, str], CIMultiDict[str]] = {}
        accounting.metrics.in_flight.set_function(lambda: self.in_flight)  # read at scrape

    @property
    def config(self) -> Config:
        return self.live.current.config

    @property
    def router(self) -> Router:
        return self.live.current.router

    async def handle(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = request.headers.get("x-request-id") or new_request_id()
        current = self.live.current
        self.in_flight += 1
        tracer = tracing.TRACER
        if tracer is None:  # tracing off: this check is all it costs
            try:
                return await self._handle(request, endpoint, request_id, started, current, None)
            finally:
                self._done(request)
        trace = tracer.request(request, endpoint)
        status = 499  # cancelled: the client went away
        try:
            response = await self._handle(request, endpoint, request_id, started, current, trace)
            status = response.status
            return response
        except Exception:
            status = 500
            raise
        finally:
            self._done(request)
            trace.end(status)

    def _done(self, request: web.Request) -> None:
        self.in_flight -= 1
        lease: ClientLease | None = _carried(request, _CLIENT_LEASE, remove=True)
        if lease is not None:
            # Never served (exhausted, refused, gone): the lease and estimate go back.
            self._settle(lease, 0, 0, 0.0)

    async def _handle(
        self,
        http: web.Request,
        endpoint: Endpoint,
        request_id: str,
        started: float,
        current: Generation,
        trace: RequestTrace | None,
    ) -> web.StreamResponse:
        router, adapters = current.router, current.adapters
        parsed = await parse_request(
            http, endpoint, router.routes, request_id, current.config.server.max_body_bytes
        )
        if isinstance(parsed, Rejected):
            parsed.response.headers["x-request-id"] = request_id
            self.accounting.rejected(request_id, parsed.response.status, started, parsed.code)
            return parsed.response
        route, upstream = parsed
        # Estimated once: its total is reserved by the decide, and the usage settles a
        # client's lease when the provider reports none.
        estimate = estimate_usage(upstream.fields)
        tokens = estimate.prompt_tokens + estimate.completion_tokens
        client: ClientSpec | None = _carried(http, CLIENT_KEY)
        gate = None
        if client is not None and self.clients is not None:
            if not client.allows(route.name):
                return self._not_allowed(client, route, request_id, started)
            if client.limited:
                # Queued now, right before the route's decide: both leave in one pipelined
                # write, and the engine awaits the decide, then this.
                admitting = self.clients.begin_admit(client, tokens)
                gate = self._admit_client(http, admitting, request_id, started)

        # The attempts hand back the adapter's coroutine rather than await it in one of
        # their own: one coroutine less for every resumption of the upstream round trip.
        observer: Observer = self.accounting
        if trace is None:

            def attempt(candidate: Candidate) -> Awaitable[Result]:
                upstream.model = candidate.target.model
                return adapters[candidate.target.provider].send(upstream)

        else:
            observer = trace.observer(self.accounting, router.state, self.accounting.recorder)

            def attempt(candidate: Candidate) -> Awaitable[Result]:
                upstream.model = candidate.target.model
                return trace.attempt(candidate, upstream, adapters[candidate.target.provider])

        try:
            served = await router.run(
                route,
                attempt,
                classify=classify,
                record=self.accounting.record,
                observer=observer,
                started=started,
                tokens=tokens,
                gate=gate,
                session=lambda spec: session_key(http, spec, upstream.fields),
            )
        except ClientRefused as refused:
            return refused.response
        except Exhausted as exhausted:
            return self._exhausted(route, exhausted, request_id, started)
        except asyncio.CancelledError:
            self.accounting.unserved(
                request_id, route, 499, started, "client_disconnected", error="client_disconnected"
            )
            raise
        # From here on `route` is the route that served: a fallback's, when the chain moved.
        requested, route = route.name, served.route
        try:
            if isinstance(served.result, UpstreamReply):
                return self._reply(route, served, served.result, request_id, started, requested)
            return await self._stream(
                http, route, served, served.result, request_id, started, trace, requested
            )
        finally:
            # Also when the stream broke or the client left mid-way (CancelledError): the
            # upstream produced tokens for it, so the client pays for them.
            self._settle_served(http, served, estimate)

    # ---- client limits -----------------------------------------------------------------

    def _not_allowed(
        self, client: ClientSpec, route: RouteSpec, request_id: str, started: float
    ) -> web.Response:
        metrics = self.accounting.metrics
        metrics.child(metrics.client_requests, client.name, "model_not_found").inc()
        self.accounting.rejected(request_id, 404, started, "model_not_found")
        return error_response(
            404,
            f"The model `{route.name}` does not exist or you do not have access to it.",
            type_="invalid_request_error",
            param="model",
            code="model_not_found",
            headers={"x-request-id": request_id},
        )

    async def _admit_client(
        self, http: web.Request, admitting: Admitting, request_id: str, started: float
    ) -> None:
        """Keeps the client's lease for settling; raises ClientRefused with the answer."""
        assert self.clients is not None
        metrics = self.accounting.metrics
        client = admitting.spec
        verdict, lease = await self.clients.finish_admit(admitting)
        if lease is not None:
            http[_CLIENT_LEASE] = lease
            return
        metrics.child(metrics.client_requests, client.name, verdict.reason or "refused").inc()
        self.accounting.rejected(request_id, 429, started, "rate_limited")
        retry_after = max(1, math.ceil(verdict.wait_ms / 1000))
        headers = {
            "Retry-After": str(retry_after),
            "x-request-id": request_id,
            **_rate_limit_headers(client, verdict),
        }
        if verdict.reason == "state_loss":
            raise ClientRefused(
                error_response(
                    503,
                    f"limits of client `{client.name}` cannot be checked while shared state is "
                    "unreachable (on_state_loss: fail_closed)",
                    type_="service_unavailable",
                    code="state_unavailable",
                    headers=headers,
                )
            )
        if verdict.reason == "budget":
            raise ClientRefused(
                error_response(
                    429,
                    f"client `{client.name}` has spent its {client.period}ly budget; it renews "
                    f"in {retry_after}s",
                    type_="insufficient_quota",
                    code="insufficient_quota",
                    headers=headers,
                )
            )
        kind = "tokens" if verdict.reason == "tpm" else "requests"
        raise ClientRefused(
            error_response(
                429,
                f"Rate limit reached for client `{client.name}` ({verdict.reason}); "
                f"retry after {retry_after}s",
                type_=kind,
                code="rate_limit_exceeded",
                headers=headers,
            )
        )

    def _settle_served(self, http: web.Request, served: Served[Result], estimate: Usage) -> None:
        """Settle a served request's client lease with its usage; an answer that ended
        without the provider's usage (a stream cut or left before its last chunk, an
        upstream that never reports it) is charged the request's estimate instead, so a
        budget cannot be dodged by leaving before the usage arrives."""
        lease: ClientLease | None = _carried(http, _CLIENT_LEASE, remove=True)
        if lease is None:
            return
        usage = served.result.usage
        if not (usage.prompt_tokens or usage.completion_tokens):
            usage = estimate
        target = served.target
        cost = (
            usage.prompt_tokens * target.input_cost_per_mtok
            + usage.completion_tokens * target.output_cost_per_mtok
        ) / 1_000_000
        self._settle(lease, usage.prompt_tokens, usage.completion_tokens, cost)

    def _settle(self, lease: ClientLease, prompt: int, completion: int, cost: float) -> None:
        """Give the client's lease back with the real tokens and spend, off the request path."""
        assert self.clients is not None
        metrics = self.accounting.metrics
        name = lease.spec.name
        served = "served" if prompt or completion else "unserved"
        metrics.child(metrics.client_requests, name, served).inc()
        if cost:
            metrics.child(metrics.client_spend, name).inc(cost)
        self.clients.settle_soon(lease, prompt + completion, cost)

    # ---- served ------------------------------------------------------------------------

    def _headers(self, served: Served[Result], request_id: str) -> CIMultiDict[str]:
        """The reply's own headers: the serving route's and target's, built once per (route,
        provider, model), and the three that change per reply. aiohttp copies a CIMultiDict
        without normalising each name again, as it must for a plain dict."""
        target = served.target
        key = (served.route.name, target.provider, target.model)
        base = self._target_headers.get(key)
        if base is None:
            if len(self._target_headers) >= _TARGET_HEADERS_MAX:
                self._target_headers.clear()  # reloads renamed targets: start over
            base = self._target_headers[key] = CIMultiDict(
                {
                    "x-edgeroute-route": served.route.name,
                    "x-edgeroute-provider": target.provider,
                    "x-edgeroute-model": target.model,
                }
            )
        headers = base.copy()
        headers[_ATTEMPTS] = str(len(served.attempts) + 1)
        headers[_REASON] = served.decision.reason
        headers[_REQUEST_ID] = request_id
        if served.decision.affinity:
            headers["x-edgeroute-affinity"] = served.decision.affinity
        return headers

    def _reply(
        self,
        route: RouteSpec,
        served: Served[Result],
        reply: UpstreamReply,
        request_id: str,
        started: float,
        requested: str,
    ) -> web.Response:
        self.accounting.served(
            request_id,
            route,
            served.target,
            served.admission,
            started=started,
            status=reply.status,
            outcome="success",
            kind=OutcomeKind.SUCCESS,
            latency_s=served.first_byte - served.attempt_started,
            usage=reply.usage,
            limit_reset_s=reply.limit_reset_s,
            attempts=len(served.attempts) + 1,
            upstream_s=served.upstream_s,
            requested=requested,
        )
        # content_type given here, not set afterwards: the setter re-parses the header.
        return web.Response(
            status=reply.status,
            body=reply.body,
            headers=self._headers(served, request_id),
            content_type=reply.content_type.split(";")[0] or "application/json",
        )

    async def _stream(
        self,
        http: web.Request,
        route: RouteSpec,
        served: Served[Result],
        stream: UpstreamStream,
        request_id: str,
        started: float,
        trace: RequestTrace | None,
        requested: str,
    ) -> web.StreamResponse:
        ttft = served.first_byte - served.attempt_started
        account = self.accounting

        def ended(
            status: int, end: streaming.StreamEnd, kind: OutcomeKind, error: str | None
        ) -> None:
            if trace is not None:
                trace.stream_ended(stream.usage, error)
            account.served(
                request_id,
                route,
                served.target,
                served.admission,
                started=started,
                status=status,
                outcome=end.value,
                kind=kind,
                latency_s=ttft,
                usage=stream.usage,
                limit_reset_s=stream.limit_reset_s,
                attempts=len(served.attempts) + 1,
                upstream_s=served.upstream_s,
                ttft=ttft,
                error=error,
                requested=requested,
            )

        try:
            response, end, error = await streaming.relay(
                http, stream, served.target, self._headers(served, request_id)
            )
        except asyncio.CancelledError:
            ended(499, streaming.StreamEnd.CLIENT_GONE, OutcomeKind.NEUTRAL, "client_disconnected")
            raise
        if end is streaming.StreamEnd.COMPLETE:
            ended(200, end, OutcomeKind.SUCCESS, None)
            await streaming.finish(response)
        elif end is streaming.StreamEnd.UPSTREAM_FAILED:
            ended(200, end, OutcomeKind.FAILURE, error)
        else:
            ended(499, end, OutcomeKind.NEUTRAL, error)
        return response

    # ---- not served --------------------------------------------------------------------

    def _exhausted(
        self, route: RouteSpec, exhausted: Exhausted, request_id: str, started: float
    ) -> web.Response:
        cause = exhausted.cause
        if isinstance(cause, UpstreamError) and not cause.retryable:
            return self._passthrough(route, exhausted, cause, request_id, started)
        attempts = exhausted.attempts
        account = self.accounting
        if not attempts and exhausted.quota_limited:
            return self._quota_limited(route, exhausted, request_id, started)
        if not attempts:
            if exhausted.state_unavailable:
                account.metrics.state_errors.labels("decide").inc()
            retry_after = max(1, math.ceil(exhausted.retry_after_s))
            account.unserved(
                request_id,
                exhausted.route,
                503,
                started,
                "no_providers_available",
                error="no_providers_available",
                requested=route.name,
            )
            return error_response(
                503,
                f"no provider is available for model `{route.name}` right now "
                "(every target's breaker is open or rate-limited)",
                type_="service_unavailable",
                code="no_providers_available",
                headers={
                    "Retry-After": str(retry_after),
                    "x-request-id": request_id,
                    "x-edgeroute-route": exhausted.route.name,
                },
            )
        listed = [
            {"provider": a.provider, "model": a.model, "error": a.error, "status": a.status}
            for a in attempts
        ]
        if all(a.error == ErrorClass.RATE_LIMITED.value for a in attempts):
            return self._all_rate_limited(route, exhausted, listed, request_id, started)
        account.unserved(
            request_id,
            exhausted.route,
            502,
            started,
            "all_providers_failed",
            attempts=attempts,
            upstream_s=exhausted.upstream_s,
            error="all_providers_failed",
            requested=route.name,
        )
        return error_response(
            502,
            f"all providers failed for model `{route.name}` after {len(attempts)} attempts: "
            + ", ".join(f"{a.provider}/{a.model}: {a.error}" for a in attempts),
            type_="upstream_error",
            code="all_providers_failed",
            headers={
                "x-request-id": request_id,
                "x-edgeroute-route": exhausted.route.name,
                "x-edgeroute-attempts": str(len(attempts)),
            },
            extra={"attempts": listed},
        )

    def _all_rate_limited(
        self,
        route: RouteSpec,
        exhausted: Exhausted,
        listed: list[dict[str, Any]],
        request_id: str,
        started: float,
    ) -> web.Response:
        """Every target said 429: the client should slow down, for as long as they asked."""
        attempts = exhausted.attempts
        waits = [a.retry_after_s for a in attempts if a.retry_after_s > 0]
        retry_after = max(1, math.ceil(min(waits))) if waits else 1
        self.accounting.unserved(
            request_id,
            exhausted.route,
            429,
            started,
            "rate_limited",
            attempts=attempts,
            upstream_s=exhausted.upstream_s,
            error="rate_limited",
            requested=route.name,
        )
        return error_response(
            429,
            f"every provider for model `{route.name}` is rate-limiting; retry after {retry_after}s",
            type_="rate_limit_exceeded",
            code="rate_limited",
            headers={
                "Retry-After": str(retry_after),
                "x-request-id": request_id,
                "x-edgeroute-route": exhausted.route.name,
                "x-edgeroute-attempts": str(len(attempts)),
            },
            extra={"attempts": listed},
        )

    def _quota_limited(
        self, route: RouteSpec, exhausted: Exhausted, request_id: str, started: float
    ) -> web.Response:
        """Every target is at a quota (or a limit its provider announced): the fleet holds the
        request back rather than let a provider refuse it; retry when the first one frees."""
        retry_after = max(1, math.ceil(exhausted.retry_after_s))
        self.accounting.unserved(
            request_id,
            exhausted.route,
            429,
            started,
            "rate_limited",
            error="rate_limit_exceeded",
            requested=route.name,
        )
        return error_response(
            429,
            f"every target of model `{route.name}` is at its rate limit; "
            f"retry after {retry_after}s",
            type_="requests",
            code="rate_limit_exceeded",
            headers={
                "Retry-After": str(retry_after),
                "x-request-id": request_id,
                "x-edgeroute-route": exhausted.route.name,
            },
        )

    def _passthrough(
        self,
        route: RouteSpec,
        exhausted: Exhausted,
        exc: UpstreamError,
        request_id: str,
        started: float,
    ) -> web.Response:
        """The client's own mistake, as the upstream said it: passed through unchanged."""
        attempts = exhausted.attempts
        last: Attempt = attempts[-1]
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
                "x-edgeroute-route": exhausted.route.name,
                "x-edgeroute-provider": last.provider,
                "x-edgeroute-model": last.model,
                "x-edgeroute-attempts": str(len(attempts)),
            },
        )
        response.content_type = exc.content_type.split(";")[0] or "application/json"
        self.accounting.unserved(
            request_id,
            exhausted.route,
            status,
            started,
            "client_error",
            attempts=attempts,
            upstream_s=exhausted.upstream_s,
            error=exc.error_class.value,
            requested=route.name,
        )
        return response


def _rate_limit_headers(client: ClientSpec, verdict: Verdict) -> dict[str, str]:
    """OpenAI's x-ratelimit-* response headers for the client's own limits."""
    headers: dict[str, str] = {}
    for kind, limit, used, reset_ms in (
        ("requests", client.rpm, verdict.requests, verdict.reset_requests_ms),
        ("tokens", client.tpm, verdict.tokens, verdict.reset_tokens_ms),
    ):
        if limit:
            headers[f"x-ratelimit-limit-{kind}"] = str(limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, limit - used))
            headers[f"x-ratelimit-reset-{kind}"] = _duration(reset_ms)
    return headers


def _duration(ms: int) -> str:
    """OpenAI's reset format: "1m0s", "6s", "20ms"."""
    if ms < 1000:
        return f"{ms}ms"
    seconds = ms / 1000
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


__all__ = ["Proxy", "UpstreamRequest", "classify"]
