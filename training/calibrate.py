"""`dapo calibrate`: per-product thresholds from good parts, written into the manifest.

A threshold is a quantile ("higher" method: an observed score, never interpolated) of the scores
that known-good parts get (image: anomaly score;
pixel: anomaly-map values), so the expected false-alarm rate on good parts is 1 - quantile.
Only manifest.json changes; the hashed model files stay as they are.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from service.runtime.artifact import Product, write_manifest
from service.runtime.detector import Detector, RuntimeOptions
from training.data import Sample
from training.evaluate import run_artifact


def calibrate(artifact: str | Path, good: list[Sample], image_quantile: float = 0.99,
              pixel_quantile: float = 0.999, backend: str = "onnxruntime", progress: bool = False) -> dict:
    """Return {product: {image_threshold, pixel_threshold, images}} and update the manifest."""
    for q in (image_quantile, pixel_quantile):
        if not 0.0 < q <= 1.0:
            raise ValueError(f"quantiles must be within (0, 1], got {q}")
    bad = [s.image for s in good if s.label != 0]
    if bad:
        raise ValueError(f"calibration takes good parts only; {bad[0]} is labelled defective")
    if not good:
        raise ValueError("no good images to calibrate on")
    detector = Detector.load(artifact, RuntimeOptions(backend=backend))
    collected = run_artifact(detector, good, use_products=True, progress=progress)
    manifest = detector.manifest.model_copy(deep=True)
    table = {}
    for product, c in sorted(collected.items()):
        image_thr = float(np.quantile(np.array(c.scores), image_quantile, method="higher"))
        pixel_thr = float(np.quantile(np.concatenate([m.ravel() for m in c.maps]), pixel_quantile, method="higher")) \
            if c.maps else None
        entry = manifest.products.get(product, Product())
        manifest.products[product] = entry.model_copy(update={"image_threshold": min(image_thr, 1.0),
                                                              "pixel_threshold": pixel_thr})
        table[product] = {"image_threshold": image_thr, "pixel_threshold": pixel_thr, "images": len(c.scores)}
    manifest.provenance["calibration"] = {"image_quantile": image_quantile, "pixel_quantile": pixel_quantile,
                                          "products": sorted(table)}
    write_manifest(artifact, type(manifest).model_validate(manifest.model_dump()))
    return table
