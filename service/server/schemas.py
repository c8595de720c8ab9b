"""Response models: the API.md contract as pydantic classes, for /docs and contract tests.

The routes build plain dicts (no per-request validation cost); these models document them in
OpenAPI and the tests validate real answers against them with extra="forbid", so the docs and
the wire format cannot drift apart silently.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelRef(_Strict):
    name: str
    version: str
    backbone: str
    artifact_sha256: str = Field(description="sha256 of the artifact's manifest.json (which lists every file's "
                                             "sha256): the exact model that computed this answer")


class DefectType(_Strict):
    name: str
    score: float = Field(description="P(type | defective), over the types allowed for this call")
    area_fraction: float
    max_pixel_score: float


class Region(_Strict):
    defect_type: str
    bbox: list[int] = Field(min_length=4, max_length=4, description="[x, y, w, h], original pixels")
    area_px: int
    score: float = Field(description="max anomaly-map value inside the region")


class Rle(_Strict):
    size: list[int] = Field(min_length=2, max_length=2, description="[H, W]")
    counts: str


class Mask(_Strict):
    format: Literal["rle", "png"]
    label_map: dict[str, str]
    rle: dict[str, Rle] | None = None
    png: str | None = Field(default=None, description="base64 indexed PNG; pixel value = class id")


class Timing(_Strict):
    decode: float
    preprocess: float
    queue_wait: float
    inference: float
    postprocess: float


class Result(_Strict):
    filename: str
    width: int
    height: int
    anomaly_score: float
    is_anomalous: bool
    threshold: float
    defect_types: list[DefectType]
    regions: list[Region]
    mask: Mask | None = None
    heatmap_png: str | None = Field(default=None, description=(
        "base64 8-bit gray PNG of the anomaly map, at the original size divided by the smallest power "
        "of two within heatmap_max_side (default 1024 px; 0 = original size)"))
    overlay_png: str | None = Field(default=None, description="base64 PNG: the heatmap blended over the image, "
                                    "same size as heatmap_png")
    timing_ms: Timing
    references_used: bool = Field(description=(
        "whether the product's reference bank (good parts, `dapo calibrate --references`) was fused with "
        "DAPO's zero-shot map and score; false without a bank or with references=false"))
    product: str | None = None
    part_id: str | None = None
    station_id: str | None = None
    recipe_id: str | None = None


class DetectResponse(_Strict):
    request_id: str = Field(description="the caller's X-Request-ID (or one made up): a correlation id, echoed")
    answer_id: str = Field(description="the server's id of this answer (a UUIDv7), unique across replicas and "
                           "restarts: how feedback, samples and sink messages name it")
    model: ModelRef
    results: list[Result]


class ErrorBody(_Strict):
    code: str
    message: str
    request_id: str


class ErrorResponse(_Strict):
    error: ErrorBody


MAX_FIELD_LEN = 256  # each echoed form field (product, part_id, station_id, recipe_id)
DETECT_FORM_SCHEMA = {
    "type": "object",
    "required": ["image"],
    "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
                  "description": "one or more images (repeat the field): JPEG, PNG, BMP, TIFF, WebP; "
                                 "a form without one is answered 400 missing_image"},
        "product": {"type": "string", "minLength": 1, "maxLength": MAX_FIELD_LEN,
                    "description": "a product of the served artifact (GET /v1/model lists them; another name is "
                                   "answered 422 invalid_parameter): selects allowed defect types and thresholds"},
        "part_id": {"type": "string", "maxLength": MAX_FIELD_LEN},
        "station_id": {"type": "string", "maxLength": MAX_FIELD_LEN},
        "recipe_id": {"type": "string", "maxLength": MAX_FIELD_LEN},
    },
}


class ReloadResponse(_Strict):
    """POST /v1/model/reload's answer (also /v1/model's `reload`, there with any status)."""

    status: Literal["in_progress", "ok", "failed"]
    source: str = Field(description="http or sighup")
    artifact: str
    started: str
    seconds: float | None = Field(description="load + sha256 verification + warm-up, until the switch")
    model: ModelRef | None = Field(description="the model now serving")
    previous: ModelRef | None = Field(description="the model it replaced (released after its last request)")
    error: str | None


class ReloadRequest(_Strict):
    """Body of POST /v1/model/reload (optional): which artifact folder to load."""

    artifact: str | None = Field(default=None, min_length=1, max_length=4096,
                                 description="artifact folder on the server; default: the configured one")
    precision: Literal["fp32", "fp16", "bf16", "int8", "auto"] | None = Field(
        default=None, description="precision of this load (e.g. fp32 -> int8); default: DAPO_PRECISION")
