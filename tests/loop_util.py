"""Helpers shared by the closing-the-loop tests (sinks, samples, feedback)."""
from __future__ import annotations

import io
import time

import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

IMAGE_FIELDS = ("mask", "heatmap_png", "overlay_png")


def png(seed: int, w: int = 80, h: int = 64) -> bytes:
    """A small noisy RGB PNG (the random demo model's scores vary with texture)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def detect(client, images: list[bytes], params: dict | None = None, headers: dict | None = None, **fields) -> dict:
    files = [("image", (f"part{i}.png", data, "image/png")) for i, data in enumerate(images)]
    r = client.post("/detect", files=files, data=fields, params=params or {}, headers=headers or {})
    assert r.status_code == 200, r.text
    return r.json()


def timed_detect(client, image: bytes, **fields) -> tuple[float, dict]:
    t = time.perf_counter()
    body = detect(client, [image], **fields)
    return time.perf_counter() - t, body


def without_images(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in IMAGE_FIELDS}


def metric(client, name: str, **labels: str) -> float:
    """A sample's value from /metrics, read with prometheus_client's own parser (0 when absent)."""
    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
