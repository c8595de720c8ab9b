"""Golden /detect answers compared in a way that holds on every CPU and still catches a change.

Why: ONNX Runtime and PyTorch pick their CPU kernels by instruction set (AVX2, AVX-512, VNNI...),
so the last bits of a float differ between machines. Rounded to six significant digits that
flips a printed digit now and then, and a pixel near a decision can flip, so RLE strings and
PNG bytes can differ. A golden file recorded on one CPU therefore cannot be compared byte for
byte on another.

There are two checks, for two purposes:

1. **Across machines (the suite): `compare_bodies` / `assert_bodies_match`.** The answers are
   parsed and compared structurally against `fixtures/detect_demo_golden.json`:

   - strings, keys, booleans and integers exactly (filenames, label maps, names, sizes,
     `area_px`, the `threshold` in force: a setting, not a model output);
   - every other number within `NUMBER_ATOL` (a few float32 ulps at the encoder's output,
     carried through the renormalisations) plus one unit of the sixth significant digit
     (answers print numbers with `postprocess.sig`, so two values a hair apart can print one
     unit apart);
   - `is_anomalous` exactly, unless the score lies within `NUMBER_ATOL` of the threshold;
   - masks (RLE decoded with pycocotools, PNG with Pillow) per pixel: a pixel may differ only
     where it is *fragile*, i.e. its decision lay within `PIXEL_MARGIN` of the threshold that
     decided it (the top-two class probabilities of the type argmax, or the anomaly map against
     the pixel threshold); `fragile_pixels` computes that map from the Detector;
   - a defect type, or a region, may appear or vanish, or change its area/box/max, only where
     fragile pixels could have made it so (the type's pixels, or the region's box, contain a
     fragile pixel);
   - heatmaps decoded per pixel: levels may differ by at most `HEATMAP_LEVELS` (1);
   - overlays decoded per pixel: a channel may differ by at most `OVERLAY_STEP`, what one
     heatmap level moves the colour map after the blend;
   - and in both, only a few pixels may differ at all (`PICTURE_MAX_CHANGED`): a level flips
     only where the value lies within tolerance of a rounding boundary (measured: at most 1 of
     3072 pixels), whereas a systematic change (floor for round, another blend) moves most.

   Without a fragile map (None), no mask pixel may differ.

2. **On one machine (a refactor): bytes.** A refactor changes no answer, and on one machine the
   answers are deterministic (they do not change with ORT's optimisation level or thread count),
   so there the check is byte for byte, between two recordings made *on that machine*:

       python -m tests.record_golden --out /tmp/before.json     # before the change
       python -m tests.record_golden --out /tmp/after.json      # after it
       python -m tests.record_golden --compare /tmp/before.json /tmp/after.json

   Never compare bytes against a file another CPU recorded (that is what check 1 is for).

Tolerances (see the module constants): the encoder's outputs are probabilities in [0, 1];
baking the demo artifact under `ATEN_CPU_CAPABILITY=default` instead of `avx2` moves them by at
most 2.4e-7 (measured, 2026-12-03, see docs/testing.md), i.e. about 2 ulps of 1.0.
`ENCODER_ATOL` allows 8 ulps of 1.0 (9.5e-7). Derived numbers (defect-type scores renormalised
over the allowed types, maxima over regions) may amplify that by the renormalising sum's
inverse; `NUMBER_ATOL` = 10 x `ENCODER_ATOL` (~1e-5) covers sums down to ~0.1. A planted real
change of 1e-4 is ten times larger and fails.
"""
from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from service.runtime.postprocess import _JET, _OVERLAY_ALPHA, nearest_index

FLOAT32_ULP_AT_1 = float(np.finfo(np.float32).eps)  # 2**-23, one ulp of 1.0
ENCODER_ULPS = 8
ENCODER_ATOL = ENCODER_ULPS * FLOAT32_ULP_AT_1  # ~9.5e-7: what another CPU may move an encoder output by
NUMBER_ATOL = 10 * ENCODER_ATOL  # ~1e-5: carried through renormalisation (sum >= ~0.1) and maxima
PIXEL_MARGIN = 2 * ENCODER_ATOL  # a decision margin moves by at most twice the outputs' own error
HEATMAP_LEVELS = 1
# one heatmap level moves a colour-map channel by at most max|diff(_JET)|; the blend scales that
# by alpha, and both roundings (LUT, blend) add one
OVERLAY_STEP = int(math.ceil(_OVERLAY_ALPHA * int(np.abs(np.diff(_JET.astype(int), axis=0)).max()))) + 1
# at most this fraction of a picture's pixels (and never fewer than PICTURE_MIN_CHANGED) may differ
PICTURE_MAX_CHANGED = 0.01
PICTURE_MIN_CHANGED = 4
SIG_DIGITS = 6  # postprocess.sig
PER_CALL = ("request_id", "timing_ms", "artifact_sha256")


def printed_unit(x: float, digits: int = SIG_DIGITS) -> float:
    """One unit of the last printed digit of x (postprocess.sig prints `digits` significant)."""
    x = abs(float(x))
    return 0.0 if x == 0.0 or not math.isfinite(x) else 10.0 ** (math.floor(math.log10(x)) - (digits - 1))


def numbers_close(a: float, b: float, atol: float = NUMBER_ATOL) -> bool:
    if a == b:
        return True
    return abs(float(a) - float(b)) <= atol + printed_unit(max(abs(float(a)), abs(float(b))))


@dataclass
class Diffs:
    """What differs beyond tolerance, one line per finding (empty: the answers match)."""

    lines: list[str] = field(default_factory=list)

    def add(self, path: str, what: str) -> None:
        self.lines.append(f"{path}: {what}")

    def __bool__(self) -> bool:
        return bool(self.lines)


# --- decoding ------------------------------------------------------------------------------------
def decode_png(b64: str) -> np.ndarray:
    """A base64 PNG -> its pixel array (palette indices for mode P, not colours)."""
    with Image.open(io.BytesIO(base64.b64decode(b64))) as img:
        img.load()
        return np.asarray(img)


def class_map_from_mask(mask: dict[str, Any], height: int, width: int) -> np.ndarray:
    """The (H, W) class-id map an answer's `mask` stands for (RLE per type, or the indexed PNG)."""
    if mask["format"] == "png":
        return decode_png(mask["png"]).astype(np.uint8)
    ids = {name: int(i) for i, name in mask["label_map"].items()}
    out = np.zeros((height, width), np.uint8)
    for name, rle in mask["rle"].items():
        bits = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)
        out[bits] = ids[name]
    return out


# --- fragile pixels --------------------------------------------------------------------------------
def fragile_model_pixels(class_probs: np.ndarray, allowed: np.ndarray, anomaly_map: np.ndarray,
                         pixel_threshold: float | None, margin: float = PIXEL_MARGIN) -> np.ndarray:
    """(S, S) bool: model pixels whose class could flip under another CPU's last bits.

    The graph's type map is the argmax over the allowed classes of the per-class probabilities
    (normal competes); a pixel is fragile when its top two allowed probabilities lie within
    `margin`. With a pixel threshold, a pixel whose anomaly value lies within `margin` of it is
    fragile as well."""
    probs = np.where(allowed[:, None, None], class_probs, -1.0)
    top2 = np.sort(probs, axis=0)[-2:]
    fragile = (top2[1] - top2[0]) <= margin
    if pixel_threshold is not None:
        fragile |= np.abs(anomaly_map - pixel_threshold) <= margin
    return fragile


def fragile_pixels(detector, uploads, policy, limits) -> dict[str, np.ndarray]:
    """filename -> (H, W) bool at the original size: the pixels `compare_bodies` lets differ.

    Runs the Detector's own stages (prepare, infer with the per-class maps) on the same uploads
    and policy that produced the answer, on this machine; the recorded answer's margins differ
    from these by at most the outputs' error, which `PIXEL_MARGIN` allows for."""
    from service.runtime import scoring

    out: dict[str, np.ndarray] = {}
    for upload in uploads:
        prepared = detector.prepare(upload, limits)
        outputs = detector.infer(prepared.pixel_values[None], policy.allowed[None], class_probs=True)
        amap = scoring.smooth(outputs.anomaly_map[0], policy.gaussian_sigma)
        model = fragile_model_pixels(outputs.class_probs[0], policy.allowed, amap, policy.pixel_threshold)
        sh, sw = model.shape
        out[upload.filename] = model[nearest_index(prepared.height, sh)][:, nearest_index(prepared.width, sw)]
    return out


# --- comparison -------------------------------------------------------------------------------------
def compare_bodies(got: dict, want: dict, fragile: dict[str, np.ndarray] | None = None) -> Diffs:
    """A /detect answer (parsed JSON) against the recorded one, within the tolerances above.

    `fragile`: filename -> (H, W) bool (see `fragile_pixels`); None lets no mask pixel differ."""
    diffs = Diffs()
    got, want = _without_per_call(got), _without_per_call(want)
    _compare_generic("", {k: v for k, v in got.items() if k != "results"},
                     {k: v for k, v in want.items() if k != "results"}, diffs)
    g_results, w_results = got.get("results", []), want.get("results", [])
    if len(g_results) != len(w_results):
        diffs.add("results", f"{len(g_results)} results, recorded {len(w_results)}")
        return diffs
    for i, (g, w) in enumerate(zip(g_results, w_results)):
        name = w.get("filename")
        mask = None if fragile is None else fragile.get(name)
        compare_results(g, w, mask, diffs, f"results[{i}]")
    return diffs


def compare_results(got: dict, want: dict, fragile: np.ndarray | None, diffs: Diffs, path: str = "") -> Diffs:
    """One result's fields (what `Detector.predict(...).fields` holds, plus filename/product)."""
    special = {"defect_types", "regions", "mask", "heatmap_png", "overlay_png", "is_anomalous"}
    before = len(diffs.lines)
    _compare_generic(path, {k: v for k, v in got.items() if k not in special},
                     {k: v for k, v in want.items() if k not in special}, diffs)
    for key in special:
        if (key in got) != (key in want):
            diffs.add(f"{path}.{key}", "present in one answer only")
    if len(diffs.lines) > before:  # another shape altogether: the per-pixel checks cannot apply
        return diffs
    h, w = want["height"], want["width"]
    if fragile is None:
        fragile = np.zeros((h, w), bool)
    if fragile.shape != (h, w):
        raise ValueError(f"{path}: fragile map {fragile.shape} for a {h}x{w} image")
    if "is_anomalous" in want and got["is_anomalous"] != want["is_anomalous"] \
            and abs(want["anomaly_score"] - want["threshold"]) > NUMBER_ATOL:
        diffs.add(f"{path}.is_anomalous", f"{got['is_anomalous']} vs recorded {want['is_anomalous']}")
    classes = _compare_mask(got, want, fragile, diffs, path)
    if "defect_types" in want:
        _compare_defect_types(got["defect_types"], want["defect_types"], fragile, classes, diffs, path)
    if "regions" in want:
        _compare_regions(got["regions"], want["regions"], fragile, diffs, path)
    if "heatmap_png" in want:
        _compare_picture(got["heatmap_png"], want["heatmap_png"], HEATMAP_LEVELS, diffs, f"{path}.heatmap_png")
    if "overlay_png" in want:
        _compare_picture(got["overlay_png"], want["overlay_png"], OVERLAY_STEP, diffs, f"{path}.overlay_png")
    return diffs


def assert_bodies_match(got: dict, want: dict, fragile: dict[str, np.ndarray] | None = None, what: str = "") -> None:
    diffs = compare_bodies(got, want, fragile)
    assert not diffs, f"/detect answer changed beyond tolerance {what}:\n  " + "\n  ".join(diffs.lines[:20])


def _without_per_call(body: Any) -> Any:
    if isinstance(body, dict):
        return {k: _without_per_call(v) for k, v in body.items() if k not in PER_CALL}
    if isinstance(body, list):
        return [_without_per_call(v) for v in body]
    return body


def _compare_generic(path: str, got: Any, want: Any, diffs: Diffs) -> None:
    """Keys, strings, booleans and integers exactly; floats within NUMBER_ATOL (+ printing)."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or sorted(got) != sorted(want):
            diffs.add(path, f"keys {sorted(got) if isinstance(got, dict) else type(got).__name__}"
                            f" vs recorded {sorted(want)}")
            return
        for k in want:
            _compare_generic(f"{path}.{k}" if path else k, got[k], want[k], diffs)
    elif isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            diffs.add(path, f"{got!r:.80} vs recorded {want!r:.80}")
            return
        for i, (g, w) in enumerate(zip(got, want)):
            _compare_generic(f"{path}[{i}]", g, w, diffs)
    elif isinstance(want, float) and not isinstance(want, bool) and path.rsplit(".", 1)[-1] != "threshold":
        if not isinstance(got, (int, float)) or isinstance(got, bool) or not numbers_close(got, want):
            diffs.add(path, f"{got!r} vs recorded {want!r} (tolerance {NUMBER_ATOL:.1e} + last digit)")
    elif type(got) is not type(want) or got != want:
        diffs.add(path, f"{got!r:.80} vs recorded {want!r:.80}")


def _compare_mask(got: dict, want: dict, fragile: np.ndarray, diffs: Diffs, path: str) -> np.ndarray | None:
    """Decoded class maps equal except at fragile pixels; returns the recorded class map."""
    if "mask" not in want:
        return None
    g, w = got["mask"], want["mask"]
    if g["format"] != w["format"] or g["label_map"] != w["label_map"]:
        diffs.add(f"{path}.mask", "format or label_map differs")
        return None
    if w["format"] == "rle":
        for name in set(g["rle"]) | set(w["rle"]):
            if name in g["rle"] and name in w["rle"] and g["rle"][name]["size"] != w["rle"][name]["size"]:
                diffs.add(f"{path}.mask.rle.{name}.size", f"{g['rle'][name]['size']} vs {w['rle'][name]['size']}")
                return None
    h, wd = want["height"], want["width"]
    got_map, want_map = class_map_from_mask(g, h, wd), class_map_from_mask(w, h, wd)
    if got_map.shape != want_map.shape:
        diffs.add(f"{path}.mask", f"shape {got_map.shape} vs recorded {want_map.shape}")
        return None
    changed = (got_map != want_map) & ~fragile
    if changed.any():
        ys, xs = np.nonzero(changed)
        diffs.add(f"{path}.mask", f"{changed.sum()} pixel(s) changed class where no decision was near its threshold"
                                  f" (first at x={xs[0]}, y={ys[0]})")
    return want_map


def _compare_defect_types(got: list[dict], want: list[dict], fragile: np.ndarray, classes: np.ndarray | None,
                          diffs: Diffs, path: str) -> None:
    """By name; a type may appear/vanish, or change its area/max, only as far as fragile pixels allow."""
    total = fragile.size
    n_fragile = int(fragile.sum())
    g_by, w_by = {d["name"]: d for d in got}, {d["name"]: d for d in want}
    for name in set(g_by) ^ set(w_by):
        d = g_by.get(name) or w_by[name]
        if d["area_fraction"] * total > n_fragile + 0.5:
            diffs.add(f"{path}.defect_types", f"{name!r} {'appeared' if name in g_by else 'vanished'} "
                                              f"({d['area_fraction']:.3g} of the image, {n_fragile} fragile px)")
    for name in set(g_by) & set(w_by):
        g, w = g_by[name], w_by[name]
        p = f"{path}.defect_types[{name}]"
        _compare_generic(p, {"name": g["name"], "score": g["score"]}, {"name": w["name"], "score": w["score"]}, diffs)
        if abs(g["area_fraction"] - w["area_fraction"]) * total > n_fragile + 0.5 \
                and not numbers_close(g["area_fraction"], w["area_fraction"], 0.0):
            diffs.add(f"{p}.area_fraction", f"{g['area_fraction']} vs recorded {w['area_fraction']} "
                                            f"({n_fragile} fragile px of {total})")
        if n_fragile == 0 and not numbers_close(g["max_pixel_score"], w["max_pixel_score"]):
            diffs.add(f"{p}.max_pixel_score", f"{g['max_pixel_score']} vs recorded {w['max_pixel_score']}")
    _compare_order(path + ".defect_types", [d["name"] for d in got], [d["name"] for d in want],
                   {**w_by, **g_by}, "score", diffs)


def _region_key(r: dict) -> tuple:
    return r["defect_type"], tuple(r["bbox"])


def _touches(fragile: np.ndarray, bbox: list[int]) -> bool:
    x, y, w, h = bbox
    return bool(fragile[y:y + h, x:x + w].any())


def _compare_regions(got: list[dict], want: list[dict], fragile: np.ndarray, diffs: Diffs, path: str) -> None:
    """Matched by (type, box); one may appear/vanish, or change area/score, only if its box
    holds a fragile pixel."""
    g_by, w_by = {_region_key(r): r for r in got}, {_region_key(r): r for r in want}
    for key in set(g_by) ^ set(w_by):
        r = g_by.get(key) or w_by[key]
        if not _touches(fragile, r["bbox"]):
            diffs.add(f"{path}.regions", f"{r['defect_type']} region at {r['bbox']} (score {r['score']}) "
                                         f"{'appeared' if key in g_by else 'vanished'}, no fragile pixel in its box")
    for key in set(g_by) & set(w_by):
        g, w = g_by[key], w_by[key]
        if _touches(fragile, w["bbox"]):
            continue
        _compare_generic(f"{path}.regions[{key[0]}@{list(key[1])}]", g, w, diffs)
    keep = set(g_by) & set(w_by)
    _compare_order(path + ".regions", [_region_key(r) for r in got if _region_key(r) in keep],
                   [_region_key(r) for r in want if _region_key(r) in keep], {**w_by, **g_by}, "score", diffs)


def _compare_order(path: str, got: list, want: list, items: dict, score: str, diffs: Diffs) -> None:
    """Same order, except that items whose scores are within tolerance may swap."""
    common = [k for k in want if k in got]
    got_common = [k for k in got if k in want]
    rank = {k: i for i, k in enumerate(got_common)}
    for i, a in enumerate(common):
        for b in common[i + 1:]:
            if rank[a] > rank[b] and not numbers_close(items[a][score], items[b][score]):
                diffs.add(path, f"order changed: {a} and {b} swapped")


def _compare_picture(got_b64: str, want_b64: str, max_step: int, diffs: Diffs, path: str) -> None:
    g, w = decode_png(got_b64).astype(int), decode_png(want_b64).astype(int)
    if g.shape != w.shape:
        diffs.add(path, f"shape {g.shape} vs recorded {w.shape}")
        return
    delta = np.abs(g - w)
    worst = int(delta.max()) if g.size else 0
    if worst > max_step:
        diffs.add(path, f"a pixel differs by {worst} levels (at most {max_step} allowed)")
    changed = int((delta.reshape(delta.shape[0], delta.shape[1], -1).max(axis=2) > 0).sum()) if g.size else 0
    allowed = max(PICTURE_MIN_CHANGED, int(PICTURE_MAX_CHANGED * delta.shape[0] * delta.shape[1]))
    if changed > allowed:
        diffs.add(path, f"{changed} pixels differ (at most {allowed}: only values at a rounding boundary may flip)")
