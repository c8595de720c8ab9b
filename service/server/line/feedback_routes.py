"""POST /v1/feedback: the operator's verdict on one image of a recent /detect answer.

The API key is checked before the body is read (an unauthenticated caller learns nothing, not
even what the body should look like); the body is then parsed with its own small size limit.
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from service.server.errors import ApiError, retry_headers, validation_message
from service.server.line.feedback import MAX_BODY_BYTES, FeedbackIn, FeedbackOut
from service.server.openapi_contract import component_ref
from service.server.routes import ApiKey, authenticate, service_of
from service.server.schemas import ErrorResponse

router = APIRouter()
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 404, 409, 410, 413, 415, 422, 503)}


@router.post(
    "/v1/feedback", status_code=201, summary="An operator's verdict on one image of a recent answer",
    operation_id="submitFeedback",
    response_model=None, responses={201: {"model": FeedbackOut}, **_ERRORS},
    openapi_extra={"requestBody": {"required": True,
                                   "content": {"application/json": {"schema": component_ref(FeedbackIn)}}}},
)
async def feedback(request: Request, x_api_key: ApiKey = None) -> JSONResponse:
    state = service_of(request)
    principal = authenticate(state, x_api_key)
    desk = state.loop.feedback
    if desk is None:
        raise ApiError(404, "feedback_disabled", "operator feedback is not enabled on this service "
                       "(set DAPO_FEEDBACK_DB)")
    if state.manifest is None:
        raise ApiError(503, "not_ready", "the model is not loaded yet", retry_headers(state.settings.retry_after_s))
    if not request.headers.get("content-type", "").lower().startswith("application/json"):
        raise ApiError(415, "unsupported_media_type", "POST /v1/feedback expects application/json")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, "payload_too_large", f"feedback body over {MAX_BODY_BYTES} bytes")
    try:
        body = FeedbackIn.model_validate_json(raw)
    except ValidationError as e:
        raise ApiError(422, "invalid_parameter", validation_message(list(e.errors()))) from None
    m = state.manifest
    out = await desk.submit(body, principal, m.defect_names, set(m.products))
    return JSONResponse(out.model_dump(), status_code=201)
