"""A small Python client for the inspection service (`DapoClient`), built on httpx.

    from service.client import DapoClient
    with DapoClient("http://inspect-node:8000", api_key="...") as dapo:
        result = dapo.detect(["part.png"], product="bolt", part_id="A-1234")
        print(result["results"][0]["anomaly_score"])

Retries are safe: every `detect` call sends one `Idempotency-Key` (a fresh uuid4) and reuses it
for all of its attempts, so a retry after a lost answer gets the stored result instead of a
second inference. Retried: connection errors and timeouts, 429 and 503 (waiting what
`Retry-After` asks, capped at `max_wait`), and other 5xx (exponential backoff with jitter).
Any other 4xx raises `DapoClientError` at once with the server's code, message and request id.
Only httpx is needed (not part of the service install: `pip install httpx`).
"""
from __future__ import annotations

import email.utils
import mimetypes
import random
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx

__all__ = ["DapoClient", "DapoClientError", "ImageInput"]

ImageInput = str | Path | bytes | tuple[str, bytes]
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class DapoClientError(Exception):
    """A failed call: the HTTP status (None when no answer came), the server's error code,
    message and request id (from its `{"error": {...}}` envelope), and how many attempts ran."""

    def __init__(self, status: int | None, code: str, message: str, request_id: str | None = None,
                 attempts: int = 1):
        super().__init__(f"{status or 'no response'} {code}: {message}"
                         + (f" (request_id={request_id})" if request_id else ""))
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.attempts = attempts

    @classmethod
    def from_response(cls, response: httpx.Response, attempts: int = 1) -> DapoClientError:
        code, message = f"http_{response.status_code}", response.text[:500]
        request_id = response.headers.get("x-request-id")
        try:
            error = response.json().get("error")
        except (ValueError, AttributeError):
            error = None
        if isinstance(error, dict):
            code = str(error.get("code") or code)
            message = str(error.get("message") or message)
            request_id = error.get("request_id") or request_id
        return cls(response.status_code, code, message, request_id, attempts)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """`Retry-After` as seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _image_part(index: int, image: ImageInput) -> tuple[str, tuple[str, bytes, str]]:
    """One multipart `image` part: (field, (filename, bytes, content type)). Read once, up front,
    so every retry sends exactly the same body (and thus matches the idempotency fingerprint)."""
    if isinstance(image, tuple):
        filename, data = image
    elif isinstance(image, (bytes, bytearray, memoryview)):
        filename, data = f"image{index}", bytes(image)
    else:
        path = Path(image)
        filename, data = path.name, path.read_bytes()
    content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    return "image", (filename, bytes(data), content_type)


def _bool(value: bool) -> str:
    return "true" if value else "false"


class DapoClient:
    """Client of one dapo-inspect service. Thread-safe for concurrent calls (one httpx.Client)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.5, max_wait: float = 30.0, *,
                 transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep, headers: dict[str, str] | None = None):
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self.max_wait = max_wait
        self._sleep = sleep
        base_headers = {"User-Agent": "dapo-client/1", **(headers or {})}
        if api_key:
            base_headers["X-API-Key"] = api_key
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=base_headers, transport=transport)

    # --- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DapoClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- retry core --------------------------------------------------------------------------
    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Seconds before attempt `attempt + 1`: Retry-After when the server gave one, else
        exponential backoff with full jitter in [backoff * 2**attempt / 2, backoff * 2**attempt]."""
        if response is not None:
            asked = retry_after_seconds(response.headers.get("retry-after"))
            if asked is not None:
                return min(asked, self.max_wait)
        base = self.backoff * (2 ** attempt)
        return min(base * (0.5 + random.random() / 2), self.max_wait)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send with retries; returns the 2xx response or raises DapoClientError. The request is
        built once, so every attempt sends the same bytes (same multipart boundary included)."""
        request = self._http.build_request(method, path, **kwargs)
        request.read()
        attempts = self.retries + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                response = self._http.send(request)
            except httpx.TransportError as e:  # connect/read/write errors and timeouts
                if last:
                    raise DapoClientError(None, "connection_error", f"{type(e).__name__}: {e}",
                                          attempts=attempts) from e
                self._sleep(self._delay(attempt, None))
                continue
            if response.is_success:
                return response
            if response.status_code not in RETRY_STATUSES or last:
                raise DapoClientError.from_response(response, attempt + 1)
            self._sleep(self._delay(attempt, response))
        raise AssertionError("unreachable")  # pragma: no cover

    # --- endpoints ---------------------------------------------------------------------------
    def detect(self, files: Sequence[ImageInput] | ImageInput, product: str | None = None,
               part_id: str | None = None, station_id: str | None = None, recipe_id: str | None = None,
               mask_format: str = "rle", heatmap: bool = False, overlay: bool = False,
               threshold: float | None = None, defect_types: str | Iterable[str] | None = None,
               idempotency_key: str | None = None, request_id: str | None = None) -> dict[str, Any]:
        """POST /detect with one or more images (paths, bytes or (filename, bytes)); the JSON answer."""
        if isinstance(files, (str, Path, bytes, bytearray, tuple)):
            files = [files]
        parts = [_image_part(i, f) for i, f in enumerate(files)]
        if not parts:
            raise ValueError("detect needs at least one image")
        params: dict[str, str] = {"mask_format": mask_format, "heatmap": _bool(heatmap), "overlay": _bool(overlay)}
        if threshold is not None:
            params["threshold"] = repr(float(threshold))
        if defect_types is not None:
            params["defect_types"] = defect_types if isinstance(defect_types, str) else ",".join(defect_types)
        data = {k: v for k, v in {"product": product, "part_id": part_id, "station_id": station_id,
                                  "recipe_id": recipe_id}.items() if v is not None}
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        if request_id:
            headers["X-Request-ID"] = request_id
        return self._request("POST", "/detect", params=params, data=data, files=parts, headers=headers).json()

    def model(self) -> dict[str, Any]:
        """GET /v1/model: name, version, backbone, backend, vocabulary, products, limits."""
        return self._request("GET", "/v1/model").json()

    def ready(self) -> bool:
        """One GET /readyz probe (no retries): True when the service is ready to answer."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.2) -> bool:
        """Poll /readyz until ready or `timeout` seconds passed; whether it became ready."""
        deadline = time.monotonic() + timeout
        while True:
            if self.ready():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)
