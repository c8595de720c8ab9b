"""One error envelope for every failure: {"error": {"code", "message", "request_id"}}.

Integrators branch on the HTTP status and the stable `code`; the message is for people and
names the file or parameter at fault. Bad input never becomes a 500: each kind of domain error
has a handler with its status, FastAPI's own validation errors become 422 in the same envelope,
and only a genuine bug reaches the catch-all (which logs it and says nothing internal).
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.server.batching import BackendError, ClientLeft, DeadlineExceeded, Dropped, QueueFull
from service.runtime.imaging import ImageError
from service.server.logs import current_request_id
from service.runtime.scoring import ScoringError
from service.server.fleet.link import StateUnavailable
from service.server.idempotency import IdempotencyConflict, IdempotencyInterrupted

log = logging.getLogger("dapo.errors")

# Every `code` the service can answer, the one list. docs/api.md's error table must list each
# (tests/test_docs_drift.py), and that test's scan of service/ finds every code literal given to
# ApiError, envelope or ImageError (and the maps below) and fails on one missing here: a new code
# is added here and documented in docs/api.md, or CI says which is missing.
ERROR_CODES: frozenset[str] = frozenset({
    "ambiguous_request_id", "bad_request", "client_disconnected", "deadline_exceeded", "duplicate_feedback", "error",
    "feedback_db_unavailable", "feedback_disabled", "feedback_expired", "forbidden",
    "idempotency_conflict", "image_too_large", "inference_failed", "internal_error",
    "invalid_artifact", "invalid_feedback", "invalid_image", "invalid_parameter",
    "malformed_multipart", "method_not_allowed", "missing_image", "not_acceptable", "not_found",
    "not_ready", "overloaded", "payload_too_large", "queue_full", "reload_failed",
    "reload_in_progress", "retry", "state_unavailable", "too_many_files", "too_many_requests",
    "too_many_tiles", "unauthorized", "unavailable", "unknown_request", "unsupported_media_type",
})

_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 406: "not_acceptable", 413: "payload_too_large",
                 415: "unsupported_media_type", 422: "invalid_parameter", 429: "too_many_requests",
                 500: "internal_error", 503: "unavailable"}


class ApiError(Exception):
    """An error with its HTTP status and stable code, raised anywhere in request handling."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        assert code in ERROR_CODES, f"error code {code!r} is not in ERROR_CODES (and docs/api.md)"
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def request_id_of(request: Request | None) -> str:
    """The id the middleware gave this request (falls back to the logging context)."""
    if request is not None:
        rid = getattr(request.state, "request_id", None)
        if rid:
            return rid
    return current_request_id() or ""


def envelope(status: int, code: str, message: str, request_id: str,
             headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error response; X-Request-ID is set here too so even a 500 carries it."""
    out_headers = {"X-Request-ID": request_id} if request_id else {}
    out_headers.update(headers or {})
    body = {"error": {"code": code, "message": message, "request_id": request_id}}
    return JSONResponse(body, status_code=status, headers=out_headers)


def retry_headers(retry_after_s: int) -> dict[str, str]:
    return {"Retry-After": str(retry_after_s)}


def validation_message(errors: list[dict[str, Any]]) -> str:
    """FastAPI's / pydantic's error list as one line: 'query.threshold: Input should be ...' (no
    input echo); an error about the whole document (no location) is placed at 'body'."""
    parts = []
    for err in errors[:10]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_handlers(app: FastAPI, retry_after_s: int = 1) -> None:
    """Register every handler on the app."""

    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return envelope(exc.status, exc.code, exc.message, request_id_of(request), exc.headers)

    async def image_error(request: Request, exc: ImageError) -> JSONResponse:
        return envelope(exc.status, exc.code, str(exc), request_id_of(request))

    async def scoring_error(request: Request, exc: ScoringError) -> JSONResponse:
        return envelope(422, "invalid_parameter", str(exc), request_id_of(request))

    async def idem_conflict(request: Request, exc: IdempotencyConflict) -> JSONResponse:
        return envelope(422, "idempotency_conflict", str(exc), request_id_of(request))

    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        code = {QueueFull: "queue_full", BackendError: "inference_failed",
                IdempotencyInterrupted: "retry", StateUnavailable: "state_unavailable"}.get(type(exc), "unavailable")
        return envelope(503, code, str(exc), request_id_of(request), retry_headers(retry_after_s))

    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return envelope(422, "invalid_parameter", validation_message(list(exc.errors())), request_id_of(request))

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        return envelope(exc.status_code, code, str(exc.detail), request_id_of(request),
                        dict(exc.headers or {}))

    async def client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:  # nobody reads this answer
        return envelope(400, "client_disconnected", "client disconnected", request_id_of(request))

    async def dropped(request: Request, exc: Dropped) -> JSONResponse:
        """504 deadline_exceeded / 499 client_disconnected for the request that was dropped; a
        concurrent duplicate (same Idempotency-Key) that waited on it gets 503 `retry` instead."""
        guard = getattr(request.state, "guard", None)
        if guard is None or guard.ticket.dropped is not exc:
            return envelope(503, "retry", f"the original request with this Idempotency-Key was dropped ({exc}); retry",
                            request_id_of(request), retry_headers(0))
        if isinstance(exc, DeadlineExceeded):
            return envelope(504, "deadline_exceeded", str(exc), request_id_of(request))
        return envelope(499, "client_disconnected", str(exc), request_id_of(request))

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
        return envelope(500, "internal_error", "internal error", request_id_of(request))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(ImageError, image_error)
    app.add_exception_handler(ScoringError, scoring_error)
    app.add_exception_handler(IdempotencyConflict, idem_conflict)
    for exc_type in (QueueFull, BackendError, IdempotencyInterrupted, StateUnavailable):
        app.add_exception_handler(exc_type, unavailable)
    for exc_type in (DeadlineExceeded, ClientLeft):
        app.add_exception_handler(exc_type, dropped)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(Exception, unexpected)
