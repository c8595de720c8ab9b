"""Where masks, heatmaps and overlays land at the ORIGINAL size, against independent references.

The references here do not reuse the service's code:
- nearest neighbour (masks): exact rational arithmetic (`fractions.Fraction`) and hand-computed
  tables. Convention: output pixel i has its centre at (i + 1/2) * n_in / n_out source pixels and
  takes the source pixel k whose extent [k, k + 1) contains it, so a centre that falls exactly on
  a boundary (a tie) goes to the HIGHER index. Pillow's NEAREST agrees everywhere except at such
  ties, which it breaks by float rounding (sometimes down), so it is compared off the ties only.
- bilinear (heatmaps, overlays): Pillow's documented separable triangle filter written out in
  numpy (support widened by the scale when shrinking), in float64.
- colour map: hand-computed anchor colours of the blue-green-red ramp, and `Image.blend`'s
  arithmetic (image * (1 - alpha) + colour * alpha) for the overlay.
"""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from references import jet_reference, reference_bilinear, reference_nearest, ties
from service.runtime.backends.base import EncoderOutputs
from service.runtime.postprocess import RenderOptions, nearest_index, postprocess
from service.runtime.scoring import Policy

NAMES = ["normal", "scratch", "crack", "stain"]


def outputs(type_map: np.ndarray, anomaly_map: np.ndarray) -> EncoderOutputs:
    return EncoderOutputs(
        anomaly_score=np.array([0.8], np.float32),
        type_scores=np.array([[0.1, 0.6, 0.2, 0.1]], np.float32),
        anomaly_map=anomaly_map[None].astype(np.float32),
        type_map=type_map[None].astype(np.uint8),
        class_max=np.ones((1, len(NAMES)), np.float32),
    )


def plain_policy() -> Policy:
    return Policy(np.ones(len(NAMES), bool), 0.5, None, 0.0)


def png_pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def served_mask(classes: np.ndarray, width: int, height: int) -> np.ndarray:
    res = postprocess(outputs(classes, np.full(classes.shape, 0.9)), plain_policy(), width, height, NAMES,
                      RenderOptions(mask_format="png"))
    return png_pixels(res["mask"]["png"])


# --- nearest neighbour: the index tables -----------------------------------------------------
def test_nearest_index_hand_computed_tables():
    assert nearest_index(3, 2).tolist() == [0, 1, 1]  # centres 1/3, 1 (a tie: goes up), 5/3
    assert nearest_index(5, 3).tolist() == [0, 0, 1, 2, 2]  # centres 0.3, 0.9, 1.5, 2.1, 2.7
    assert nearest_index(6, 4).tolist() == [0, 1, 1, 2, 3, 3]  # centres 1/3, 1 (tie), 5/3, 7/3, 3 (tie), 11/3
    assert nearest_index(2, 5).tolist() == [1, 3]  # shrinking: centres 1.25, 3.75
    assert nearest_index(4, 4).tolist() == [0, 1, 2, 3]  # same size: identity
    assert nearest_index(1, 7).tolist() == [3]  # one output pixel: the middle source pixel


@pytest.mark.parametrize("n_in,n_out", [(37, 250), (112, 97), (8, 23), (112, 640), (112, 61), (112, 48),
                                        (2, 3), (37, 37), (518, 333), (7, 1000)])
def test_nearest_index_equals_exact_rational_reference(n_in, n_out):
    got = nearest_index(n_out, n_in)
    assert got.dtype.kind == "i" and got.tolist() == reference_nearest(n_out, n_in)


def test_nearest_index_37_to_250_covers_each_source_pixel_six_or_seven_times():
    counts = np.bincount(nearest_index(250, 37), minlength=37)
    assert counts.sum() == 250 and set(counts.tolist()) == {6, 7}
    # source 0 covers the outputs whose centre is below 1: (i + 1/2) * 37 / 250 < 1  <=>  i <= 6
    assert counts[0] == 7 and counts[-1] == 7  # symmetric placement: no shift towards either edge


@pytest.mark.parametrize("n_in,n_out", [(37, 250), (8, 23), (112, 97), (4, 6), (112, 61), (112, 640), (5, 2)])
def test_nearest_index_matches_pillow_nearest_off_the_ties(n_in, n_out):
    row = np.arange(n_in, dtype=np.uint8)[None, :]
    pil = np.asarray(Image.fromarray(row).resize((n_out, 1), Image.Resampling.NEAREST))[0]
    ours = nearest_index(n_out, n_in)
    off_ties = np.setdiff1d(np.arange(n_out), ties(n_out, n_in))
    assert off_ties.size >= n_out / 2
    np.testing.assert_array_equal(ours[off_ties], pil[off_ties])


# --- nearest neighbour: masks through postprocess --------------------------------------------
def test_mask_2x2_to_3x3_hand_computed():
    classes = np.array([[1, 2], [3, 0]], np.uint8)
    np.testing.assert_array_equal(served_mask(classes, 3, 3), [[1, 2, 2], [3, 0, 0], [3, 0, 0]])


def test_mask_2x2_to_5x3_hand_computed():
    classes = np.array([[1, 2], [3, 0]], np.uint8)
    # columns: centres 0.2, 0.6, 1.0 (tie: up), 1.4, 1.8 -> 0 0 1 1 1; rows: 1/3, 1 (tie), 5/3 -> 0 1 1
    np.testing.assert_array_equal(served_mask(classes, 5, 3),
                                  [[1, 1, 2, 2, 2], [3, 3, 0, 0, 0], [3, 3, 0, 0, 0]])


def test_single_model_pixel_lands_where_the_reference_puts_it_37_to_250():
    for (r, c) in [(0, 0), (18, 5), (36, 36), (7, 30)]:
        classes = np.zeros((37, 37), np.uint8)
        classes[r, c] = 2
        mask = served_mask(classes, 250, 250)
        ys, xs = np.nonzero(mask == 2)
        ref_rows = [i for i, s in enumerate(reference_nearest(250, 37)) if s == r]
        ref_cols = [i for i, s in enumerate(reference_nearest(250, 37)) if s == c]
        assert sorted(set(ys.tolist())) == ref_rows and sorted(set(xs.tolist())) == ref_cols
        assert len(ys) == len(ref_rows) * len(ref_cols)


def test_mask_at_non_square_size_equals_rational_reference_everywhere():
    rng = np.random.default_rng(3)
    classes = rng.integers(0, 4, (37, 37)).astype(np.uint8)
    w, h = 250, 97
    expected = classes[np.ix_(reference_nearest(h, 37), reference_nearest(w, 37))]
    np.testing.assert_array_equal(served_mask(classes, w, h), expected)


def test_rle_masks_land_at_the_same_place_as_the_reference():
    from pycocotools import mask as mask_utils

    classes = np.zeros((8, 8), np.uint8)
    classes[2:4, 5] = 1
    res = postprocess(outputs(classes, np.full((8, 8), 0.9)), plain_policy(), 37, 23, NAMES, RenderOptions())
    obj = res["mask"]["rle"]["scratch"]
    decoded = mask_utils.decode({"size": obj["size"], "counts": obj["counts"].encode()})
    expected = classes[np.ix_(reference_nearest(23, 8), reference_nearest(37, 8))] == 1
    assert expected.any()
    np.testing.assert_array_equal(decoded.astype(bool), expected)


# --- bilinear heatmaps -----------------------------------------------------------------------
def test_bilinear_reference_agrees_with_itself_on_a_constant_and_a_ramp():
    """Sanity of the reference: constants stay constant, an interior ramp stays linear."""
    np.testing.assert_allclose(reference_bilinear(np.full((4, 4), 0.3), 9, 7), 0.3)
    ramp = np.tile(np.arange(4, dtype=np.float64), (4, 1))
    up = reference_bilinear(ramp, 8, 4)  # x: centres (i + 1/2) / 2 - 1/2 -> clamped at the edges
    np.testing.assert_allclose(up[0], [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3], atol=1e-12)


@pytest.mark.parametrize("size", [(30, 20), (250, 170), (37, 91), (5, 3), (8, 8)])
def test_heatmap_pixels_equal_the_bilinear_reference(size):
    w, h = size
    rng = np.random.default_rng(w * h)
    amap = rng.random((8, 8)).astype(np.float32)
    res = postprocess(outputs(np.zeros((8, 8)), amap), plain_policy(), w, h, NAMES,
                      RenderOptions(mask_format="none", heatmap=True))
    heat = png_pixels(res["heatmap_png"])
    assert heat.shape == (h, w)
    ref = reference_bilinear(amap, w, h) * 255.0
    diff = np.abs(heat.astype(np.float64) - np.rint(ref))
    near_half = np.abs(ref - np.floor(ref) - 0.5) < 1e-3  # float32 vs float64 may round these either way
    assert diff.max() <= 1 and not (diff[~near_half] > 0).any()


def test_heatmap_clips_outside_zero_one():
    amap = np.array([[-0.5, 2.0], [0.0, 1.0]], np.float32)
    res = postprocess(outputs(np.zeros((2, 2)), amap), plain_policy(), 2, 2, NAMES,
                      RenderOptions(mask_format="none", heatmap=True))
    np.testing.assert_array_equal(png_pixels(res["heatmap_png"]), [[0, 255], [0, 255]])


# --- colour map and overlay ------------------------------------------------------------------
def test_jet_reference_anchors():
    """The ramp by hand: dark blue, blue-cyan, green with red and blue halves, orange, dark red."""
    assert jet_reference(0) == (0, 0, 127.5) and jet_reference(255) == (127.5, 0, 0)
    assert jet_reference(64) == (0, 128.5, 255)
    assert jet_reference(128) == (129.5, 255, 125.5)
    assert jet_reference(192) == (255, 124.5, 0)


@pytest.mark.parametrize("v", [0, 32, 64, 96, 128, 160, 192, 224, 255])
def test_overlay_blends_the_colour_map_half_and_half(v):
    """A uniform map of value v over a uniform image: every overlay pixel is (image + jet(v)) / 2."""
    image_rgb = (200, 40, 90)
    image = Image.new("RGB", (30, 20), image_rgb)
    amap = np.full((8, 8), v / 255.0, np.float32)
    res = postprocess(outputs(np.zeros((8, 8)), amap), plain_policy(), 30, 20, NAMES,
                      RenderOptions(mask_format="none", overlay=True), image)
    over = png_pixels(res["overlay_png"]).astype(int)
    assert over.shape == (20, 30, 3)
    expected = (np.array(image_rgb) + np.array(jet_reference(v))) / 2.0
    assert np.abs(over - expected).max() <= 1.0  # the table's half-way rounding, then the blend's


def test_overlay_follows_the_map_pixel_by_pixel():
    """A left-low / right-high map: left pixels blend with blue, right pixels with red."""
    amap = np.zeros((8, 8), np.float32)
    amap[:, 4:] = 1.0
    image = Image.new("RGB", (64, 16), (100, 100, 100))
    res = postprocess(outputs(np.zeros((8, 8)), amap), plain_policy(), 64, 16, NAMES,
                      RenderOptions(mask_format="none", overlay=True, heatmap=True), image)
    heat = png_pixels(res["heatmap_png"]).astype(np.float64)
    np.testing.assert_array_equal(heat, np.rint(reference_bilinear(amap, 64, 16) * 255.0))
    over = png_pixels(res["overlay_png"]).astype(int)
    left, right = (np.array([100, 100, 100]) + np.array([jet_reference(0), jet_reference(255)])) / 2.0
    assert np.abs(over[:, 0] - left).max() <= 1.0 and np.abs(over[:, -1] - right).max() <= 1.0
