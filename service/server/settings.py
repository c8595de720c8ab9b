"""Runtime configuration of the service, read from `DAPO_*` environment variables.

Everything an operator tunes on a line lives here (artifact, backend, batching, limits, keys),
so a deployment is described by its environment alone (12-factor; docker-compose friendly).
List values accept a comma-separated string (`DAPO_PROVIDERS=CUDA,CPU`) because that is what
people type into compose files; a JSON list works as well.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.runtime.artifact import DEMO_ARTIFACT
from service.server.line.samples_policy import SampleRule


def _split_list(value: object) -> object:
    """Turn "a, b" or '["a","b"]' into ["a", "b"]; leave lists (and None) alone."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


MAX_QUALITY_STATIONS = 256  # station_id label values beyond the two below
# Quality-metric label values (service/server/quality.py): a value outside the bounded set, and
# a field the request did not give. Reserved, so no allow-listed station may be named so.
LABEL_OTHER = "other"
LABEL_NONE = "none"


class Settings(BaseSettings):
    """All knobs of `dapo serve`; defaults suit one GPU node behind a line gateway."""

    model_config = SettingsConfigDict(env_prefix="DAPO_", extra="ignore")

    # --- model -------------------------------------------------------------------------
    artifact: Path = DEMO_ARTIFACT
    # openvino: CPU stations (the `openvino` extra); see docs/cpu-backends.md
    backend: Literal["onnxruntime", "openvino", "torch"] = "onnxruntime"
    # Execution providers in preference order (e.g. TensorRT,CUDA,CPU); None = backend's choice.
    providers: Annotated[list[str] | None, NoDecode] = None
    trt_cache_dir: str | None = None
    ort_io_binding: bool | None = None  # ONNX Runtime I/O binding; None = on for CUDA/TensorRT, off on CPU
    device: str | None = None  # torch backend: "cuda", "cuda:1", "cpu"; None = cuda if available
    # torch backend: compute dtype. onnxruntime: which graph, fp32 = encoder.onnx, fp16 =
    # encoder_fp16.onnx (baked with `dapo bake --fp16`; fp32 inputs/outputs); bf16 is torch-only.
    # openvino: fp32 (explicit f32), bf16 (CPUs with native bf16 only), int8 (encoder_int8.xml).
    # int8 (onnxruntime: encoder_int8_ort.onnx, openvino) from `dapo quantize` / `dapo bake --int8`.
    # auto (onnxruntime, openvino): at load, the fastest on this CPU of the precisions the artifact
    # carries that passed their accuracy check (service.runtime.precision).
    precision: Literal["fp32", "fp16", "bf16", "int8", "auto"] = "fp32"
    warmup: bool = True

    # --- batching (Triton-style dynamic batching) ---------------------------------------
    max_batch_size: int = Field(default=8, ge=1, le=256)
    # 0 = greedy: a batch takes what queued while the previous one ran (no added latency when idle)
    max_queue_delay_ms: float = Field(default=0.0, ge=0.0, le=10_000.0)
    max_queue_size: int = Field(default=64, ge=1)  # images waiting; beyond it: 503 at once
    workers: int = Field(default=1, ge=1, le=64)  # inference threads (concurrent batches)
    # /detect requests in progress (reading, decoding, queued, postprocessing); beyond it 503 at once
    max_inflight_requests: int = Field(default=64, ge=1)
    # Retry-After before any batch time is measured (afterwards it is computed from the expected wait)
    retry_after_s: int = Field(default=1, ge=0)
    # default deadline of a /detect request, ms from its arrival (header X-Deadline-Ms and a
    # product's manifest `timeout_ms` override it); past it: 504 deadline_exceeded; 0 = none
    request_timeout_ms: int = Field(default=30_000, ge=0, le=3_600_000)

    # --- request limits ---------------------------------------------------------------
    max_body_bytes: int = Field(default=50 * 1024 * 1024, ge=1)
    max_files: int = Field(default=16, ge=1)
    max_pixels: int = Field(default=40_000_000, ge=1)
    max_side: int = Field(default=16384, ge=1)

    # --- postprocessing -----------------------------------------------------------------
    min_region_px: int = Field(default=16, ge=1)  # smaller connected regions are not reported
    max_regions: int = Field(default=100, ge=0)  # per image, highest score first
    # heatmap_png / overlay_png: the original divided by the smallest power of two that brings the
    # longer side to at most this many px (smaller images keep their size); a request may ask
    # for another cap, or the original size with heatmap_max_side=0
    heatmap_max_side: int = Field(default=1024, ge=0, le=16384)
    # threads for decode / preprocess / postprocess, and the openvino backend's inference threads;
    # None = one per CPU available to the process (openvino: one per physical core)
    cpu_threads: int | None = Field(default=None, ge=1, le=1024)

    # --- closing the loop with the line (service.server.line.loop): sinks, samples, feedback ----
    # MQTT result sink (the `sinks` extra): mqtt://host:1883 or mqtts://host:8883 (TLS); unset = off
    mqtt_url: str | None = None
    mqtt_topic: str = "dapo/{station_id}/{product}/result"  # placeholders: echo fields, verdict
    mqtt_status_topic: str = "dapo/status/{client_id}"  # retained "online"; "offline" is the last will
    mqtt_client_id: str | None = None  # None = dapo-<hostname>
    mqtt_username: str | None = None
    mqtt_password: SecretStr | None = None
    mqtt_password_file: Path | None = None
    mqtt_ca_file: Path | None = None  # mqtts: CA bundle (None = the system's)
    mqtt_cert_file: Path | None = None  # mqtts: client certificate (mutual TLS)
    mqtt_key_file: Path | None = None
    mqtt_keepalive_s: int = Field(default=30, ge=5, le=3600)
    mqtt_reconnect_max_s: int = Field(default=30, ge=1, le=3600)
    mqtt_queue_size: int = Field(default=1000, ge=1)  # results waiting; beyond it the oldest is dropped
    mqtt_rate_per_s: float = Field(default=100.0, gt=0)
    # Webhook result sink (the `sinks` extra): HTTP POST of the same JSON; unset = off
    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None  # HMAC-SHA256 key for X-Dapo-Signature-256
    webhook_secret_file: Path | None = None
    webhook_timeout_s: float = Field(default=5.0, gt=0)
    webhook_queue_size: int = Field(default=1000, ge=1)
    webhook_rate_per_s: float = Field(default=20.0, gt=0)
    sink_backoff_initial_s: float = Field(default=0.5, gt=0)  # retry delay doubles up to the max
    sink_backoff_max_s: float = Field(default=30.0, gt=0)
    # Samples kept by policy: {product or "*": [{kind, n, band, cap, retention}]}, as JSON or a
    # path to a JSON file; written under samples_dir/<kind>/ in the `folder` layout
    samples_dir: Path | None = None
    samples_policy: Annotated[dict[str, list[SampleRule]], NoDecode] = {}
    samples_queue_size: int = Field(default=256, ge=1)
    # Operator feedback (POST /v1/feedback): a SQLAlchemy URL or a SQLite file path; unset = off
    feedback_db: str | None = None
    feedback_window_s: float = Field(default=3600.0, gt=0)  # how long an answer can get feedback
    feedback_ring_mb: float = Field(default=256.0, gt=0)  # memory for the images kept that long

    # --- security -----------------------------------------------------------------------
    api_keys: Annotated[list[SecretStr], NoDecode] = []
    api_keys_file: Path | None = None
    # keys for POST /v1/model/reload (same X-API-Key header); none = reload over HTTP is off
    # (SIGHUP still reloads). Kept apart from api_keys: a line client cannot swap the model.
    admin_keys: Annotated[list[SecretStr], NoDecode] = []
    admin_keys_file: Path | None = None
    idempotency_ttl_s: float = Field(default=600.0, gt=0)
    idempotency_max_entries: int = Field(default=1024, ge=1)
    # how long a claimed Idempotency-Key waits for its first request's answer (DAPO_STATE_URL);
    # a replica that dies mid-request holds the key this long, then a retry runs again
    idempotency_claim_ttl_s: float = Field(default=120.0, gt=0)

    # --- a fleet (service.server.fleet): state shared by replicas ----------------------------
    # redis://host:6379/0: idempotency records, the recent answers feedback refers to and the
    # drift windows live there, so N replicas behave as one; unset = in this process
    state_url: str | None = None
    state_timeout_s: float = Field(default=0.5, gt=0)  # deadline of one call to the shared state
    # after a failed call: answer 503 (Retry-After) at once for this long, then probe again
    state_retry_s: float = Field(default=1.0, gt=0)
    cors_origins: Annotated[list[str], NoDecode] = []  # empty = CORS off

    # --- quality metrics (service/server/quality.py) -------------------------------------
    # station_id values that get their own `station_id` label (others fold into "other");
    # empty = no station label at all, so clients cannot grow the number of series
    quality_stations: Annotated[list[str], NoDecode] = []
    drift_window: int = Field(default=500, ge=10, le=100_000)  # last N scores per product for the drift gauges
    drift_min_images: int = Field(default=50, ge=1)  # no drift value before this many scores

    # --- process ------------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    graceful_timeout_s: float = Field(default=30.0, gt=0)  # uvicorn's wait for in-flight requests

    @field_validator("providers", "api_keys", "admin_keys", "cors_origins", "quality_stations", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("providers", mode="after")
    @classmethod
    def _empty_providers_is_auto(cls, value: list[str] | None) -> list[str] | None:
        return value or None

    @field_validator("api_keys_file", "admin_keys_file", "trt_cache_dir", "device", "ort_io_binding", "cpu_threads",
                     "mqtt_url", "mqtt_client_id", "mqtt_username", "mqtt_password", "mqtt_password_file",
                     "mqtt_ca_file", "mqtt_cert_file", "mqtt_key_file", "webhook_url", "webhook_secret",
                     "webhook_secret_file", "samples_dir", "feedback_db", "state_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """`DAPO_API_KEYS_FILE=` (empty) means no file, not the current directory."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("samples_policy", mode="before")
    @classmethod
    def _policy_json_or_file(cls, value: object) -> object:
        """Inline JSON (`{"*": [...]}`) or the path of a JSON file holding it."""
        if isinstance(value, Path):
            value = str(value)
        if not isinstance(value, str):
            return value
        text = value.strip()
        if not text:
            return {}
        return json.loads(text if text.startswith("{") else Path(text).read_text(encoding="utf-8"))

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("quality_stations", mode="after")
    @classmethod
    def _bounded_stations(cls, value: list[str]) -> list[str]:
        """A short list of short names, none of them a reserved label value."""
        if len(value) > MAX_QUALITY_STATIONS:
            raise ValueError(f"at most {MAX_QUALITY_STATIONS} stations get their own label, got {len(value)}")
        reserved = sorted({LABEL_OTHER, LABEL_NONE} & set(value))
        if reserved:
            raise ValueError(f"{reserved} are reserved label values (stations outside the list / not given)")
        too_long = [v for v in value if len(v) > 64]
        if too_long:
            raise ValueError(f"station names longer than 64 characters: {too_long[:3]}")
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        # A request's images are queued all-or-nothing, so one request must fit the queue.
        if self.max_files > self.max_queue_size:
            raise ValueError(
                f"max_files ({self.max_files}) must not exceed max_queue_size ({self.max_queue_size})"
            )
        if self.drift_min_images > self.drift_window:
            raise ValueError(f"drift_min_images ({self.drift_min_images}) must not exceed drift_window "
                             f"({self.drift_window})")
        return self
