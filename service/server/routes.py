"""HTTP endpoints: parse and check the request, then hand over to `service.server.pipeline`.

/detect reads multipart itself (rather than through FastAPI File parameters) so that the auth
check happens before the body is read, the file-count and field-size limits are enforced while
parsing, and multipart errors map to our envelope with the right status. The form schema is
still documented in OpenAPI through `openapi_extra`.
"""
from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Header, Query, Request, Security
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.runtime import postprocess, scoring
from service.runtime.detector import Upload
from service.runtime.precision import precision_info
from service.server import pipeline
from service.server.answers import new_answer_id
from service.server.batching import ClientLeft
from service.server.deadlines import (DEADLINE_HEADER, MAX_DEADLINE_MS, Deadline, RequestGuard, budget_ms,
                                      overloaded, watch_disconnect)
from service.server.errors import ApiError, retry_headers, validation_message
from service.server.openapi_contract import component_ref
from service.server.reload import ReloadFailed, ReloadInProgress
from service.server.schemas import (DETECT_FORM_SCHEMA, MAX_FIELD_LEN, DetectResponse, ErrorResponse,
                                    ReloadRequest, ReloadResponse)
from service.server.idempotency import MAX_IDEMPOTENCY_KEY_LEN, StoredResponse, request_fingerprint
from service.server.state import LoadedModel, ServiceState

router = APIRouter()
# X-API-Key as an OpenAPI security scheme (Swagger's Authorize, a generated client's one place for
# the key). auto_error=False: it only reads the header; `authenticate` decides, as before, so the
# order of checks and the 401 envelope are the routes' own.
API_KEY = APIKeyHeader(name="X-API-Key", scheme_name="ApiKey", auto_error=False,
                       description="the caller's key, when the service has keys configured (DAPO_API_KEYS)")
ApiKey = Annotated[str | None, Security(API_KEY)]
# A /detect answer leads to feedback on any of its images: the answer's request_id names it.
DETECT_LINKS = {"submitFeedback": {
    "operationId": "submitFeedback",
    "requestBody": {"answer_id": "$response.body#/answer_id", "index": 0},
    "description": "An operator's verdict on one image of this answer: its answer_id (the server's id, "
                   "unique), and the image's index in `results` (upload order)."}}

ECHO_FIELDS = ("product", "part_id", "station_id", "recipe_id")
MAX_FILENAME_LEN = 255
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 503, 504)}
_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")
# Stated in the schema only: the route checks it itself (check_idempotency_key), after the key
# and readiness checks, so the order of answers stays as it was.
IDEMPOTENCY_KEY_SCHEMA = {"pattern": r"^[\x21-\x7e]+$", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY_LEN}
DEADLINE_DOC = (
    f"{DEADLINE_HEADER}: how long the caller waits, in ms from when the server receives the request "
    "(default: the product's timeout_ms, else DAPO_REQUEST_TIMEOUT_MS). A request that cannot be answered "
    "in time is refused at once (503 overloaded, Retry-After); one whose deadline passes gets 504 "
    "deadline_exceeded, never a late 200")
HEATMAP_MAX_SIDE_DOC = (
    "heatmap_png and overlay_png are the original size divided by the smallest power of two (1, 2, 4, ...) "
    "that makes the longer side at most this many px; 0 = the original size; "
    "default: the server's DAPO_HEATMAP_MAX_SIDE (1024)")


def encode_json(body: dict[str, Any]) -> bytes:
    """The /detect answer as compact UTF-8 JSON. orjson: measured 10-15x faster than json.dumps on
    answers with masks and heatmaps (docs/benchmarks.md), and the bytes parse to the same values
    (numpy scalars included)."""
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def service_of(request: Request) -> ServiceState:
    return request.app.state.service


def authenticate(state: ServiceState, api_key: str | None) -> str:
    """The caller's principal, or 401 (same answer for a missing and a wrong key)."""
    principal = state.api_keys.check(api_key)
    if principal is None:
        raise ApiError(401, "unauthorized", "missing or invalid API key (X-API-Key)",
                       {"WWW-Authenticate": "ApiKey"})
    return principal


def require_ready(state: ServiceState) -> LoadedModel:
    """The model serving now (captured once per request), or 503 with Retry-After."""
    model = state.model
    if not state.serving or model is None:
        raise ApiError(503, "not_ready", "the model is not loaded yet or the service is stopping",
                       retry_headers(state.settings.retry_after_s))
    return model


async def read_form(request: Request, state: ServiceState) -> FormData:
    """Parse multipart with our limits; multipart errors -> 400, too many files -> 413."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type", "POST /detect expects multipart/form-data")
    try:
        return await request.form(max_files=state.settings.max_files, max_fields=32,
                                  max_part_size=64 * 1024)
    except StarletteHTTPException as e:
        detail = str(e.detail)
        if detail.startswith("Too many files"):
            raise ApiError(413, "too_many_files", f"at most {state.settings.max_files} images per request") from e
        raise ApiError(400, "malformed_multipart", f"malformed multipart body: {detail}") from e


async def collect_uploads(form: FormData) -> list[Upload]:
    """The `image` files in upload order, with their bytes; 400 when absent or not files."""
    values = form.getlist("image")
    if not values:
        raise ApiError(400, "missing_image", "no `image` file in the form")
    uploads = []
    for i, value in enumerate(values):
        if not isinstance(value, UploadFile):
            raise ApiError(400, "malformed_multipart", f"form field `image` #{i} is not a file")
        name = (value.filename or f"image[{i}]")[:MAX_FILENAME_LEN]
        uploads.append(Upload(name, await value.read()))
    return uploads


def echo_fields(form: FormData) -> dict[str, str]:
    """The identification fields given, checked to be short text (never used as paths)."""
    echo = {}
    for name in ECHO_FIELDS:
        value = form.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ApiError(422, "invalid_parameter", f"form field `{name}` must be text, not a file")
        if len(value) > MAX_FIELD_LEN:
            raise ApiError(422, "invalid_parameter", f"form field `{name}` is longer than {MAX_FIELD_LEN}")
        echo[name] = value
    return echo


def parse_defect_types(raw: str | None) -> list[str] | None:
    """`a,b,c` -> ["a", "b", "c"]; an empty value is passed on so scoring can refuse it."""
    if raw is None:
        return None
    return [t.strip() for t in raw.split(",") if t.strip()]


def check_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    if len(key) > MAX_IDEMPOTENCY_KEY_LEN or not _PRINTABLE.match(key):
        raise ApiError(422, "invalid_parameter",
                       f"Idempotency-Key must be 1..{MAX_IDEMPOTENCY_KEY_LEN} printable ASCII characters")
    return key


@router.post(
    "/detect",
    summary="Detect and localise defects in one or more images",
    operation_id="detect",
    response_model=None,
    responses={200: {"model": DetectResponse, "links": DETECT_LINKS}, **_ERRORS},
    openapi_extra={"requestBody": {"required": True,
                                   "content": {"multipart/form-data": {"schema": DETECT_FORM_SCHEMA}}}},
)
async def detect(
    request: Request,
    mask_format: Literal["rle", "png", "none"] = "rle",
    heatmap: bool = False,
    overlay: bool = False,
    threshold: Annotated[float | None, Query(ge=0.0, le=1.0)] = None,
    defect_types: Annotated[str | None, Query(description="comma list restricting the competing types")] = None,
    heatmap_max_side: Annotated[int | None, Query(ge=0, le=65535, description=HEATMAP_MAX_SIDE_DOC)] = None,
    references: Annotated[bool, Query(description="fuse the product's reference bank, if it has one "
                                             "(false: DAPO's zero-shot answer alone, for comparison)")] = True,
    x_api_key: ApiKey = None,
    idempotency_key: Annotated[str | None, Header(json_schema_extra=IDEMPOTENCY_KEY_SCHEMA)] = None,
    # typed `int` (not `int | None`): a header is never null, and the schema must not offer "null"
    x_deadline_ms: Annotated[int, Header(ge=1, le=MAX_DEADLINE_MS, description=DEADLINE_DOC)] = None,
) -> Response:
    arrived = time.perf_counter()  # the deadline's clock starts here
    state = service_of(request)
    principal = authenticate(state, x_api_key)
    model = require_ready(state)  # this request's model, to the end, whatever swaps meanwhile
    key = check_idempotency_key(idempotency_key)
    admit(state, model)  # before the body is read: overload is refused at once, not after decoding
    model.usage.acquire()  # a swapped-out model is closed only after its last request
    try:
        settings = state.settings
        guard = RequestGuard(Deadline(precheck_budget_s(model, settings.request_timeout_ms, x_deadline_ms), arrived),
                             model.batcher, model.admission, state.metrics,
                             key=f"{principal}:{key}" if key is not None else None)
        request.state.guard = guard  # the error handlers tell this request's own drop from another's
        admit_by_expected_wait(guard)
        options = postprocess.RenderOptions(
            mask_format, heatmap, overlay, settings.min_region_px, settings.max_regions,
            settings.heatmap_max_side if heatmap_max_side is None else heatmap_max_side)
        return await _detect(request, state, model, principal, options, threshold, defect_types, key, guard,
                             x_deadline_ms, references)
    finally:
        model.usage.release()
        state.inflight -= 1


def admit(state: ServiceState, model: LoadedModel) -> None:
    """Count one more /detect in progress, or 503 with Retry-After when the limit is reached."""
    if state.inflight >= state.settings.max_inflight_requests:
        retry = model.admission.retry_after() if model.admission is not None else state.settings.retry_after_s
        raise ApiError(503, "overloaded",
                       f"{state.inflight} requests in progress (limit {state.settings.max_inflight_requests})",
                       retry_headers(retry))
    state.inflight += 1


def precheck_budget_s(model: LoadedModel, default_ms: int, header_ms: int | None) -> float | None:
    """The budget known before the form is read: the header's, else the longest a product or
    the default allows (the product is a form field: the exact budget is set once it is read)."""
    if header_ms is not None:
        return header_ms / 1000.0
    products = [p.timeout_ms for p in model.manifest.products.values() if p.timeout_ms is not None]
    if not products:
        return default_ms / 1000.0 if default_ms else None
    if not default_ms:
        return None  # a product without a deadline may come
    return max([default_ms, *products]) / 1000.0


def admit_by_expected_wait(guard: RequestGuard) -> None:
    """Refuse before the body is read when even one image would be answered too late."""
    if guard.admission is None:
        return
    d = guard.admission.decide(1, guard.deadline.budget_s, guard.deadline.elapsed(), before_body=True,
                               key=guard.key)
    guard.observer.promised.set(guard.admission.promised_images)
    guard.promised = d.promised
    if not d.admit:
        raise overloaded(d.retry_after_s, f"expected answer in {d.expected_s:.1f} s, after the deadline of "
                                          f"{guard.deadline.budget_s:.1f} s")


async def _detect(request: Request, state: ServiceState, model: LoadedModel, principal: str,
                  options: postprocess.RenderOptions, threshold: float | None, defect_types: str | None,
                  key: str | None, guard: RequestGuard, header_ms: int | None, references: bool = True) -> Response:
    form = await read_form(request, state)
    try:
        echo = echo_fields(form)
        policy = model.detector.policy(echo.get("product"), parse_defect_types(defect_types), threshold,
                                       references=references)
        uploads = await collect_uploads(form)
    finally:
        await form.close()
    product = model.manifest.products.get(echo.get("product") or "")
    guard.set_budget_ms(budget_ms(header_ms, product.timeout_ms if product else None,
                                  state.settings.request_timeout_ms))
    request_id = request.state.request_id

    def caller_left() -> None:
        guard.ticket.leave()
        model.batcher.drop(guard.ticket, ClientLeft("the client disconnected before its images were encoded"))

    watcher = asyncio.create_task(watch_disconnect(request.receive, caller_left))
    try:
        return await _answer(request, state, model, uploads, policy, options, echo, key, guard, principal,
                             request_id)
    finally:
        watcher.cancel()


async def _answer(request: Request, state: ServiceState, model: LoadedModel, uploads: list[Upload],
                  policy: scoring.Policy, options: postprocess.RenderOptions, echo: dict[str, str],
                  key: str | None, guard: RequestGuard, principal: str, request_id: str) -> Response:
    async def produce() -> StoredResponse:
        results = await pipeline.detect(state, model, uploads, policy, options, echo, guard)
        state.quality.observe(model.manifest, results, echo)
        answer_id = new_answer_id()  # the server's id of this answer; request_id stays the caller's
        body = {"request_id": request_id, "answer_id": answer_id, "model": model.ref(), "results": results}
        stored = StoredResponse(200, encode_json(body))
        answer = state.loop.after_detect(request_id, body["model"], uploads, results, echo, answer_id)
        await state.loop.remember(answer)  # for feedback; awaited so that a verdict may follow at once
        return stored

    if key is None:
        stored, replayed = await produce(), False
    else:
        # hashing the uploads (up to max_request_mb) would hold the event loop: the CPU pool does it
        fingerprint = await pipeline.run_cpu(
            state, request_fingerprint, "/detect", request.query_params.multi_items(), sorted(echo.items()),
            [("image", u.filename, u.data) for u in uploads])
        stored, replayed = await state.idempotency.run(f"{principal}:{key}", fingerprint, produce)
    if not replayed:
        guard.delivered(len(guard.ticket.items))  # images, tiles included: goodput's unit
    headers = {"Idempotent-Replayed": "true"} if replayed else {}
    return Response(stored.body, status_code=stored.status, media_type=stored.media_type, headers=headers)


@router.get("/livez", summary="The process is up", operation_id="getLiveness")
async def livez() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/readyz", summary="Artifact loaded, warm-up done, backend usable", operation_id="getReadiness",
            responses={503: {"model": ErrorResponse}})
async def readyz(request: Request) -> JSONResponse:
    backend = require_ready(service_of(request)).detector.backend
    return JSONResponse({"status": "ready", "backend": backend.name, "provider": backend.provider})


@router.get("/v1/model", summary="The served model, its vocabulary and per-product settings", operation_id="getModel",
            responses={401: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
async def model_info(request: Request, x_api_key: ApiKey = None) -> JSONResponse:
    state = service_of(request)
    authenticate(state, x_api_key)
    model = state.model
    if model is None:
        model = require_ready(state)
    m, backend, s = model.detector.manifest, model.detector.backend, state.settings
    banks = model.detector.references.sizes()
    products = {name: {**scoring.product_settings(m, name).model_dump(), "references": banks.get(name)}
                for name in m.products}
    return JSONResponse({
        **model.ref(),
        "description": m.description,
        "created": m.created,
        "image_size": m.image_size,
        "backend": {"name": backend.name, "provider": backend.provider, **backend_precision(backend)},
        "vocabulary": [{"id": v.id, "name": v.name} for v in m.vocabulary],
        "image_threshold": m.image_threshold,
        "pixel_threshold": m.pixel_threshold,
        "gaussian_sigma": m.gaussian_sigma,
        "products": products,
        "verification_passed": m.verification.passed if m.verification is not None else None,
        "artifact": str(model.artifact),
        "reload": state.reloader.last.to_dict() if state.reloader and state.reloader.last else None,
        "auth_enabled": state.api_keys.enabled,
        "limits": {"max_body_bytes": s.max_body_bytes, "max_files": s.max_files, "max_pixels": s.max_pixels,
                   "max_side": s.max_side},
        "batching": {"max_batch_size": s.max_batch_size, "max_queue_delay_ms": s.max_queue_delay_ms,
                     "max_queue_size": s.max_queue_size, "workers": s.workers},
    })


def backend_precision(backend) -> dict:
    """/v1/model's backend.precision, .isa and .precision_auto (what auto measured and picked)."""
    return {k: v for k, v in precision_info(backend).items() if k != "backend"}


@router.get("/metrics", summary="Prometheus metrics", operation_id="getMetrics", response_class=Response)
async def metrics(request: Request) -> Response:
    state = service_of(request)
    model = state.model
    if model is not None:
        state.metrics.set_queue_depth(model.batcher.depth)
    return Response(state.metrics.render(), media_type=state.metrics.content_type)


@router.post("/v1/model/reload", summary="Load an artifact beside the serving model and switch to it",
             operation_id="reloadModel",
             responses={200: {"model": ReloadResponse}, 401: {"model": ErrorResponse}, 403: {"model": ErrorResponse},
                        409: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
                        500: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
             openapi_extra={"requestBody": {"required": False, "content": {
                 "application/json": {"schema": component_ref(ReloadRequest)}}}})
async def reload_model(request: Request, x_api_key: ApiKey = None) -> JSONResponse:
    """Admin only. Verifies, loads and warms the artifact beside the serving model, then switches;
    on failure the serving model is unchanged and the error says why (see service.server.reload).
    The body (optional JSON `{"artifact": "<folder>"}`) is read only after the key was checked."""
    state = service_of(request)
    if not state.admin_keys.enabled:
        raise ApiError(403, "forbidden", "reload over HTTP is off: no admin key is configured "
                                         "(DAPO_ADMIN_KEYS or DAPO_ADMIN_KEYS_FILE); SIGHUP reloads the configured artifact")
    if state.admin_keys.check(x_api_key) is None:
        raise ApiError(401, "unauthorized", "missing or invalid admin key (X-API-Key)", {"WWW-Authenticate": "ApiKey"})
    body = await reload_body(request)
    require_ready(state)
    assert state.reloader is not None
    try:
        report = await state.reloader.reload(Path(body.artifact) if body.artifact else None, "http", body.precision)
    except ReloadInProgress as e:
        raise ApiError(409, "reload_in_progress", str(e)) from e
    except ReloadFailed as e:
        if e.invalid_artifact:
            raise ApiError(422, "invalid_artifact", e.report.error or "") from e
        raise ApiError(500, "reload_failed", e.report.error or "") from e
    return JSONResponse(report.to_dict())


async def reload_body(request: Request) -> ReloadRequest:
    """The optional JSON body; empty = the configured artifact; anything malformed -> 422."""
    raw = await request.body()
    if not raw.strip():
        return ReloadRequest()
    try:
        return ReloadRequest.model_validate_json(raw)
    except ValidationError as e:
        raise ApiError(422, "invalid_parameter", f"reload body must be JSON {{\"artifact\": \"<folder>\"}}: "
                                                 f"{validation_message(list(e.errors()))}") from e
