"""Contract tests over HTTP against the REAL demo artifact and its ONNX Runtime backend.

Only two tests wrap the real backend (to hold a batch in flight for the queue-full test, and to
make it fail once for the 503 test); everything else goes through exactly what `dapo serve` runs.
"""
from __future__ import annotations

import base64
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from pycocotools import mask as mask_utils

from service.server.app import create_app
from service.runtime.artifact import load_manifest
from service.runtime.backends import create_backend
from service.server.schemas import DetectResponse, ErrorResponse
from service.server.settings import Settings


# --- helpers ------------------------------------------------------------------------------
def pattern(w: int = 64, h: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.zeros((h, w, 3), np.uint8)
    base[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None]
    base[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    base[h // 3: h // 2, w // 4: w // 2] = rng.integers(0, 255, (h // 2 - h // 3, w // 2 - w // 4, 3))
    return base


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_bytes(w: int = 64, h: int = 48, seed: int = 0) -> bytes:
    return encode(Image.fromarray(pattern(w, h, seed)), "PNG")


def every_format() -> list[tuple[str, bytes, tuple[int, int]]]:
    """(filename, bytes, expected (W, H)) for each accepted format and pixel layout."""
    rgb = Image.fromarray(pattern(64, 48))
    rotated = Image.fromarray(pattern(40, 30))
    exif = rotated.getexif()
    exif[0x0112] = 6
    gray16 = Image.fromarray((np.linspace(0, 65535, 50 * 20).reshape(20, 50)).astype(np.uint16))
    rgba = np.dstack([pattern(30, 20), np.full((20, 30), 128, np.uint8)])
    return [
        ("a.jpg", encode(rgb, "JPEG", quality=90), (64, 48)),
        ("b.png", encode(rgb, "PNG"), (64, 48)),
        ("c.bmp", encode(rgb, "BMP"), (64, 48)),
        ("d.tif", encode(rgb, "TIFF"), (64, 48)),
        ("e.webp", encode(rgb, "WEBP", lossless=True), (64, 48)),
        ("f16.png", encode(gray16, "PNG"), (50, 20)),
        ("g16.tif", encode(gray16, "TIFF"), (50, 20)),
        ("h-gray.png", encode(rgb.convert("L"), "PNG"), (64, 48)),
        ("i-rgba.png", encode(Image.fromarray(rgba), "PNG"), (30, 20)),
        ("j-palette.png", encode(rgb.quantize(32), "PNG"), (64, 48)),
        ("k-cmyk.jpg", encode(rgb.convert("CMYK"), "JPEG"), (64, 48)),
        ("l-exif.jpg", encode(rotated, "JPEG", exif=exif.tobytes()), (30, 40)),
    ]


def files_of(*items: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", (name, data, "application/octet-stream")) for name, data in items]


def metric(client: TestClient, name: str, labels: dict[str, str] | None = None) -> float:
    """A sample's value from /metrics (0 if absent)."""
    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return sample.value
    return 0.0


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    ErrorResponse.model_validate(body)
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


def decode_rle(obj: dict) -> np.ndarray:
    return mask_utils.decode({"size": obj["size"], "counts": obj["counts"].encode()})


def label_image(result: dict) -> np.ndarray:
    """The class-id image of a result from its RLE masks."""
    label_ids = {name: int(i) for i, name in result["mask"]["label_map"].items()}
    out = np.zeros((result["height"], result["width"]), np.uint8)
    for name, obj in result["mask"]["rle"].items():
        out[decode_rle(obj).astype(bool)] = label_ids[name]
    return out


class WrappedBackend:
    """The real backend behind a gate / a one-shot failure switch."""

    def __init__(self, inner, gate: threading.Event | None = None):
        self.inner, self.gate = inner, gate
        self.name, self.provider = inner.name, inner.provider
        self.calls = 0
        self.fail_next = False

    def run(self, pixel_values, allowed):
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("device lost")
        return self.inner.run(pixel_values, allowed)


def real_backend(folder):
    return create_backend(folder, load_manifest(folder))


# --- fixtures -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(demo_artifact):
    app = create_app(Settings(artifact=demo_artifact, max_batch_size=8, max_queue_delay_ms=10), configure_logs=False)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def strict_client(demo_artifact):
    """Auth on and small limits."""
    settings = Settings(artifact=demo_artifact, api_keys="k-one,k-two", max_body_bytes=300_000, max_files=2,
                        max_pixels=200_000, max_side=2000, max_queue_size=4, warmup=False)
    with TestClient(create_app(settings, configure_logs=False)) as c:
        yield c


KEY = {"X-API-Key": "k-two"}


# --- shapes -------------------------------------------------------------------------------
def test_every_accepted_format_gives_a_full_result(client):
    cases = every_format()
    r = client.post("/detect", files=files_of(*[(n, d) for n, d, _ in cases]),
                    data={"part_id": "P-1", "station_id": "S-7", "recipe_id": "R-2"})
    assert r.status_code == 200, r.text
    body = DetectResponse.model_validate(r.json()).model_dump()
    assert body["request_id"] == r.headers["x-request-id"]
    assert body["model"]["name"] == "dapo-demo"
    assert [res["filename"] for res in body["results"]] == [n for n, _, _ in cases]
    for res, (name, _, (w, h)) in zip(body["results"], cases, strict=True):
        assert (res["width"], res["height"]) == (w, h), name
        assert 0.0 <= res["anomaly_score"] <= 1.0
        assert res["is_anomalous"] == (res["anomaly_score"] >= res["threshold"])
        assert res["mask"]["format"] == "rle" and res["mask"]["label_map"]["0"] == "normal"
        for obj in res["mask"]["rle"].values():
            assert obj["size"] == [h, w]
        present = {d["name"] for d in res["defect_types"]}
        assert present == set(res["mask"]["rle"])
        scores = [d["score"] for d in res["defect_types"]]
        assert scores == sorted(scores, reverse=True)
        for reg in res["regions"]:
            x, y, bw, bh = reg["bbox"]
            assert 0 <= x and 0 <= y and x + bw <= w and y + bh <= h and reg["defect_type"] in present
        assert (res["part_id"], res["station_id"], res["recipe_id"]) == ("P-1", "S-7", "R-2")
        assert set(res["timing_ms"]) >= {"decode", "preprocess", "inference", "postprocess"}


def test_rle_equals_png_mask_at_original_size(client):
    data = png_bytes(97, 61, seed=3)
    rle = client.post("/detect?mask_format=rle", files=files_of(("x.png", data))).json()["results"][0]
    png = client.post("/detect?mask_format=png&heatmap=true&overlay=true",
                      files=files_of(("x.png", data))).json()["results"][0]
    indexed = Image.open(io.BytesIO(base64.b64decode(png["mask"]["png"])))
    assert indexed.mode == "P" and indexed.size == (97, 61)
    np.testing.assert_array_equal(label_image(rle), np.asarray(indexed))
    for b64, mode in ((png["heatmap_png"], "L"), (png["overlay_png"], "RGB")):
        im = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert im.mode == mode and im.size == (97, 61)
    none = client.post("/detect?mask_format=none", files=files_of(("x.png", data))).json()["results"][0]
    assert "mask" not in none and "heatmap_png" not in none


def test_product_thresholds_and_type_restriction(client):
    data = png_bytes(seed=0)  # an image on which every product below has defect pixels
    disc = client.post("/detect", files=files_of(("x.png", data)), data={"product": "disc"}).json()["results"][0]
    disc_types = {d["name"] for d in disc["defect_types"]}
    assert disc_types and disc_types <= {"scratch", "hole", "crack"}
    assert disc["product"] == "disc"
    plate = client.post("/detect", files=files_of(("x.png", data)), data={"product": "plate"}).json()["results"][0]
    assert plate["threshold"] == 0.6
    plate_types = {d["name"] for d in plate["defect_types"]}
    assert plate_types and plate_types <= {"hole", "contamination", "discoloration"}
    over = client.post("/detect?threshold=0.01&defect_types=hole", files=files_of(("x.png", data)),
                       data={"product": "plate"}).json()["results"][0]
    assert over["threshold"] == 0.01 and over["is_anomalous"] is True
    assert {d["name"] for d in over["defect_types"]} == {"hole"}


def test_concurrent_requests_are_batched_and_match_single_answers(client):
    images = [png_bytes(64, 48, seed=i % 10) for i in range(50)]
    before = metric(client, "dapo_batch_size_count")
    before_images = metric(client, "dapo_images_processed_total")
    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(lambda d: client.post("/detect", files=files_of(("x.png", d))), images))
    assert all(a.status_code == 200 for a in answers)
    batches = metric(client, "dapo_batch_size_count") - before
    processed = metric(client, "dapo_images_processed_total") - before_images
    assert processed == 50 and batches < 50  # some batch held more than one image
    assert metric(client, "dapo_batch_size_bucket", {"le": "1.0"}) < metric(client, "dapo_batch_size_count")
    for i in range(10):  # each distinct image, sent alone, gives the same answer
        alone = client.post("/detect", files=files_of(("x.png", images[i]))).json()["results"][0]
        batched = answers[i].json()["results"][0]
        assert batched["anomaly_score"] == pytest.approx(alone["anomaly_score"], abs=1e-5)  # measured: 6e-8
        assert [d["name"] for d in batched["defect_types"]] == [d["name"] for d in alone["defect_types"]]
        np.testing.assert_array_equal(label_image(batched), label_image(alone))


# --- errors -------------------------------------------------------------------------------
def test_one_bad_file_fails_the_request_naming_it_and_nothing_runs(client):
    before = metric(client, "dapo_images_processed_total")
    good = png_bytes()
    r = client.post("/detect", files=files_of(("ok.png", good), ("broken.png", good[: len(good) // 3])))
    err = assert_error(r, 400, "invalid_image")
    assert "broken.png" in err["message"]
    assert metric(client, "dapo_images_processed_total") == before


def test_malformed_requests_are_400(client):
    assert_error(client.post("/detect", files={"part_id": (None, "x")}), 400, "missing_image")
    assert_error(client.post("/detect", files={"image": (None, "not a file")}), 400)
    r = client.post("/detect", content=b"--zzz\r\nbroken", headers={"Content-Type": "multipart/form-data; boundary=zzz"})
    assert_error(r, 400)
    assert_error(client.post("/detect", files=files_of(("e.png", b""))), 400)


def test_unsupported_types_are_415(client):
    err = assert_error(client.post("/detect", files=files_of(("notes.txt", b"hello"))), 415)
    assert "notes.txt" in err["message"]
    gif = encode(Image.new("RGB", (8, 8)), "GIF")
    assert_error(client.post("/detect", files=files_of(("a.gif", gif))), 415)
    assert_error(client.post("/detect", json={"image": "x"}), 415)


@pytest.mark.parametrize("query", ["threshold=2", "threshold=abc", "mask_format=jpeg", "heatmap=maybe",
                                   "defect_types=unicorn", "defect_types=,"])
def test_bad_parameters_are_422(client, query):
    assert_error(client.post(f"/detect?{query}", files=files_of(("x.png", png_bytes()))), 422, "invalid_parameter")


def test_bad_form_fields_are_422(client):
    files = files_of(("x.png", png_bytes()))
    assert_error(client.post("/detect", files=files, data={"product": "spaceship"}), 422)
    assert_error(client.post("/detect", files=files, data={"part_id": "x" * 1000}), 422)


def test_limits_are_413(strict_client):
    c = strict_client
    assert_error(c.post("/detect", headers=KEY, files=files_of(*[(f"{i}.png", png_bytes()) for i in range(3)])),
                 413, "too_many_files")
    big = np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)  # ~480 KB as PNG
    err = assert_error(c.post("/detect", headers=KEY, files=files_of(("big.png", encode(Image.fromarray(big), "PNG")))),
                       413, "payload_too_large")
    assert "300000" in err["message"]

    def chunks():  # no Content-Length: the limit is enforced while streaming
        yield b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"s.png\"\r\n\r\n"
        for _ in range(40):
            yield b"\x00" * 10_000
    r = c.post("/detect", headers={**KEY, "Content-Type": "multipart/form-data; boundary=b"}, content=chunks())
    assert_error(r, 413, "payload_too_large")
    many_pixels = encode(Image.new("L", (1000, 1000)), "PNG")  # 1 MP, a few KB
    err = assert_error(c.post("/detect", headers=KEY, files=files_of(("wide.png", many_pixels))), 413, "image_too_large")
    assert "wide.png" in err["message"]


def test_auth(strict_client):
    c = strict_client
    files = files_of(("x.png", png_bytes()))
    assert_error(c.post("/detect", files=files), 401, "unauthorized")
    assert_error(c.post("/detect", files=files, headers={"X-API-Key": "k-three"}), 401)
    assert_error(c.get("/v1/model"), 401)
    assert c.post("/detect", files=files, headers={"X-API-Key": "k-one"}).status_code == 200
    info = c.get("/v1/model", headers=KEY).json()
    assert info["auth_enabled"] is True
    assert c.get("/livez").status_code == 200 and c.get("/readyz").status_code == 200
    assert "k-one" not in c.get("/metrics").text


def test_queue_full_is_503_with_retry_after(demo_artifact):
    gate = threading.Event()
    backend = WrappedBackend(real_backend(demo_artifact), gate)
    settings = Settings(artifact=demo_artifact, max_batch_size=1, max_queue_delay_ms=0, max_queue_size=1,
                        max_files=1, workers=1, warmup=False)
    app = create_app(settings, backend=backend, configure_logs=False)
    with TestClient(app) as c, ThreadPoolExecutor(2) as pool:
        batcher = app.state.service.batcher
        send = lambda: c.post("/detect", files=files_of(("x.png", png_bytes())))  # noqa: E731
        first = pool.submit(send)
        _wait_for(lambda: backend.calls == 1)  # held inside the backend
        second = pool.submit(send)
        _wait_for(lambda: batcher.depth == 1)  # waiting in the queue
        r = send()
        assert_error(r, 503, "queue_full")
        assert r.headers["retry-after"] == "1"
        gate.set()
        assert first.result().status_code == 200 and second.result().status_code == 200


def test_overload_is_refused_at_once_before_reading_the_body(demo_artifact):
    """Past max_inflight_requests, /detect answers 503 immediately, whatever is still decoding."""
    gate = threading.Event()
    backend = WrappedBackend(real_backend(demo_artifact), gate)
    settings = Settings(artifact=demo_artifact, max_inflight_requests=1, warmup=False)
    app = create_app(settings, backend=backend, configure_logs=False)
    with TestClient(app) as c, ThreadPoolExecutor(1) as pool:
        first = pool.submit(lambda: c.post("/detect", files=files_of(("x.png", png_bytes()))))
        _wait_for(lambda: backend.calls == 1)
        r = c.post("/detect", files=files_of(("x.png", png_bytes())))
        assert_error(r, 503, "overloaded")
        assert r.headers["retry-after"] == "1"
        gate.set()
        assert first.result().status_code == 200
        assert app.state.service.inflight == 0  # every admitted request released its place
        assert c.post("/detect", files=files_of(("x.png", png_bytes()))).status_code == 200
        assert_error(c.post("/detect", content=b"x", headers={"content-type": "text/plain"}), 415,
                     "unsupported_media_type")
        assert app.state.service.inflight == 0  # ... also the ones that failed


def test_backend_failure_is_503_and_service_recovers(demo_artifact):
    backend = WrappedBackend(real_backend(demo_artifact))
    app = create_app(Settings(artifact=demo_artifact, warmup=False), backend=backend, configure_logs=False)
    with TestClient(app) as c:
        backend.fail_next = True
        r = c.post("/detect", files=files_of(("x.png", png_bytes())))
        assert_error(r, 503, "inference_failed")
        assert "retry-after" in r.headers
        assert c.post("/detect", files=files_of(("x.png", png_bytes()))).status_code == 200
        assert c.get("/readyz").status_code == 200


def _wait_for(predicate, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


# --- idempotency and request ids ----------------------------------------------------------
def test_idempotent_retry_returns_the_stored_answer_without_inference(client):
    data = png_bytes(seed=7)
    headers = {"Idempotency-Key": "order-42-shot-1"}
    first = client.post("/detect", files=files_of(("x.png", data)), headers=headers)
    processed = metric(client, "dapo_images_processed_total")
    retry = client.post("/detect", files=files_of(("x.png", data)), headers=headers)
    assert retry.status_code == 200 and retry.headers.get("idempotent-replayed") == "true"
    assert retry.content == first.content
    assert metric(client, "dapo_images_processed_total") == processed
    other = client.post("/detect", files=files_of(("x.png", png_bytes(seed=8))), headers=headers)
    assert_error(other, 422, "idempotency_conflict")
    assert_error(client.post("/detect", files=files_of(("x.png", data)), headers={"Idempotency-Key": "a" * 300}), 422)


def test_concurrent_duplicates_share_one_inference(client):
    data = png_bytes(seed=9)
    headers = {"Idempotency-Key": "dup-concurrent"}
    processed = metric(client, "dapo_images_processed_total")
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: client.post("/detect", files=files_of(("x.png", data)), headers=headers),
                                range(4)))
    assert all(a.status_code == 200 for a in answers)
    assert len({a.content for a in answers}) == 1
    assert metric(client, "dapo_images_processed_total") == processed + 1


def test_request_id_is_echoed_or_generated(client):
    r = client.post("/detect", files=files_of(("x.png", png_bytes())), headers={"X-Request-ID": "line3-cam2-000017"})
    assert r.headers["x-request-id"] == "line3-cam2-000017" and r.json()["request_id"] == "line3-cam2-000017"
    err = client.post("/detect?threshold=9", files=files_of(("x.png", png_bytes())), headers={"X-Request-ID": "abc-1"})
    assert err.headers["x-request-id"] == "abc-1" and err.json()["error"]["request_id"] == "abc-1"
    generated = client.get("/livez").headers["x-request-id"]
    assert len(generated) == 32
    hostile = client.get("/livez", headers={"X-Request-ID": "x\" injected=1 " + "y" * 300}).headers["x-request-id"]
    assert "injected" not in hostile


# --- other endpoints ----------------------------------------------------------------------
def test_health_model_metrics_docs(client):
    assert client.get("/livez").json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["backend"] == "onnxruntime"
    info = client.get("/v1/model").json()
    assert info["name"] == "dapo-demo" and info["image_size"] > 0 and info["backbone"]
    assert info["backend"]["name"] == "onnxruntime" and "ExecutionProvider" in info["backend"]["provider"]
    assert info["vocabulary"][0] == {"id": 0, "name": "normal"}
    assert info["products"]["disc"]["defect_types"] == ["scratch", "hole", "crack"]
    assert info["products"]["plate"]["image_threshold"] == 0.6 and info["auth_enabled"] is False
    text = client.get("/metrics").text
    for name in ("dapo_requests_total", "dapo_request_duration_seconds", "dapo_queue_wait_seconds",
                 "dapo_inference_seconds", "dapo_batch_size", "dapo_images_processed_total", "dapo_queue_depth"):
        assert name in text
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "multipart/form-data" in spec["paths"]["/detect"]["post"]["requestBody"]["content"]
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/detect"), 405)


def test_not_ready_is_503_and_cors_when_configured(demo_artifact):
    settings = Settings(artifact=demo_artifact, cors_origins="http://hmi.local", warmup=False)
    app = create_app(settings, configure_logs=False)
    with TestClient(app) as c:
        r = c.options("/detect", headers={"Origin": "http://hmi.local", "Access-Control-Request-Method": "POST"})
        assert r.headers["access-control-allow-origin"] == "http://hmi.local"
        app.state.service.ready = False  # as during shutdown
        assert_error(c.get("/readyz"), 503, "not_ready")
        assert_error(c.post("/detect", files=files_of(("x.png", png_bytes()))), 503, "not_ready")
        app.state.service.ready = True
        assert c.get("/readyz").status_code == 200
