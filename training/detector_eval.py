"""Evaluation samples through `Detector.prepare` -> `infer_inputs` -> `score`: the tiled path.

`dapo eval` / `dapo calibrate` read untiled products through the data set's torch loader (the
serving decode and preprocessing, batched). A tiled product's image is several encoder inputs
and one stitched map of its own size, so it goes through the Detector's own stages, exactly as
the service runs them (decode once at the tiles' DCT scale, cut, infer, stitch, image score);
its ground truth is drawn at the stitched map's size. `map_size` puts every product's pixel
metrics on one common grid (maps resized bilinearly, truth drawn at that size), which is how
whole-image and tiled figures are compared on the same pixels (docs/tiling.md).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from service.runtime.detector import Detector, ImageLimits, Scores, Upload
from service.runtime.scoring import Policy
from training.data import Sample
from training.data.common import IGNORE_INDEX, MASK_THRESHOLD, mask_to_float

NO_LIMITS = ImageLimits(max_pixels=1 << 40, max_side=1 << 20)  # local data sets are trusted files


@dataclass
class Evaluated:
    sample: Sample
    scores: Scores  # anomaly_map / class_probs at the map size asked (or the stitched map's)
    class_mask: np.ndarray  # (h, w) int64 truth at the same size; IGNORE_INDEX where unknown
    has_mask: bool


def resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(..., h, w) float maps -> (..., size[1], size[0]) bilinear (Pillow 'F', per channel)."""
    if values.shape[-2:] == (size[1], size[0]):
        return values.astype(np.float32, copy=False)
    flat = values.reshape(-1, *values.shape[-2:]).astype(np.float32)
    out = np.stack([np.asarray(Image.fromarray(m, mode="F").resize(size, Image.Resampling.BILINEAR)) for m in flat])
    return out.reshape(*values.shape[:-2], size[1], size[0])


def truth(sample: Sample, size: tuple[int, int], stored: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """The class mask at `size` (w, h): bilinear, thresholded at 0.5, then the class id (as the
    data set loader draws it at S x S)."""
    w, h = size
    if sample.label == 0:
        return np.zeros((h, w), np.int64), True
    if sample.mask is None:
        return np.full((h, w), IGNORE_INDEX, np.int64), False
    with Image.open(sample.mask) as m:
        if m.size != stored:
            raise ValueError(f"{sample.mask}: mask size {m.size} differs from its image {sample.image} {stored}")
        soft = mask_to_float(m, nonzero=sample.mask_nonzero)
    fg = np.asarray(Image.fromarray(soft, mode="F").resize(size, Image.Resampling.BILINEAR)) > MASK_THRESHOLD
    out = np.zeros((h, w), np.int64)
    out[fg] = sample.class_id if sample.class_id > 0 else IGNORE_INDEX
    return out, True


def evaluate_samples(detector: Detector, samples: list[Sample], policy_for: Callable[[str], Policy],
                     map_size: int | None = None) -> Iterator[Evaluated]:
    """Each sample decoded, tiled (per its product's policy), inferred, stitched and scored."""
    for sample in samples:
        policy = policy_for(sample.product)
        with Image.open(sample.image) as im:
            stored = im.size
        # the upload path itself (decode once at the tiles' DCT scale), so figures are what is
        # served; an EXIF-rotated file is oriented as served, its mask (stored grid) is not
        prepared = detector.prepare(Upload(str(sample.image), sample.image.read_bytes()), NO_LIMITS,
                                    tiles=policy.tiling)
        outputs = detector.infer_inputs(prepared.inputs(), policy.allowed, class_probs=True)
        scores = detector.score(outputs, policy, prepared)
        size = (map_size, map_size) if map_size else scores.anomaly_map.shape[::-1]
        scores.anomaly_map = resize_map(scores.anomaly_map, size)
        if scores.class_probs is not None:
            scores.class_probs = resize_map(scores.class_probs, size)
        mask, has_mask = truth(sample, size, stored)
        yield Evaluated(sample, scores, mask, has_mask)
