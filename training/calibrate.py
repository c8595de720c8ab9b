"""`dapo calibrate`: per-product thresholds from good parts, written into the manifest.

A threshold is a quantile ("higher" method: an observed score, never interpolated) of the scores
that known-good parts get (image: anomaly score;
pixel: anomaly-map values), so the expected false-alarm rate on good parts is 1 - quantile.
Each product also gets its good-part score distribution (`ScoreBaseline`: quantile bins, mean,
std), the reference of the service's drift statistics (`service.runtime.drift`).
Only manifest.json changes; the hashed model files stay as they are.

`tiling` (`dapo calibrate --tile PX [--tile-overlap PX]`) makes the products in the data tiled
first, so their thresholds come from the tiled path they will be served through.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from service.runtime.artifact import Product, Tiling, read_manifest, write_manifest
from service.runtime.detector import Detector, RuntimeOptions
from service.runtime.drift import DRIFT_BINS, baseline_from_scores
from training.data import Sample
from training.evaluate import run_artifact


def calibrate(artifact: str | Path, good: list[Sample], image_quantile: float = 0.99,
              pixel_quantile: float = 0.999, backend: str = "onnxruntime", progress: bool = False,
              drift_bins: int = DRIFT_BINS, tiling: Tiling | None = None, references=None) -> dict:
    """Return {product: {image_threshold, pixel_threshold, images, score_mean, score_std}} and
    update the manifest (thresholds and score baseline per product). `references`
    (training.references.ReferenceOptions) also keeps a reference bank per product, and the
    thresholds are then quantiles of the fused leave-one-out scores."""
    for q in (image_quantile, pixel_quantile):
        if not 0.0 < q <= 1.0:
            raise ValueError(f"quantiles must be within (0, 1], got {q}")
    if drift_bins < 2:
        raise ValueError(f"drift_bins must be at least 2, got {drift_bins}")
    bad = [s.image for s in good if s.label != 0]
    if bad:
        raise ValueError(f"calibration takes good parts only; {bad[0]} is labelled defective")
    if not good:
        raise ValueError("no good images to calibrate on")
    if references is not None:
        from training.references import calibrate_references

        return calibrate_references(artifact, good, references, image_quantile, pixel_quantile, drift_bins,
                                    backend=backend, progress=progress)
    refuse_banked(artifact, sorted({s.product for s in good}))
    detector = Detector.load(artifact, RuntimeOptions(backend=backend))
    if tiling is not None:
        detector = with_tiling(detector, sorted({s.product for s in good}), tiling)
    collected = run_artifact(detector, good, use_products=True, progress=progress)
    manifest = detector.manifest.model_copy(deep=True)
    table = {}
    for product, c in sorted(collected.items()):
        image_thr = float(np.quantile(np.array(c.scores), image_quantile, method="higher"))
        pixel_thr = float(np.quantile(np.concatenate([m.ravel() for m in c.maps]), pixel_quantile, method="higher")) \
            if c.maps else None
        baseline = baseline_from_scores(c.scores, drift_bins)
        entry = manifest.products.get(product, Product(tiling=tiling))
        manifest.products[product] = entry.model_copy(update={"image_threshold": min(image_thr, 1.0),
                                                              "pixel_threshold": pixel_thr, "baseline": baseline})
        table[product] = {"image_threshold": image_thr, "pixel_threshold": pixel_thr, "images": len(c.scores),
                          "score_mean": baseline.mean, "score_std": baseline.std,
                          **({"tiling": entry.tiling.model_dump()} if entry.tiling is not None else {})}
    manifest.provenance["calibration"] = {"image_quantile": image_quantile, "pixel_quantile": pixel_quantile,
                                          "drift_bins": drift_bins, "products": sorted(table)}
    write_manifest(artifact, type(manifest).model_validate(manifest.model_dump()))
    return table


def refuse_banked(artifact: str | Path, products: list[str]) -> None:
    """A product with a reference bank is calibrated with its bank (`--references K`): its
    thresholds are quantiles of leave-one-out fused scores, which a plain calibration (each good
    part scored against a bank that holds it) would silently replace by near-zero ones."""
    manifest = read_manifest(artifact)
    for product in products:
        entry = manifest.products.get(product)
        if entry is not None and entry.references is not None:
            raise ValueError(f"product {product!r} has a reference bank ({entry.references.images} images): "
                             f"calibrate it with --references {entry.references.images} (thresholds stay "
                             f"leave-one-out, and a new --tile rebuilds the bank from tiles)")


def with_tiling(detector: Detector, products: list[str], tiling: Tiling) -> Detector:
    """The same loaded backend with `tiling` set on these products (added when new)."""
    manifest = detector.manifest.model_copy(deep=True)
    for product in products:
        manifest.products[product] = manifest.products.get(product, Product()).model_copy(update={"tiling": tiling})
    return Detector(manifest, detector.backend, detector.folder)
