"""One image's encoder outputs -> the JSON fields of its result, at the ORIGINAL resolution.

Steps, in order: optional smoothing (scoring.smooth) and the pixel threshold
(scoring.final_type_map) at the model size S; that one final class map is what masks, areas and
regions are read from. Statistics and connected components are computed at S and mapped
exactly to the original W x H (see ClassMaps), so their cost does not grow with the upload;
masks are the class map upsampled by nearest neighbour (class ids are never interpolated);
heatmaps/overlays use the anomaly map resized bilinearly in float (Pillow mode 'F').

Nothing is built at the original resolution that the answer does not contain: the COCO RLE of
a mask is read off the model-resolution class map and the row/column index maps (see
`ClassMaps.rle_counts`), so an RLE answer for a 20 MP upload never allocates a 20 MP array;
only a PNG mask (whose pixels are the answer) is expanded, by whole-row copies. Heatmaps and
overlays are pictures for people: they are drawn at `imaging.view_size` (the original divided
by the smallest power of two that brings the longer side to `RenderOptions.view_max_side` px
or less; the caller may ask for the original size), which keeps a 20 MP overlay from being a
28 MB answer.

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
import zlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

from service.runtime import scoring
from service.runtime.backends.base import EncoderOutputs
from service.runtime.imaging import view_size

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
    view_max_side: int = 0  # heatmap/overlay PNGs within this many px (imaging.view_size); 0 = original


@dataclass
class ClassMaps:
    """The final maps at the model resolution S, plus their exact map to the original W x H.

    The full-resolution class map is the nearest-neighbour upsampling `classes[src_y][:, src_x]`,
    so every original pixel has exactly one model pixel. Statistics and regions are computed at
    S (a fixed, small cost whatever the upload size) and mapped exactly: a model pixel (i, j)
    stands for row_h[i] * col_w[j] original pixels, and a box of model pixels for the original
    columns/rows whose source falls inside it. Masks, areas and boxes therefore agree exactly.
    """

    anomaly: np.ndarray  # (S, S) float32, smoothed
    classes: np.ndarray  # (S, S) uint8, after the pixel threshold
    src_x: np.ndarray  # (W,) source column of each original column
    src_y: np.ndarray  # (H,) source row of each original row

    @classmethod
    def identity(cls, anomaly: np.ndarray, classes: np.ndarray) -> "ClassMaps":
        h, w = classes.shape
        return cls(anomaly, classes, np.arange(w), np.arange(h))

    @property
    def width(self) -> int:
        return len(self.src_x)

    @property
    def height(self) -> int:
        return len(self.src_y)

    @cached_property
    def row_counts(self) -> np.ndarray:
        """(S,) number of original rows each model row stands for (0 when downsampling skips it)."""
        return np.bincount(self.src_y, minlength=self.classes.shape[0])

    @cached_property
    def pixel_weights(self) -> np.ndarray:
        """(S, S) number of original pixels each model pixel covers (0 when downsampling skips it)."""
        return np.outer(self.row_counts, np.bincount(self.src_x, minlength=self.classes.shape[1]))

    def full_classes(self) -> np.ndarray:
        """(H, W) uint8 class map at the original resolution, `classes[src_y][:, src_x]`.

        Built as the (S, W) column gather, then whole rows repeated (src_y is non-decreasing,
        so repeating model row i row_counts[i] times is exactly the row gather, as copies)."""
        return np.repeat(self.classes[:, self.src_x], self.row_counts, axis=0)

    @cached_property
    def _column_major(self) -> tuple[np.ndarray, np.ndarray]:
        """The kept model rows in column-major order at the original width, (W, K), and the
        first original row of each of the K kept model rows."""
        keep = self.row_counts > 0
        heights = self.row_counts[keep]
        top = np.concatenate(([0], np.cumsum(heights)[:-1]))
        return np.ascontiguousarray(self.classes[keep].T[self.src_x]), top

    def rle_counts(self, class_id: int) -> np.ndarray:
        """Uncompressed COCO RLE counts of `full_classes() == class_id`, without building it.

        COCO runs go down each column, then on to the next column. In column x of the full map,
        model row i fills original rows top[i] .. top[i] + row_counts[i] - 1 with the value of
        model pixel (i, src_x[x]); so a run can only start at the first original row of a kept
        model row. Walking the (W, K) column-major model values, every place where the value
        differs from the previous one starts a run, at full-map offset x * H + top[i]. The
        counts are the gaps between run starts; COCO's first count is of zeros (0 when the
        first pixel is set). Cost: O(W x S), not O(W x H)."""
        values, top = self._column_major
        flat = (values == class_id).ravel()
        k = values.shape[1]
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        starts = (change // k) * self.height + top[change % k]
        counts = np.diff(np.concatenate(([0], starts, [self.height * self.width])))
        return np.concatenate(([0], counts)) if flat[0] else counts

    def full_anomaly(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """(h, w) float32 anomaly map, bilinear, at `size` (w, h) or the original size (heatmaps)."""
        img = Image.fromarray(np.ascontiguousarray(self.anomaly, dtype=np.float32))
        w, h = size or (self.width, self.height)
        return np.asarray(img.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)

    def box(self, rows: slice, cols: slice) -> list[int] | None:
        """[x, y, w, h] in original pixels of a model-pixel box; None if no original pixel maps in."""
        x0 = int(np.searchsorted(self.src_x, cols.start, "left"))
        x1 = int(np.searchsorted(self.src_x, cols.stop - 1, "right"))
        y0 = int(np.searchsorted(self.src_y, rows.start, "left"))
        y1 = int(np.searchsorted(self.src_y, rows.stop - 1, "right"))
        return [x0, y0, x1 - x0, y1 - y0] if x1 > x0 and y1 > y0 else None


def sig(x: float, digits: int = 6) -> float:
    """Round to significant digits: compact JSON without losing tiny area fractions."""
    return float(f"{float(x):.{digits}g}")


def nearest_index(n_out: int, n_in: int) -> np.ndarray:
    """Source index of each of n_out output positions under nearest-neighbour resizing.

    Output pixel i has its centre at (i + 1/2) * n_in / n_out in source pixels; it takes the
    source pixel that contains that centre, source pixel k covering [k, k + 1). A centre on a
    boundary (a tie) therefore goes to the higher index. Computed in exact integers,
    floor((2i + 1) * n_in / (2 * n_out)): the float product rounds some ties down and others up
    (e.g. 112 -> 97 at i = 48), so the convention could not be stated otherwise.
    """
    return (2 * np.arange(n_out, dtype=np.int64) + 1) * n_in // (2 * n_out)


def model_maps(outputs: EncoderOutputs, policy: scoring.Policy, width: int, height: int) -> ClassMaps:
    """Smooth and threshold at the model size S; attach the mapping to the original W x H."""
    amap = scoring.smooth(outputs.anomaly_map[0], policy.gaussian_sigma).astype(np.float32)
    classes = np.asarray(scoring.final_type_map(outputs.type_map[0], amap, policy.pixel_threshold), np.uint8)
    sh, sw = classes.shape
    return ClassMaps(amap, classes, nearest_index(width, sw), nearest_index(height, sh))


def renormalised_type_scores(type_scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """P(type | defective, allowed) for every class id (0 for normal and excluded classes)."""
    scores = np.where(allowed, type_scores, 0.0).astype(np.float64)
    scores[0] = 0.0
    total = scores.sum()
    return scores / total if total > 0 else scores


def masked_max(values: np.ndarray, where: np.ndarray) -> float:
    """Max of values where `where` holds (-inf if nowhere)."""
    picked = values[where]
    return float(picked.max()) if picked.size else float("-inf")


def label_maxima(values: np.ndarray, labels: np.ndarray, visible: np.ndarray, n: int) -> np.ndarray:
    """(n,) float32: the max of `values` over the visible pixels of each label (-inf where it
    has none), in one pass (`np.maximum.at`), whatever the number of labels."""
    out = np.full(n, -np.inf, np.float32)
    where = np.flatnonzero(visible)
    np.maximum.at(out, labels.ravel()[where], values.ravel()[where])
    return out


def rank_defect_types(maps: ClassMaps, type_scores: np.ndarray, allowed: np.ndarray,
                      class_names: list[str]) -> list[dict[str, Any]]:
    """Defect types with pixels at the original resolution, most likely first (score, then area)."""
    n_classes = len(class_names)
    weights = maps.pixel_weights
    visible = weights > 0
    areas = np.bincount(maps.classes.ravel(), weights=weights.ravel(), minlength=n_classes)
    probs = renormalised_type_scores(type_scores, allowed)
    total = maps.width * maps.height
    ranked = [
        {"name": class_names[c], "score": sig(probs[c]), "area_fraction": sig(areas[c] / total),
         "max_pixel_score": sig(masked_max(maps.anomaly, (maps.classes == c) & visible))}
        for c in range(1, n_classes) if areas[c] > 0
    ]
    ranked.sort(key=lambda d: (-d["score"], -d["area_fraction"]))
    return ranked


def present_defects(classes: np.ndarray) -> list[int]:
    """Defect class ids with at least one pixel."""
    return [int(c) for c in np.nonzero(np.bincount(classes.ravel()))[0] if c != 0]


def component_labels(classes: np.ndarray, present: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """8-connected components of every defect class, numbered across classes: (labels (H, W)
    int32, 0 = none; owner (n + 1,), the class of each label), class by class, each class's in
    `ndimage.label`'s order. Classes are disjoint, so one label map holds them all and the
    statistics below take one pass for all classes."""
    labels = np.zeros(classes.shape, np.int32)
    owner = [0]
    for c in present:
        own, n = ndimage.label(classes == c, structure=_EIGHT_CONNECTED)
        if n:
            np.add(labels, own + np.int32(len(owner) - 1), out=labels, where=own > 0)
            owner += [c] * n
    return labels, np.asarray(owner, np.int32)


def find_regions(maps: ClassMaps, class_names: list[str], min_px: int, max_regions: int) -> list[dict[str, Any]]:
    """8-connected components per defect class, highest score then largest first (ties in class
    order, then component order); components under min_px original pixels dropped.

    Components are found on the model-resolution class map. When the upload is at least the
    model size, nearest upsampling keeps 8-connectivity, so these are exactly the components of
    the returned mask; for smaller uploads, model pixels no original pixel maps to are ignored.

    Areas and maxima of all components come from one pass each (bincount, `label_maxima`), and
    boxes only for the `max_regions` kept: a noisy map has thousands of components, and one
    Python step per component was most of a tiled answer's rendering. A component of area >= 1
    has a visible pixel; its score is the max over its visible pixels, as the mask shows it.
    """
    if max_regions <= 0:
        return []
    weights = maps.pixel_weights
    labels, owner = component_labels(maps.classes, present_defects(maps.classes))
    areas = np.bincount(labels.ravel(), weights=weights.ravel(), minlength=len(owner))
    kept = np.nonzero(areas[1:] >= max(min_px, 1))[0] + 1
    if kept.size == 0:
        return []
    scores = [sig(v) for v in label_maxima(maps.anomaly, labels, weights > 0, len(owner))[kept]]
    area_px = [int(round(a)) for a in areas[kept]]
    order = sorted(range(len(kept)), key=lambda k: (-scores[k], -area_px[k]))  # stable: ties keep label order
    boxes = ndimage.find_objects(labels)
    regions: list[dict[str, Any]] = []
    for k in order:
        rows, cols = boxes[kept[k] - 1]
        bbox = maps.box(rows, cols)
        if bbox is not None:
            regions.append({"defect_type": class_names[owner[kept[k]]], "bbox": bbox, "area_px": area_px[k],
                            "score": scores[k]})
        if len(regions) == max_regions:
            break
    return regions


def rle_masks(maps: ClassMaps, class_names: list[str], present: list[int] | None = None) -> dict[str, dict[str, Any]]:
    """COCO compressed RLE per defect type present, at the original size; size is [H, W] as in
    COCO. The counts come from the model-resolution map (ClassMaps.rle_counts); pycocotools
    compresses them into its string form, exactly what `mask.encode` gives for the full mask."""
    out: dict[str, dict[str, Any]] = {}
    h, w = maps.height, maps.width
    for c in present_defects(maps.classes) if present is None else present:
        counts = maps.rle_counts(c).astype(np.uint32)
        rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
        text = rle["counts"]
        out[class_names[c]] = {"size": [h, w], "counts": text.decode("ascii") if isinstance(text, bytes) else text}
    return out


def palette() -> list[int]:
    """Flat RGB palette: 0 black, then well-separated hues (golden-ratio steps)."""
    import colorsys

    pal = [0, 0, 0]
    for i in range(1, 256):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85, 1.0)
        pal += [int(r * 255), int(g * 255), int(b * 255)]
    return pal


_PALETTE = palette()


def png_b64(img: Image.Image, huffman_only: bool = False) -> str:
    """Encode a Pillow image as base64 PNG (zlib level 1: these are transient payloads; measured,
    level 1 is 3-8x faster than 6 for 1.4-2x the size, see docs/benchmarks.md).

    `huffman_only`: deflate without LZ77 matching, for photo content (overlays), where matches
    are rare: measured 20 % faster and 15 % smaller than the default strategy on a 5 MP
    overlay. Used for overlays drawn at a reduced size only, so answers for images within the
    cap stay byte-identical to what they were."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1, **({"compress_type": zlib.Z_HUFFMAN_ONLY} if huffman_only else {}))
    return base64.b64encode(buf.getvalue()).decode("ascii")


def png_mask(classes: np.ndarray) -> str:
    """Indexed PNG (mode 'P'): pixel value = class id, viewable thanks to the palette."""
    img = Image.fromarray(np.ascontiguousarray(classes, dtype=np.uint8))  # mode L
    img.putpalette(_PALETTE)  # L + palette -> P, pixel values unchanged
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


def build_mask(maps: ClassMaps, class_names: list[str], mask_format: MaskFormat,
               present: list[int] | None = None) -> dict[str, Any] | None:
    """The `mask` object of a result, or None when mask_format=none."""
    if mask_format == "none":
        return None
    label_map = {str(i): name for i, name in enumerate(class_names)}
    if mask_format == "rle":
        return {"format": "rle", "label_map": label_map, "rle": rle_masks(maps, class_names, present)}
    return {"format": "png", "label_map": label_map, "png": png_mask(maps.full_classes())}


def render_views(maps: ClassMaps, options: RenderOptions, image: Image.Image | None) -> dict[str, str]:
    """heatmap_png / overlay_png, at view_size(W, H, view_max_side); the image for the overlay
    must already be at that size (imaging.decode_sized draws it there)."""
    out: dict[str, str] = {}
    size = view_size(maps.width, maps.height, options.view_max_side)
    heat = heatmap_u8(maps.full_anomaly(size))
    if options.heatmap:
        out["heatmap_png"] = png_b64(Image.fromarray(heat))
    if options.overlay:
        if image is None:
            raise ValueError("overlay requested without the image")
        if image.size != size:
            raise ValueError(f"overlay image is {image.size[0]}x{image.size[1]}, expected {size[0]}x{size[1]}")
        out["overlay_png"] = png_b64(overlay(image, heat), huffman_only=size != (maps.width, maps.height))
    return out


def postprocess(outputs: EncoderOutputs, policy: scoring.Policy, width: int, height: int,
                class_names: list[str], options: RenderOptions,
                image: Image.Image | None = None) -> dict[str, Any]:
    """Everything of one result that comes from the model (no filename, ids or timings).

    `image` (only for overlays) is the upload at view_size(width, height, options.view_max_side)."""
    maps = model_maps(outputs, policy, width, height)
    score = scoring.image_score(outputs.anomaly_score[0], maps.anomaly, policy.image_score)
    return render_maps(maps, score, outputs.type_scores[0], policy, class_names, options, image)


def stitched_maps(anomaly: np.ndarray, types: np.ndarray, policy: scoring.Policy, width: int,
                  height: int) -> ClassMaps:
    """A whole image's (Hc, Wc) maps (tiles stitched, `service.runtime.tiling`): the pixel
    threshold, then the same exact mapping to the original W x H as an S x S map gets."""
    classes = np.asarray(scoring.final_type_map(types, anomaly, policy.pixel_threshold), np.uint8)
    sh, sw = classes.shape
    return ClassMaps(anomaly.astype(np.float32, copy=False), classes, nearest_index(width, sw),
                     nearest_index(height, sh))


def render_maps(maps: ClassMaps, score: float, type_scores: np.ndarray, policy: scoring.Policy,
                class_names: list[str], options: RenderOptions, image: Image.Image | None = None) -> dict[str, Any]:
    """`postprocess` from the final maps and the image score on (shared by tiled products)."""
    width, height = maps.width, maps.height
    result: dict[str, Any] = {
        "width": width,
        "height": height,
        "anomaly_score": sig(score),
        "is_anomalous": scoring.is_anomalous(score, policy.image_threshold),
        "threshold": policy.image_threshold,
        "defect_types": rank_defect_types(maps, type_scores, policy.allowed, class_names),
        "regions": find_regions(maps, class_names, options.min_region_px, options.max_regions),
    }
    present = [class_names.index(d["name"]) for d in result["defect_types"]]  # types with pixels
    mask = build_mask(maps, class_names, options.mask_format, present)
    if mask is not None:
        result["mask"] = mask
    if options.heatmap or options.overlay:
        result.update(render_views(maps, options, image))
    return result
