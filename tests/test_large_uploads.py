"""Camera-sized uploads over HTTP on the real demo artifact: answers at the original size,
heatmaps/overlays capped (full size on request), and the overlay never changes the verdict."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pycocotools import mask as mask_utils

from service.server.app import create_app
from service.server.schemas import DetectResponse
from service.server.settings import Settings


@pytest.fixture(scope="module")
def client(demo_artifact):
    with TestClient(create_app(Settings(artifact=demo_artifact), configure_logs=False)) as c:
        yield c


@pytest.fixture(scope="module")
def camera_jpeg() -> bytes:
    """2448 x 2048 (5 MP): smooth structure, a dark scratch, grain and noise."""
    rng = np.random.default_rng(7)
    w, h = 2448, 2048
    coarse = Image.fromarray(rng.integers(60, 200, (h // 128 + 2, w // 128 + 2, 3), dtype=np.uint8))
    arr = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    arr[900:930, 400:2000] *= 0.3
    arr += rng.normal(0.0, 3.0, (h, w, 1)).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def post(client, data: bytes, query: str) -> dict:
    r = client.post(f"/detect?{query}", files=[("image", ("cam.jpg", data, "image/jpeg"))])
    assert r.status_code == 200, r.text
    return DetectResponse.model_validate(r.json()).model_dump(exclude_none=True)["results"][0]


def png_size(b64: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


def verdict(result: dict) -> dict:
    return {k: result[k] for k in ("width", "height", "anomaly_score", "defect_types", "regions", "mask")}


def test_overlays_are_capped_by_default_and_full_on_request(client, camera_jpeg):
    plain = post(client, camera_jpeg, "mask_format=rle")
    capped = post(client, camera_jpeg, "mask_format=rle&heatmap=true&overlay=true")
    assert png_size(capped["heatmap_png"]) == png_size(capped["overlay_png"]) == (612, 512)  # 1/4 within 1024
    small = post(client, camera_jpeg, "mask_format=rle&overlay=true&heatmap_max_side=500")
    assert png_size(small["overlay_png"]) == (306, 256)  # 1/8 within 500
    full = post(client, camera_jpeg, "mask_format=rle&heatmap=true&overlay=true&heatmap_max_side=0")
    assert png_size(full["heatmap_png"]) == png_size(full["overlay_png"]) == (2448, 2048)
    # the overlay's own decode never touches the model's input: same verdict, masks and regions
    assert verdict(plain) == verdict(capped) == verdict(small) == verdict(full)
    assert (plain["width"], plain["height"]) == (2448, 2048)


def test_rle_and_png_masks_agree_at_the_original_size(client, camera_jpeg):
    rle = post(client, camera_jpeg, "mask_format=rle&threshold=0")
    png = post(client, camera_jpeg, "mask_format=png&threshold=0")
    ids = np.asarray(Image.open(io.BytesIO(base64.b64decode(png["mask"]["png"]))))
    assert ids.shape == (2048, 2448)
    names = {v: int(k) for k, v in rle["mask"]["label_map"].items()}
    for name, obj in rle["mask"]["rle"].items():
        decoded = mask_utils.decode({"size": obj["size"], "counts": obj["counts"].encode()})
        np.testing.assert_array_equal(decoded.astype(bool), ids == names[name])


def test_bad_heatmap_max_side_is_422_and_the_parameter_is_documented(client, camera_jpeg):
    r = client.post("/detect?heatmap=true&heatmap_max_side=-1", files=[("image", ("c.jpg", camera_jpeg, "image/jpeg"))])
    assert r.status_code == 422 and r.json()["error"]["code"]
    params = {p["name"]: p for p in client.get("/openapi.json").json()["paths"]["/detect"]["post"]["parameters"]}
    assert "heatmap_max_side" in params and "0 = the original size" in params["heatmap_max_side"]["description"]
