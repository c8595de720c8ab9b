"""Postprocessing on hand-made encoder outputs: original size, masks, regions, ranking."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils

from service.runtime.backends.base import EncoderOutputs
from service.runtime.postprocess import (
    ClassMaps, RenderOptions, find_regions, model_maps, postprocess, rle_masks,
)
from service.runtime.scoring import Policy

NAMES = ["normal", "scratch", "crack", "stain"]


def outputs(type_map: np.ndarray, anomaly_map: np.ndarray, type_scores=(0.1, 0.6, 0.2, 0.1)) -> EncoderOutputs:
    c = len(NAMES)
    return EncoderOutputs(
        anomaly_score=np.array([0.8], np.float32),
        type_scores=np.array([type_scores], np.float32),
        anomaly_map=anomaly_map[None].astype(np.float32),
        type_map=type_map[None].astype(np.uint8),
        class_max=np.ones((1, c), np.float32),
    )


def policy(allowed=(True, True, True, True), pixel_threshold=None, image_threshold=0.5) -> Policy:
    return Policy(np.array(allowed), image_threshold, pixel_threshold, 0.0)


def decode_png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def sample_maps(s: int = 8) -> tuple[np.ndarray, np.ndarray]:
    tmap = np.zeros((s, s), np.uint8)
    tmap[1:3, 1:4] = 1
    tmap[5:7, 5:8] = 2
    amap = np.where(tmap > 0, 0.9, 0.1).astype(np.float32)
    amap[1, 1] = 0.95
    return tmap, amap


def test_rle_equals_png_mask_at_original_size():
    tmap, amap = sample_maps()
    w, h = 37, 23
    out = outputs(tmap, amap)
    rle = postprocess(out, policy(), w, h, NAMES, RenderOptions(mask_format="rle"))
    png = postprocess(out, policy(), w, h, NAMES, RenderOptions(mask_format="png"))
    assert rle["width"] == png["width"] == w and rle["height"] == png["height"] == h
    indexed = decode_png(png["mask"]["png"])
    assert indexed.mode == "P" and indexed.size == (w, h)
    ids = np.asarray(indexed)
    assert set(np.unique(ids)) == {0, 1, 2}
    assert set(rle["mask"]["rle"]) == {"scratch", "crack"}  # stain has no pixels: omitted
    for name, obj in rle["mask"]["rle"].items():
        assert obj["size"] == [h, w] and isinstance(obj["counts"], str)
        decoded = mask_utils.decode({"size": obj["size"], "counts": obj["counts"].encode()})
        np.testing.assert_array_equal(decoded, ids == NAMES.index(name))
    assert rle["mask"]["label_map"] == {"0": "normal", "1": "scratch", "2": "crack", "3": "stain"}


def test_defect_types_ranked_renormalised_and_consistent_with_mask():
    tmap, amap = sample_maps()
    res = postprocess(outputs(tmap, amap), policy(), 16, 16, NAMES, RenderOptions())
    names = [d["name"] for d in res["defect_types"]]
    assert names == ["scratch", "crack"]
    scratch, crack = res["defect_types"]
    # renormalised over allowed defect types: 0.6 / (0.6 + 0.2 + 0.1)
    assert abs(scratch["score"] - 0.6 / 0.9) < 1e-5 and abs(crack["score"] - 0.2 / 0.9) < 1e-5
    assert scratch["area_fraction"] == 6 * 4 / 256  # 2x3 cells, each 2x2 pixels at 16x16
    assert scratch["max_pixel_score"] == 0.95  # the model-resolution peak
    assert res["is_anomalous"] is True and res["threshold"] == 0.5


def test_excluded_types_do_not_share_the_score():
    tmap, amap = sample_maps()
    res = postprocess(outputs(tmap, amap), policy(allowed=(True, True, True, False)), 16, 16, NAMES,
                      RenderOptions())
    scores = {d["name"]: d["score"] for d in res["defect_types"]}
    assert abs(scores["scratch"] - 0.6 / 0.8) < 1e-5


def test_pixel_threshold_removes_weak_pixels():
    tmap, amap = sample_maps()
    amap[5:7, 5:8] = 0.3  # the crack is weak
    res = postprocess(outputs(tmap, amap), policy(pixel_threshold=0.5), 8, 8, NAMES, RenderOptions(min_region_px=1))
    assert [d["name"] for d in res["defect_types"]] == ["scratch"]
    assert {r["defect_type"] for r in res["regions"]} == {"scratch"}


def test_regions_bbox_area_score_on_a_hand_made_map():
    classes = np.zeros((10, 12), np.uint8)
    classes[2:5, 3:7] = 1  # 3x4 block
    classes[7:9, 0:2] = 1  # 2x2 block, separate component of the same class
    classes[6, 10] = 2  # a single pixel: below min area
    classes[0:2, 9:12] = 2  # 2x3 block
    classes[4, 7] = 1  # touches (4, 6) diagonally? no: same row, adjacent -> joins the first block
    anomaly = np.zeros((10, 12), np.float32)
    anomaly[3, 4] = 0.9
    anomaly[8, 1] = 0.7
    anomaly[0, 11] = 0.8
    regions = find_regions(ClassMaps.identity(anomaly, classes), NAMES, min_px=2, max_regions=10)
    assert regions == [
        {"defect_type": "scratch", "bbox": [3, 2, 5, 3], "area_px": 13, "score": 0.9},
        {"defect_type": "crack", "bbox": [9, 0, 3, 2], "area_px": 6, "score": 0.8},
        {"defect_type": "scratch", "bbox": [0, 7, 2, 2], "area_px": 4, "score": 0.7},
    ]
    assert len(find_regions(ClassMaps.identity(anomaly, classes), NAMES, min_px=2, max_regions=1)) == 1


def regions_one_by_one(maps: ClassMaps, min_px: int, limit: int) -> list[dict]:
    """An independent reference: each class labelled on its own, each component measured in its
    own loop step on the full-resolution mask, then all sorted by (score, area) descending."""
    from scipy import ndimage

    full, anomaly_full = maps.full_classes(), maps.anomaly[maps.src_y][:, maps.src_x]
    found = []
    for c in range(1, len(NAMES)):
        labels, n = ndimage.label(full == c, structure=np.ones((3, 3), bool))
        for i in range(1, n + 1):
            ys, xs = np.nonzero(labels == i)
            if len(ys) >= min_px:
                found.append({"defect_type": NAMES[c], "area_px": len(ys),
                              "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                       int(ys.max() - ys.min() + 1)],
                              "score": float(f"{float(anomaly_full[ys, xs].max()):.6g}")})
    found.sort(key=lambda r: (-r["score"], -r["area_px"]))
    return found[:limit]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regions_of_a_noisy_map_match_one_by_one_measurement(seed):
    """Thousands of components (what a random model's map gives): the one-pass statistics give
    exactly the regions a per-component measurement on the full-size mask gives (the upload is
    2x the map along each axis, so components keep their shapes)."""
    rng = np.random.default_rng(seed)
    classes = rng.choice(len(NAMES), size=(60, 70), p=[0.55, 0.15, 0.15, 0.15]).astype(np.uint8)
    anomaly = np.round(rng.random((60, 70)), 2).astype(np.float32)  # coarse values: many score ties
    maps = ClassMaps(anomaly, classes, np.arange(140) // 2, np.arange(120) // 2)
    for min_px, limit in ((1, 10_000), (8, 40), (12, 5)):
        got = find_regions(maps, NAMES, min_px, limit)
        want = regions_one_by_one(maps, min_px, limit)
        assert [(r["score"], r["area_px"]) for r in got] == [(r["score"], r["area_px"]) for r in want]
        def key(r):
            return r["defect_type"], r["score"], r["area_px"], r["bbox"]
        assert sorted(map(key, got)) == sorted(map(key, want))


def test_regions_are_eight_connected():
    classes = np.zeros((4, 4), np.uint8)
    classes[0, 0] = classes[1, 1] = classes[2, 2] = 1
    regions = find_regions(ClassMaps.identity(np.ones((4, 4), np.float32), classes), NAMES, 1, 10)
    assert len(regions) == 1 and regions[0]["bbox"] == [0, 0, 3, 3] and regions[0]["area_px"] == 3


def test_heatmap_and_overlay_at_original_size_and_none_mask():
    tmap, amap = sample_maps()
    image = Image.new("RGB", (30, 20), (10, 20, 30))
    res = postprocess(outputs(tmap, amap), policy(), 30, 20, NAMES,
                      RenderOptions(mask_format="none", heatmap=True, overlay=True), image)
    assert "mask" not in res
    heat = decode_png(res["heatmap_png"])
    assert heat.mode == "L" and heat.size == (30, 20)
    h = np.asarray(heat)
    assert h.max() >= 229 and h.min() <= 26  # 0.9 and 0.1 of 255, bilinear in between
    over = decode_png(res["overlay_png"])
    assert over.mode == "RGB" and over.size == (30, 20)


def test_no_defect_pixels_gives_empty_lists():
    s = 8
    res = postprocess(outputs(np.zeros((s, s)), np.full((s, s), 0.05)), policy(), 9, 7, NAMES, RenderOptions())
    assert res["defect_types"] == [] and res["regions"] == [] and res["mask"]["rle"] == {}


def test_stats_and_regions_are_exact_at_the_original_resolution():
    """Areas and boxes computed at the model size equal a brute-force pass over the full mask."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    small = (rng.random((8, 8)) < 0.25).astype(np.uint8) * rng.integers(1, 4, (8, 8)).astype(np.uint8)
    amap = rng.random((8, 8)).astype(np.float32)
    w, h = 37, 23  # non-integer scales on both axes
    out = outputs(small, amap)
    res = postprocess(out, policy(), w, h, NAMES, RenderOptions(mask_format="png", min_region_px=1, max_regions=1000))
    full = np.asarray(decode_png(res["mask"]["png"]))
    for d in res["defect_types"]:
        assert d["area_fraction"] == float(f"{(full == NAMES.index(d['name'])).sum() / (w * h):.6g}")
    brute = []
    for c in range(1, 4):
        labels, n = ndimage.label(full == c, structure=np.ones((3, 3)))
        for sl in ndimage.find_objects(labels):
            ys, xs = sl
            brute.append((NAMES[c], [xs.start, ys.start, xs.stop - xs.start, ys.stop - ys.start]))
    got = [(r["defect_type"], r["bbox"]) for r in res["regions"]]
    assert sorted(got) == sorted(brute)
    areas = {tuple(r["bbox"]): r["area_px"] for r in res["regions"]}
    for name, (x, y, bw, bh) in brute:
        assert areas[(x, y, bw, bh)] == int((full[y:y + bh, x:x + bw] == NAMES.index(name)).sum())


def test_model_maps_map_every_original_pixel_once():
    maps = model_maps(outputs(np.zeros((8, 8)), np.zeros((8, 8))), policy(), 37, 5)
    assert maps.pixel_weights.sum() == 37 * 5
    assert maps.full_classes().shape == (5, 37)


def test_fused_image_score_uses_the_maps_maximum():
    tmap, amap = sample_maps()
    fused = Policy(np.array((True, True, True, True)), 0.5, None, 0.0, "global_max")
    res = postprocess(outputs(tmap, amap), fused, 16, 16, NAMES, RenderOptions())
    assert res["anomaly_score"] == pytest.approx(0.5 * (0.8 + 0.95), abs=1e-6)


def test_a_region_of_exactly_min_region_px_is_kept():
    classes = np.zeros((6, 6), np.uint8)
    classes[1, 1:4] = 1  # 3 pixels
    classes[4, 4:6] = 2  # 2 pixels
    regions = find_regions(ClassMaps.identity(np.ones((6, 6), np.float32), classes), NAMES, min_px=3, max_regions=10)
    assert [(r["defect_type"], r["area_px"]) for r in regions] == [("scratch", 3)]


# --- masks from the model-resolution map (no full-resolution array) -------------------------

def reference_full_classes(maps: ClassMaps) -> np.ndarray:
    """The full-resolution class map as the service built it before: two gathers."""
    return np.take(np.take(maps.classes, maps.src_y, axis=0), maps.src_x, axis=1)


def reference_rle(full: np.ndarray, class_id: int) -> dict:
    """pycocotools on the full binary mask (what rle_masks returned before)."""
    rle = mask_utils.encode(np.asfortranarray((full == class_id).astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_rle_from_the_small_map_equals_pycocotools_on_the_full_map(data):
    sh = data.draw(st.integers(1, 24), label="model rows")
    sw = data.draw(st.integers(1, 24), label="model cols")
    h = data.draw(st.integers(1, 300), label="H")
    w = data.draw(st.integers(1, 300), label="W")
    n_classes = data.draw(st.integers(1, 4), label="classes")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    density = data.draw(st.sampled_from([0.0, 0.05, 0.5, 1.0]), label="defect density")
    rng = np.random.default_rng(seed)
    classes = np.where(rng.random((sh, sw)) < density, rng.integers(1, n_classes + 1, (sh, sw)), 0).astype(np.uint8)
    maps = model_maps(outputs(classes, np.zeros((sh, sw))), policy(), w, h)
    full = reference_full_classes(maps)
    np.testing.assert_array_equal(maps.full_classes(), full)
    names = [f"c{i}" for i in range(n_classes + 1)]
    got = rle_masks(maps, names, list(range(n_classes + 1)))  # every class, present or not, normal too
    for c in range(n_classes + 1):
        assert got[names[c]] == reference_rle(full, c), (c, sh, sw, h, w)


@pytest.mark.parametrize("w,h", [(2448, 2048), (5472, 3648), (4001, 17)])
def test_large_uploads_get_exactly_the_masks_the_full_array_gave(w, h):
    """Old path (full array + pycocotools / PNG of the full array) vs new, at camera sizes."""
    rng = np.random.default_rng(w)
    s = 112
    yy, xx = np.mgrid[0:s, 0:s]
    tmap = np.zeros((s, s), np.uint8)
    for k in range(1, 4):  # blobs of three types and a sprinkle of single pixels
        cy, cx, r = rng.integers(10, s - 10), rng.integers(10, s - 10), rng.integers(3, 12)
        tmap[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = k
    tmap[rng.random((s, s)) < 0.01] = 2
    amap = np.where(tmap > 0, 0.8, 0.1).astype(np.float32)
    out = outputs(tmap, amap)
    rle = postprocess(out, policy(), w, h, NAMES, RenderOptions(mask_format="rle"))
    full = reference_full_classes(model_maps(out, policy(), w, h))
    assert set(rle["mask"]["rle"]) == {"scratch", "crack", "stain"}
    for name, obj in rle["mask"]["rle"].items():
        assert obj == reference_rle(full, NAMES.index(name))
    png = postprocess(out, policy(), w, h, NAMES, RenderOptions(mask_format="png"))
    np.testing.assert_array_equal(np.asarray(decode_png(png["mask"]["png"])), full)
    for d in rle["defect_types"]:  # areas are read off the same map
        assert d["area_fraction"] == float(f"{(full == NAMES.index(d['name'])).sum() / (w * h):.6g}")


def test_heatmap_and_overlay_are_capped_for_large_uploads():
    tmap, amap = sample_maps()
    w, h = 2448, 2048
    size = (612, 512)  # 1/4: the smallest power-of-two reduction within 1024 px
    image = Image.new("RGB", size, (10, 20, 30))
    res = postprocess(outputs(tmap, amap), policy(), w, h, NAMES,
                      RenderOptions(mask_format="none", heatmap=True, overlay=True, view_max_side=1024), image)
    assert decode_png(res["heatmap_png"]).size == size and decode_png(res["overlay_png"]).size == size
    assert res["width"] == w and res["height"] == h  # everything else stays at the original size
    with pytest.raises(ValueError, match="expected 612x512"):
        postprocess(outputs(tmap, amap), policy(), w, h, NAMES,
                    RenderOptions(mask_format="none", overlay=True, view_max_side=1024), Image.new("RGB", (w, h)))


def test_a_reduced_overlay_is_the_same_picture_whatever_the_deflate_strategy():
    """Reduced overlays are deflated Huffman-only (photo content); the pixels are the blend."""
    from service.runtime.postprocess import heatmap_u8, overlay

    tmap, amap = sample_maps()
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (512, 612, 3), dtype=np.uint8))
    res = postprocess(outputs(tmap, amap), policy(), 2448, 2048, NAMES,
                      RenderOptions(mask_format="none", overlay=True, view_max_side=1024), image)
    maps = model_maps(outputs(tmap, amap), policy(), 2448, 2048)
    expected = overlay(image, heatmap_u8(maps.full_anomaly((612, 512))))
    np.testing.assert_array_equal(np.asarray(decode_png(res["overlay_png"])), np.asarray(expected))
