"""What the gateway answers outside its routes, and how it treats slow or idle clients.

- `openai_errors`: every error the application answers is OpenAI's JSON error shape — the
  router's 404 and 405, the framework's 413, a handler that raised.
- `GuardedHandler`: aiohttp's connection protocol plus header-read and body deadlines
  (slowloris, slow POST), JSON answers for requests the HTTP parser rejects, and a count of
  open connections.
- `ConnectionGuard` / `GuardedSite`: beyond the connection cap — configured, or what the
  open-file limit leaves room for — a new connection gets a 503 and is closed at once, so
  the process never runs out of descriptors and keeps serving the connections it has.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from http import HTTPStatus
from typing import Any, cast

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from aiohttp.web_protocol import RequestHandler

from edgeroute.responses import error_response

log = logging.getLogger("edgeroute.server")

# Descriptors kept free for everything that is not a client connection: the listening
# socket, Redis, log files, DNS. The rest is shared by client sockets and the upstream
# sockets their requests open, one each at worst, hence the halving in `connection_cap`.
FD_RESERVE = 64

# Codes for the statuses the framework raises on its own (OpenAI uses snake_case codes).
_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    431: "headers_too_large",
}
_MAX_ECHO = 200  # characters of a client's path repeated in an error message


def _error_type(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def http_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return error_response(
        status,
        message,
        type_=_error_type(status),
        code=_CODES.get(status, "internal_error" if status >= 500 else "bad_request"),
        headers=headers,
    )


def _describe(request: web.BaseRequest, exc: web.HTTPException) -> str:
    path = request.path[:_MAX_ECHO]
    if exc.status == 404:
        return f"Invalid URL ({request.method} {path})"  # OpenAI's wording
    if exc.status == 405:
        return f"Method {request.method} is not allowed for {path}"
    if exc.status == 413:
        return "request body is too large"
    return _phrase(exc.status)


def openai_errors() -> Middleware:
    """The outermost middleware: JSON errors for whatever the routes did not answer."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise  # redirects and the like are answers, not errors
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return http_error(exc.status, _describe(request, exc), headers)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            # A bug, not a client's fault: log it (repeats are rate-limited) and answer in
            # the same shape as everything else, without a traceback.
            log.exception("unhandled error serving %s %s", request.method, request.path[:100])
            if request.writer.output_size > 0:
                raise  # an answer already started: only closing the connection is left
            return http_error(500, "internal error in the gateway")

    return middleware


# ---- connections -------------------------------------------------------------------------


class ConnectionGuard:
    """The protocol factory the listening socket uses: counts, caps and guards connections."""

    def __init__(
        self, server: web.Server, *, cap: int, header_timeout_s: float, body_timeout_s: float
    ) -> None:
        self.server = server
        self.cap = cap
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.open = 0
        self.refused = 0

    def __call__(self) -> asyncio.Protocol:
        if self.open >= self.cap:
            self.refused += 1
            log.warning(
                "connection refused: %d connections open, the cap is %d", self.open, self.cap
            )
            return _Refuse()
        # Counted here, not in connection_made: a burst of accepts in one loop iteration
        # would otherwise all pass the check before any of them is counted.
        self.open += 1
        handler = GuardedHandler(
            self.server,
            loop=asyncio.get_running_loop(),
            **self.server._kwargs,  # what AppRunner configured; web.Server does the same
        )
        handler.guard = self
        return handler

    def release(self) -> None:
        self.open -= 1


_REFUSAL_BODY = msgspec.json.encode(
    {
        "error": {
            "message": "the gateway is at its connection limit; retry shortly",
            "type": "server_error",
            "param": None,
            "code": "too_many_connections",
        }
    }
)
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
    b"Content-Length: " + str(len(_REFUSAL_BODY)).encode() + b"\r\n\r\n" + _REFUSAL_BODY
)


class _Refuse(asyncio.Protocol):
    """Answers 503 without reading the request and closes: costs one descriptor, briefly."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only look like one.
        writer = cast(asyncio.Transport, transport)
        writer.write(_REFUSAL)
        writer.close()


class GuardedHandler(RequestHandler):
    """aiohttp's connection handler with header and body deadlines and JSON parse errors.

    aiohttp closes a connection idle between requests after `keepalive_timeout`, but counts
    that from the end of the last response, however slowly the next request's headers
    trickle in, and never times a request body. Here a request's line and headers must be
    complete `header_timeout_s` after the connection opened (or after the first byte of a
    following request), and its body `body_timeout_s` after its headers; else the
    connection is closed.
    """

    __slots__ = ("_body_deadline", "_header_deadline", "guard")

    guard: ConnectionGuard
    _header_deadline: asyncio.TimerHandle | None
    _body_deadline: asyncio.TimerHandle | None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._header_deadline = None
        self._body_deadline = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        parsed = self._request_count  # aiohttp counts each request line + headers parsed
        super().data_received(data)
        if self._request_count != parsed:
            self._disarm()  # a whole request head arrived (or a malformed one was refused)
            if self._messages:
                payload = self._messages[-1][1]
                if not payload.is_eof():
                    self._time_body(payload)
        elif self._header_deadline is None and self._waiting_for_request():
            self._arm()  # the first bytes of a following request: the rest must follow in time

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        if self._body_deadline is not None:
            self._body_deadline.cancel()
            self._body_deadline = None
        guard = getattr(self, "guard", None)
        if guard is not None:
            guard.release()
            del self.guard
        super().connection_lost(exc)

    def _waiting_for_request(self) -> bool:
        """start() waits for the next request (not before it first ran: waiter is None)."""
        waiter = self._waiter
        return waiter is not None and not waiter.done() and not self._messages

    def _arm(self) -> None:
        self._header_deadline = self._loop.call_later(
            self.guard.header_timeout_s, self._headers_overdue
        )

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _time_body(self, payload: Any) -> None:
        if self._body_deadline is not None:
            self._body_deadline.cancel()

        def overdue() -> None:
            self._body_deadline = None
            if not payload.is_eof():
                self.force_close()  # the handler waiting on the body is cancelled with it

        self._body_deadline = self._loop.call_later(self.guard.body_timeout_s, overdue)

    def _headers_overdue(self) -> None:
        # Armed only while no request head was pending, disarmed when one completed.
        self._header_deadline = None
        self.force_close()

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Requests the HTTP parser rejected (and 5xx that escaped the middleware): JSON.

        A malformed request is the client's problem: logged at DEBUG without a traceback,
        so garbage on the port cannot flood the log.
        """
        if status >= 500:
            self.log_exception("Error handling request", exc_info=exc)
            text = "internal error in the gateway"
        else:
            log.debug("malformed request refused (%s): %s", status, exc)
            reason = getattr(exc, "message", None) or _phrase(status)
            text = f"malformed HTTP request: {str(reason).splitlines()[0][:_MAX_ECHO]}"
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot answer the error")
        response = http_error(status, text)
        response.force_close()
        return response


class GuardedSite(web.TCPSite):
    """A TCPSite whose connections go through a ConnectionGuard."""

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        *,
        cap: int,
        header_timeout_s: float,
        body_timeout_s: float,
        backlog: int = 2048,
        reuse_port: bool = False,
    ) -> None:
        # reuse_port: SO_REUSEPORT, for the workers of `edgeroute serve --workers N`.
        super().__init__(
            runner, host, port, reuse_address=True, reuse_port=reuse_port or None, backlog=backlog
        )
        self._cap = cap
        self._header_timeout_s = header_timeout_s
        self._body_timeout_s = body_timeout_s
        self.guard: ConnectionGuard | None = None

    async def start(self) -> None:
        # BaseSite.start registers the site; TCPSite.start's create_server is replaced.
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self.guard = ConnectionGuard(
            server,
            cap=self._cap,
            header_timeout_s=self._header_timeout_s,
            body_timeout_s=self._body_timeout_s,
        )
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.guard,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        if self._server.sockets:
            self._bound_port = self._server.sockets[0].getsockname()[1]


def raise_open_file_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard one (as Go and nginx do); the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(max_connections: int, open_file_limit: int) -> int:
    """The configured cap, lowered to what the descriptor budget can carry."""
    budget = max(1, (open_file_limit - FD_RESERVE) // 2)
    return min(max_connections, budget)
