"""Two small ASGI middlewares: request context (id, access log, metrics) and the body limit.

Plain ASGI rather than BaseHTTPMiddleware so the body keeps streaming (the limit counts bytes
as they arrive instead of buffering them) and nothing is copied.
"""
from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.server.errors import ApiError, envelope
from service.server.logs import reset_request_id, set_request_id
from service.server.metrics import Metrics

log = logging.getLogger("dapo.access")
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")
_QUIET_PATHS = {"/livez", "/readyz", "/metrics"}


def accept_request_id(raw: str | None) -> str:
    """The caller's X-Request-ID if it is a sane token (no log injection), else a new one."""
    if raw and _VALID_REQUEST_ID.match(raw):
        return raw
    return uuid.uuid4().hex


def header(scope: Scope, name: bytes) -> str | None:
    """First value of a request header (latin-1, as HTTP/1.1 defines)."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class HttpMiddleware:
    """Base of the ASGI middlewares: an HTTP request goes to `handle`, any other scope
    (lifespan, websocket) straight through to the app."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.handle(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class RequestContextMiddleware(HttpMiddleware):
    """Assigns the request id, echoes it, times the request, counts it, logs it."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        super().__init__(app)
        self.metrics = metrics

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = accept_request_id(header(scope, b"x-request-id"))
        scope.setdefault("state", {})["request_id"] = request_id
        token = set_request_id(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                if "x-request-id" not in headers:
                    headers.append("X-Request-ID", request_id)
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(endpoint, scope.get("method", ""), status, seconds)
            self.metrics.in_flight.dec()
            level = logging.DEBUG if scope.get("path") in _QUIET_PATHS and status < 400 else logging.INFO
            log.log(level, "request", extra={"method": scope.get("method"), "path": scope.get("path"),
                                             "status": status, "duration_ms": round(seconds * 1000, 2)})
            reset_request_id(token)


class BodyTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, "payload_too_large", f"request body exceeds the limit of {limit} bytes")


class BodyLimitMiddleware(HttpMiddleware):
    """Refuse bodies over `max_bytes`: from Content-Length before reading, else while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        super().__init__(app)
        self.max_bytes = max_bytes

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = header(scope, b"content-length")
        if declared is not None:
            rid = scope.get("state", {}).get("request_id", "")
            if not declared.strip().isdigit():
                await envelope(400, "bad_request", "invalid Content-Length", rid)(scope, receive, send)
                return
            if int(declared) > self.max_bytes:
                await envelope(413, "payload_too_large", f"request body of {int(declared)} bytes exceeds the "
                               f"limit of {self.max_bytes} bytes", rid)(scope, receive, send)
                return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)  # surfaces in the route -> 413 handler
            return message

        await self.app(scope, counted_receive, send)
