"""How far the DCT-scaled decode moves the model's input and answers, against a full decode.

Usage: python bench/decode_scale.py --artifact model_artifacts/demo [--artifact /tmp/vitb] [--photos DIR]

For each photo-like JPEG (a `dapo synth` render upscaled to 5 and 20 MP with fine grain and
sensor noise, q90; or your own JPEGs with --photos) and each artifact:
- ``input``: the preprocessed tensor from the scaled decode vs from a full decode, in grey
  levels (of 255): mean and max absolute difference, for the ratio in force (1.75) and, as a
  sweep, for other minimum ratios (what the choice of 1.75 rests on);
- ``answer``: anomaly_score, the anomaly map (mean / max abs difference at the model size) and
  the class map (share of model pixels whose class differs) from Detector.predict on the same
  bytes, scaled (the service's path) vs full decode.

No real photos or trained weights ship with the repo, so the figures are for photo-like images
and random-weight models: they bound how much the *input* moves; a trained model's sensitivity
to a sub-grey-level change is what a real-photo check adds.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from service.runtime import imaging, tiling
from service.runtime.artifact import Tiling
from service.runtime.detector import Detector, ImageLimits, RuntimeOptions, Upload
from training.synth import render

SIZES = {"5MP": (2448, 2048), "20MP": (5472, 3648)}
PRODUCTS = ("wood", "metal", "disc")
RATIOS = (1.0, 1.25, 1.5, 1.75, 2.0)
LIMITS = ImageLimits(max_pixels=40_000_000, max_side=16384)


def synth_photo(product: str, width: int, height: int, seed: int = 1) -> bytes:
    """A synth render upscaled to camera size, with grain at full resolution and sensor noise."""
    small, _ = render(product, "scratch", seed, 0, size=512)
    rng = np.random.default_rng(seed)
    arr = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC), np.float32)
    grain = Image.fromarray(rng.integers(0, 256, (height // 3 + 1, width // 3 + 1), dtype=np.uint8))
    arr += (np.asarray(grain.resize((width, height), Image.Resampling.BICUBIC), np.float32)[..., None] - 127.5) * 0.12
    arr += rng.normal(0.0, 3.0, (height, width, 1)).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def grey_levels(a: np.ndarray, b: np.ndarray, std) -> np.ndarray:
    """|a - b| of two CLIP-normalised tensors, back in 8-bit grey levels."""
    return np.abs(a - b) * np.asarray(std, np.float32)[:, None, None] * 255.0


def input_shift(detector: Detector, data: bytes, full: Image.Image) -> dict:
    """Tensor difference scaled vs full decode, for each minimum ratio of the sweep."""
    m = detector.manifest
    reference = detector.pixel_values(full)
    out = {}
    for ratio in RATIOS:
        img = imaging.load(Image.open(io.BytesIO(data)), "x", math.ceil(ratio * m.image_size))
        diff = grey_levels(detector.pixel_values(img), reference, m.std)
        out[f"ratio_{ratio}"] = {"decoded": list(img.size), "mean": round(float(diff.mean()), 3),
                                 "max": round(float(diff.max()), 1)}
    return out


def answer_shift(detector: Detector, data: bytes, full: Image.Image) -> dict:
    """Detector.predict on the bytes (scaled decode, as served) vs on the full decode."""
    scaled, reference = detector.predict([Upload("x.jpg", data), full], limits=LIMITS, batch_size=2)
    policy = detector.policy()
    a, b = scaled.scores.anomaly_map, reference.scores.anomaly_map
    classes = [np.asarray(detector.infer(p[None], policy.allowed[None]).type_map[0])
               for p in (detector.prepare(Upload("x.jpg", data), LIMITS).pixel_values, detector.pixel_values(full))]
    s_scaled, s_full = scaled.scores.anomaly_score, reference.scores.anomaly_score
    return {"anomaly_score_scaled": round(s_scaled, 5), "anomaly_score_full": round(s_full, 5),
            "anomaly_score_abs_diff": float(f"{abs(s_scaled - s_full):.3g}"),
            "map_mean_abs_diff": float(f"{np.abs(a - b).mean():.3g}"), "map_max_abs_diff": float(f"{np.abs(a - b).max():.3g}"),
            "class_map_pixels_changed": float(f"{(classes[0] != classes[1]).mean():.3g}")}


def tile_shift(detector: Detector, data: bytes, full: Image.Image, n: int) -> dict:
    """A tiled product of n x n tiles: its tiles' inputs from the served decode (each tile keeps
    >= 1.75 x S decoded pixels, `imaging.tiled_min_side`) and from a decode one DCT step coarser,
    each against the tiles cut from a full decode (grey levels), with the cut's thread CPU ms
    (what docs/tiling.md's CPU budget rests on)."""
    m = detector.manifest
    width, height = full.size
    tiles = Tiling(tile=-(-max(width, height) // n))
    g = tiling.grid(width, height, tiles, m.image_size)
    reference = np.stack(tiling.cut(full, g, m.mean, m.std))
    served = imaging.tiled_min_side(width, height, m.image_size, tiles.tile)
    out = {"tile": tiles.tile}
    for label, min_side in (("served", served), ("one_step_coarser", served // 2)):
        img = imaging.load(Image.open(io.BytesIO(data)), "x", min_side)
        c0 = time.thread_time()
        cut = np.stack(tiling.cut(img, g, m.mean, m.std))
        cpu_ms = 1000 * (time.thread_time() - c0)
        diff = grey_levels(cut, reference, m.std)
        tile_decoded = min(tiles.tile, min(width, height)) * min(img.size) / min(width, height)
        out[label] = {"decoded": list(img.size), "tile_px_per_input_px": round(tile_decoded / m.image_size, 2),
                      "mean": round(float(diff.mean()), 3), "max": round(float(diff.max()), 1),
                      "cut_cpu_ms": round(cpu_ms, 2)}
    return out


def images(photos: Path | None) -> dict[str, bytes]:
    if photos is not None:
        return {p.name: p.read_bytes() for p in sorted(photos.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg")}
    return {f"{product}_{name}": synth_photo(product, w, h) for name, (w, h) in SIZES.items() for product in PRODUCTS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifact", action="append", required=True, type=Path)
    p.add_argument("--photos", type=Path, help="a folder of real JPEG photos to use instead")
    p.add_argument("--tiles", type=int, default=0, metavar="N",
                   help="also the inputs of N x N tiles: the served decode vs one DCT step coarser (docs/tiling.md)")
    args = p.parse_args(argv)
    blobs = images(args.photos)
    report = []
    for folder in args.artifact:
        detector = Detector.load(folder, RuntimeOptions(providers=("CPUExecutionProvider",)))
        for name, data in blobs.items():
            full = imaging.decode(data, name, LIMITS.max_pixels, LIMITS.max_side)
            report.append({"artifact": str(folder), "image_size": detector.manifest.image_size, "image": name,
                           "input": input_shift(detector, data, full), "answer": answer_shift(detector, data, full)})
            if args.tiles:
                report[-1]["tiles"] = tile_shift(detector, data, full, args.tiles)
            print(json.dumps(report[-1]), file=sys.stderr)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
