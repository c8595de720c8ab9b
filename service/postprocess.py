"""One image's encoder outputs -> the JSON fields of its result, at the ORIGINAL resolution.

Steps, in order: optional smoothing (scoring.smooth) at the model size S; the anomaly map is
resized to W x H bilinearly (Pillow mode 'F', so no 8-bit quantisation) and the type map by
nearest neighbour (class ids must not be interpolated); the pixel threshold, if any, is applied
at full resolution (scoring.final_type_map); then statistics, regions and masks are all read
off that one final type map, so they always agree with each other.

Defect-type score (`defect_types[].score`): the image-level `type_scores` of that class
renormalised over the defect classes allowed for this call, i.e. P(type | defective, allowed).
Why: the raw softmax also spends mass on `normal` and on classes the product filter excluded,
so raw numbers would shrink whenever a product allows more types and would not sum to anything
meaningful; the renormalised scores of the allowed types sum to 1 and rank the same way.

Masks are per defect type present (types with no pixels are omitted, as in `defect_types`):
COCO compressed RLE (pycocotools, column-major, counts as str) or one indexed PNG whose pixel
value is the class id (0 = normal), with a palette so it is also viewable.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

from service import scoring
from service.backends.base import EncoderOutputs

MaskFormat = Literal["rle", "png", "none"]
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_OVERLAY_ALPHA = 0.5


@dataclass(frozen=True)
class RenderOptions:
    """What the caller asked to get back (query parameters) and the region knobs (settings)."""

    mask_format: MaskFormat = "rle"
    heatmap: bool = False
    overlay: bool = False
    min_region_px: int = 16
    max_regions: int = 100


@dataclass
class FullResMaps:
    """The anomaly map (float32) and the final class map (uint8), both (H, W)."""

    anomaly: np.ndarray
    classes: np.ndarray


def sig(x: float, digits: int = 6) -> float:
    """Round to significant digits: compact JSON without losing tiny area fractions."""
    return float(f"{float(x):.{digits}g}")


def resize_maps(anomaly_map: np.ndarray, type_map: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(S, S) maps -> (H, W): anomaly bilinear in float, classes nearest."""
    amap = Image.fromarray(np.ascontiguousarray(anomaly_map, dtype=np.float32))
    amap = np.asarray(amap.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    tmap = Image.fromarray(np.ascontiguousarray(type_map, dtype=np.uint8))
    tmap = np.asarray(tmap.resize((width, height), Image.Resampling.NEAREST), dtype=np.uint8)
    return amap, tmap


def full_resolution(outputs: EncoderOutputs, policy: scoring.Policy, width: int, height: int) -> FullResMaps:
    """Smooth at model size, resize to the original size, apply the pixel threshold."""
    amap = scoring.smooth(outputs.anomaly_map[0], policy.gaussian_sigma)
    amap, tmap = resize_maps(amap, outputs.type_map[0], width, height)
    classes = scoring.final_type_map(tmap, amap, policy.pixel_threshold)
    return FullResMaps(anomaly=amap, classes=np.asarray(classes, dtype=np.uint8))


def renormalised_type_scores(type_scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """P(type | defective, allowed) for every class id (0 for normal and excluded classes)."""
    scores = np.where(allowed, type_scores, 0.0).astype(np.float64)
    scores[0] = 0.0
    total = scores.sum()
    return scores / total if total > 0 else scores


def present_defects(classes: np.ndarray) -> list[int]:
    """Defect class ids with at least one pixel (bincount: much faster than np.unique here)."""
    return [int(c) for c in np.nonzero(np.bincount(classes.ravel()))[0] if c != 0]


def label_max(values: np.ndarray, labels: np.ndarray, n_labels: int) -> np.ndarray:
    """Max of `values` per label id 0..n_labels-1 (-inf where absent).

    np.maximum.at is a single unbuffered pass; scipy.ndimage.maximum sorts all pixels, which
    on a 24 MP image took seconds per class.
    """
    out = np.full(n_labels, -np.inf, dtype=np.float32)
    np.maximum.at(out, labels.ravel(), values.ravel())
    return out


def rank_defect_types(maps: FullResMaps, type_scores: np.ndarray, allowed: np.ndarray,
                      class_names: list[str]) -> list[dict[str, Any]]:
    """Defect types with pixels, most likely first (score, then area)."""
    n_classes = len(class_names)
    counts = np.bincount(maps.classes.ravel(), minlength=n_classes)
    maxima = label_max(maps.anomaly, maps.classes, max(n_classes, int(maps.classes.max()) + 1))
    probs = renormalised_type_scores(type_scores, allowed)
    total = maps.classes.size
    ranked = [
        {"name": class_names[c], "score": sig(probs[c]), "area_fraction": sig(counts[c] / total),
         "max_pixel_score": sig(maxima[c])}
        for c in range(1, n_classes) if counts[c] > 0
    ]
    ranked.sort(key=lambda d: (-d["score"], -d["area_fraction"]))
    return ranked


def _class_regions(maps: FullResMaps, c: int, name: str, min_px: int, limit: int) -> list[dict[str, Any]]:
    """Up to `limit` components of class c of at least min_px pixels, best first."""
    labels, n = ndimage.label(maps.classes == c, structure=_EIGHT_CONNECTED)
    if n == 0 or limit == 0:
        return []
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    maxima = label_max(maps.anomaly, labels, n + 1)
    ids = np.nonzero(areas[1:] >= min_px)[0] + 1
    ids = ids[np.lexsort((-areas[ids], -maxima[ids]))][:limit]  # score desc, then area desc
    boxes = ndimage.find_objects(labels)
    regions = []
    for i in ids:
        ys, xs = boxes[i - 1]
        regions.append({
            "defect_type": name,
            "bbox": [int(xs.start), int(ys.start), int(xs.stop - xs.start), int(ys.stop - ys.start)],
            "area_px": int(areas[i]),
            "score": sig(maxima[i]),
        })
    return regions


def find_regions(maps: FullResMaps, class_names: list[str], min_px: int, max_regions: int) -> list[dict[str, Any]]:
    """8-connected components per defect class, highest score first; tiny ones dropped."""
    regions: list[dict[str, Any]] = []
    for c in present_defects(maps.classes):
        regions += _class_regions(maps, c, class_names[c], min_px, max_regions)
    regions.sort(key=lambda r: (-r["score"], -r["area_px"]))
    return regions[:max_regions]


def rle_masks(classes: np.ndarray, class_names: list[str]) -> dict[str, dict[str, Any]]:
    """COCO compressed RLE per defect type present; size is [H, W] as in COCO."""
    out: dict[str, dict[str, Any]] = {}
    column_major = np.ascontiguousarray(classes.T)  # one transpose, then each mask is a free view
    for c in present_defects(classes):
        binary = (column_major == c).view(np.uint8).T  # (H, W), Fortran order, no copy
        rle = mask_utils.encode(binary)
        counts = rle["counts"]
        out[class_names[c]] = {
            "size": [int(v) for v in rle["size"]],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
        }
    return out


def palette() -> list[int]:
    """Flat RGB palette: 0 black, then well-separated hues (golden-ratio steps)."""
    import colorsys

    pal = [0, 0, 0]
    for i in range(1, 256):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85, 1.0)
        pal += [int(r * 255), int(g * 255), int(b * 255)]
    return pal


def png_b64(img: Image.Image) -> str:
    """Encode a Pillow image as base64 PNG (fast compression: these are transient payloads)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def png_mask(classes: np.ndarray) -> str:
    """Indexed PNG (mode 'P'): pixel value = class id, viewable thanks to the palette."""
    img = Image.fromarray(np.ascontiguousarray(classes, dtype=np.uint8))  # mode L
    img.putpalette(palette())  # L + palette -> P, pixel values unchanged
    return png_b64(img)


def heatmap_u8(anomaly: np.ndarray) -> np.ndarray:
    """Anomaly map [0, 1] -> uint8 0..255."""
    return np.rint(np.clip(anomaly, 0.0, 1.0) * 255.0).astype(np.uint8)


def jet_lut() -> np.ndarray:
    """A 256x3 blue-green-red lookup table (a 'jet'-like colormap without matplotlib)."""
    x = np.linspace(0.0, 1.0, 256)
    channels = [np.clip(1.5 - np.abs(4.0 * x - k), 0.0, 1.0) for k in (3.0, 2.0, 1.0)]
    return np.rint(np.stack(channels, axis=1) * 255.0).astype(np.uint8)


_JET = jet_lut()


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = _OVERLAY_ALPHA) -> Image.Image:
    """The coloured heatmap blended over the (oriented, RGB) image at the same size."""
    colour = Image.fromarray(_JET[heat])
    return Image.blend(image.convert("RGB"), colour, alpha)


def build_mask(classes: np.ndarray, class_names: list[str], mask_format: MaskFormat) -> dict[str, Any] | None:
    """The `mask` object of a result, or None when mask_format=none."""
    if mask_format == "none":
        return None
    label_map = {str(i): name for i, name in enumerate(class_names)}
    if mask_format == "rle":
        return {"format": "rle", "label_map": label_map, "rle": rle_masks(classes, class_names)}
    return {"format": "png", "label_map": label_map, "png": png_mask(classes)}


def postprocess(outputs: EncoderOutputs, policy: scoring.Policy, width: int, height: int,
                class_names: list[str], options: RenderOptions,
                image: Image.Image | None = None) -> dict[str, Any]:
    """Everything of one result that comes from the model (no filename, ids or timings)."""
    maps = full_resolution(outputs, policy, width, height)
    score = float(outputs.anomaly_score[0])
    result: dict[str, Any] = {
        "width": width,
        "height": height,
        "anomaly_score": sig(score),
        "is_anomalous": scoring.is_anomalous(score, policy.image_threshold),
        "threshold": policy.image_threshold,
        "defect_types": rank_defect_types(maps, outputs.type_scores[0], policy.allowed, class_names),
        "regions": find_regions(maps, class_names, options.min_region_px, options.max_regions),
    }
    mask = build_mask(maps.classes, class_names, options.mask_format)
    if mask is not None:
        result["mask"] = mask
    if options.heatmap or options.overlay:
        heat = heatmap_u8(maps.anomaly)
        if options.heatmap:
            result["heatmap_png"] = png_b64(Image.fromarray(heat))
        if options.overlay:
            if image is None:
                raise ValueError("overlay requested without the image")
            result["overlay_png"] = png_b64(overlay(image, heat))
    return result
