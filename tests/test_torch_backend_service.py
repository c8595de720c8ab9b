"""The service on its PyTorch backend: same answers as on ONNX Runtime, and says which it runs."""
from __future__ import annotations

import base64
import io

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from service.server.app import create_app
from service.server.settings import Settings


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _detect(backend: str, artifact, images: list[bytes]) -> tuple[dict, list[dict]]:
    app = create_app(Settings(artifact=artifact, backend=backend, device="cpu"), configure_logs=False)
    with TestClient(app) as client:
        model = client.get("/v1/model").json()
        results = [client.post("/detect", params={"mask_format": "png"},
                               files={"image": ("p.png", img, "image/png")}).json()["results"][0]
                   for img in images]
    return model, results


def test_torch_backend_serves_the_same_answers(demo_artifact):
    images = [_png(s) for s in range(3)]
    ort_model, ort = _detect("onnxruntime", demo_artifact, images)
    torch_model, tch = _detect("torch", demo_artifact, images)
    keys = ("name", "provider", "precision")
    assert {k: ort_model["backend"][k] for k in keys} == {"name": "onnxruntime", "provider": "CPUExecutionProvider",
                                                          "precision": "fp32"}
    assert {k: torch_model["backend"][k] for k in keys} == {"name": "torch", "provider": "cpu:fp32", "precision": "fp32"}
    for a, b in zip(ort, tch):
        assert abs(a["anomaly_score"] - b["anomaly_score"]) < 1e-5  # measured: 3e-7
        assert [d["name"] for d in a["defect_types"]] == [d["name"] for d in b["defect_types"]]
        ma = np.asarray(Image.open(io.BytesIO(base64.b64decode(a["mask"]["png"]))))
        mb = np.asarray(Image.open(io.BytesIO(base64.b64decode(b["mask"]["png"]))))
        assert (ma > 0).any()
        np.testing.assert_array_equal(ma, mb)
