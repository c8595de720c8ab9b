"""Scoring decisions on top of the encoder's outputs, shared by the service and `dapo eval`.

The heavy part of scoring (softmax against the text features, layer sum, upsampling, the type
argmax) runs inside the exported graph, next to the encoder (see `service.runtime.backends.base`).
What stays here is what depends on the call: which classes may compete (product filter and
per-call override), which threshold is in force, and optional Gaussian smoothing of the map.
Evaluation uses these same functions, so what is measured is what is served.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.runtime.artifact import Manifest, Product, Tiling


class ScoringError(ValueError):
    """A request names something the artifact does not know (maps to HTTP 422)."""


@dataclass(frozen=True)
class Policy:
    """Everything that decides one image's verdict besides the pixels."""

    allowed: np.ndarray  # (C,) bool, column 0 (normal) always True
    image_threshold: float
    pixel_threshold: float | None
    gaussian_sigma: float
    image_score: str = "global"
    tiling: Tiling | None = None  # the product's tiling (service.runtime.tiling); None = untiled
    product: str | None = None
    references: bool = False  # fuse the product's reference bank (service.runtime.references)


def allowed_classes(manifest: Manifest, product: str | None = None,
                    defect_types: list[str] | None = None) -> np.ndarray:
    """Boolean mask over class ids: normal + the product's types (or the call's override)."""
    names = manifest.class_names
    allowed = np.ones(len(names), dtype=bool)
    if product is not None:
        if product not in manifest.products:
            raise ScoringError(f"unknown product {product!r}; known: {sorted(manifest.products)}")
        types = manifest.products[product].defect_types
        if types is not None:
            allowed[1:] = [n in types for n in names[1:]]
    if defect_types is not None:
        unknown = sorted(set(defect_types) - set(names[1:]))
        if unknown:  # the message names a few, never echoes a huge list back
            shown = [u[:64] for u in unknown[:10]] + ([f"... {len(unknown) - 10} more"] if len(unknown) > 10 else [])
            raise ScoringError(f"unknown defect types {shown}; vocabulary: {names[1:]}")
        if not defect_types:
            raise ScoringError("defect_types must name at least one type")
        allowed[1:] = [n in defect_types for n in names[1:]]
    allowed[0] = True
    return allowed


def product_settings(manifest: Manifest, product: str | None = None) -> Product:
    """A product's settings with the artifact's defaults filled in wherever it has none (no
    product: the defaults alone). The one place the per-product fallback is decided."""
    prod = manifest.products.get(product) if product is not None else None
    if product is not None and prod is None:
        raise ScoringError(f"unknown product {product!r}; known: {sorted(manifest.products)}")
    prod = prod or Product()
    return Product(
        defect_types=prod.defect_types if prod.defect_types is not None else manifest.defect_names,
        image_threshold=prod.image_threshold if prod.image_threshold is not None else manifest.image_threshold,
        pixel_threshold=prod.pixel_threshold if prod.pixel_threshold is not None else manifest.pixel_threshold,
        tiling=prod.tiling, timeout_ms=prod.timeout_ms)


def policy(manifest: Manifest, product: str | None = None, defect_types: list[str] | None = None,
           threshold: float | None = None) -> Policy:
    """Resolve the product's settings and the per-call overrides into one Policy."""
    allowed = allowed_classes(manifest, product, defect_types)
    settings = product_settings(manifest, product)
    image_thr, pixel_thr = settings.image_threshold, settings.pixel_threshold
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise ScoringError(f"threshold must be within [0, 1], got {threshold}")
        image_thr = threshold
    return Policy(allowed, float(image_thr), pixel_thr, manifest.gaussian_sigma, manifest.image_score,
                  settings.tiling)


def smooth(anomaly_map: np.ndarray, sigma: float) -> np.ndarray:
    """Optional Gaussian smoothing of an (H, W) map (AnomalyCLIP uses sigma=4; DAPO none)."""
    if sigma <= 0:
        return anomaly_map
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(anomaly_map.astype(np.float32), sigma=sigma, mode="nearest")


def final_type_map(type_map: np.ndarray, anomaly_map: np.ndarray, pixel_threshold: float | None) -> np.ndarray:
    """The class map that masks are drawn from.

    Without a pixel threshold the graph's argmax stands (METHOD: normal competes with the
    allowed types). With one, pixels whose anomaly map falls below it are normal as well.
    """
    if pixel_threshold is None:
        return type_map
    return np.where(anomaly_map >= pixel_threshold, type_map, 0).astype(np.uint8)


def image_score(global_score: float, anomaly_map: np.ndarray, mode: str = "global") -> float:
    """The image-level anomaly score in force.

    "global" is DAPO's (abnormal probability of the global feature); "global_max" averages it
    with the (smoothed) anomaly map's maximum, which helps when defects are too small to move
    the global feature.
    """
    if mode == "global":
        return float(global_score)
    if mode == "global_max":
        return 0.5 * (float(global_score) + float(np.max(anomaly_map)))
    raise ValueError(f"unknown image score mode {mode!r}")


def is_anomalous(score: float, threshold: float) -> bool:
    return bool(score >= threshold)
