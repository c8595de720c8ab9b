"""Decoding only what the request needs: DCT-scaled JPEG decode for the model, the overlay's
own (capped) decode, and the data loaders reading through the same path."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.runtime.imaging import (
    DecodeOptions, decode, decode_sized, load, model_side, preprocess, reduce_on_decode, view_scale, view_size,
)
from training.data import AnomalyDataset, Sample

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the constants every artifact carries (any will do here)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

LIMITS = dict(max_pixels=40_000_000, max_side=16384)


def photo_like(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth structure + fine grain + sensor noise: detail at every scale, as in a photo."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(40, 220, (h // 64 + 2, w // 64 + 2, 3), dtype=np.uint8))
    arr = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    grain = Image.fromarray(rng.integers(0, 256, (h // 3 + 1, w // 3 + 1), dtype=np.uint8))
    arr = arr + (np.asarray(grain.resize((w, h), Image.Resampling.BICUBIC), np.float32)[..., None] - 127.5) * 0.15
    arr = arr + rng.normal(0.0, 3.0, arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def options(model_size: int, view_max_side: int | None = None) -> DecodeOptions:
    return DecodeOptions(**LIMITS, model_size=model_size, view_max_side=view_max_side)


@pytest.mark.parametrize("size,model_size,scale", [
    ((2448, 2048), 112, 8),   # 5 MP on the demo model: 306 x 256 >= 196
    ((2448, 2048), 518, 2),   # 5 MP on ViT-L/14@518: 1224 x 1024 >= 907
    ((5472, 3648), 518, 4),   # 20 MP: 1368 x 912 >= 907
    ((800, 600), 112, 2),     # 600 / 4 = 150 < 196, 600 / 2 = 300
    ((391, 391), 112, 1),     # under 2 x 196: decoded as before
])
def test_the_scale_is_the_largest_that_keeps_the_margin(size, model_size, scale):
    data = jpeg(Image.new("RGB", size, (90, 120, 150)))
    img = Image.open(io.BytesIO(data))
    assert reduce_on_decode(img, model_side(model_size)) == scale
    w, h = size
    assert img.size == (-(-w // scale), -(-h // scale))  # libjpeg rounds the scaled size up
    assert min(img.size) >= 1.75 * model_size or scale == 1


@pytest.mark.parametrize("w,h,fmt", [(333, 333, "JPEG"), (391, 300, "JPEG"), (640, 480, "PNG"), (1000, 800, "PNG")])
def test_small_jpegs_and_other_formats_decode_exactly_as_before(w, h, fmt):
    img = photo_like(w, h)
    buf = io.BytesIO()
    img.save(buf, fmt)
    data = buf.getvalue()
    out = decode_sized(data, "x", options(112))
    assert (out.width, out.height) == (w, h) and out.image.size == (w, h)
    np.testing.assert_array_equal(np.asarray(out.image), np.asarray(decode(data, "x", **LIMITS)))


def test_a_large_jpeg_is_reduced_and_stays_close_to_a_full_decode():
    data = jpeg(photo_like(1600, 1200))
    out = decode_sized(data, "big.jpg", options(112))
    assert (out.width, out.height) == (1600, 1200)  # answers stay at the original size
    assert out.image.size == (400, 300)  # 1/4: 300 >= 196, 1/8 would leave 150
    scaled = preprocess(out.image, 112, CLIP_MEAN, CLIP_STD)
    full = preprocess(decode(data, "big.jpg", **LIMITS), 112, CLIP_MEAN, CLIP_STD)
    grey_levels = np.abs(scaled - full) * np.asarray(CLIP_STD, np.float32)[:, None, None] * 255
    assert grey_levels.mean() < 1.0 and grey_levels.max() < 8  # measured: ~0.3 mean, ~3 max


def test_exif_rotation_is_applied_to_the_reduced_image_and_the_size_is_the_oriented_one():
    img = photo_like(1600, 1200)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW to display
    data = jpeg(img, exif=exif.tobytes())
    out = decode_sized(data, "r.jpg", options(112))
    assert (out.width, out.height) == (1200, 1600)
    assert out.image.size == (300, 400)
    full = decode(data, "r.jpg", **LIMITS)
    assert full.size == (1200, 1600)
    reduced = np.asarray(full.resize((300, 400), Image.Resampling.BOX), dtype=np.float32)
    assert np.abs(np.asarray(out.image, np.float32) - reduced).mean() < 3  # same picture, same way up


def test_the_overlay_view_is_decoded_separately_at_its_capped_size():
    data = jpeg(photo_like(2448, 2048))
    out = decode_sized(data, "v.jpg", options(112, view_max_side=1024))
    assert out.image.size == (306, 256)  # the model's input is the same with or without an overlay
    np.testing.assert_array_equal(np.asarray(out.image), np.asarray(decode_sized(data, "v.jpg", options(112)).image))
    assert out.view is not None and out.view.size == view_size(2448, 2048, 1024) == (612, 512)
    ref = decode(data, "v.jpg", **LIMITS).reduce(4)  # a 4 x 4 box average of the full decode
    assert np.abs(np.asarray(out.view, np.float32) - np.asarray(ref, np.float32)).mean() < 2
    full = decode_sized(data, "v.jpg", options(112, view_max_side=0))
    assert full.view is not None
    np.testing.assert_array_equal(np.asarray(full.view), np.asarray(decode(data, "v.jpg", **LIMITS)))


@pytest.mark.parametrize("fmt,cap,size", [("JPEG", 60, (50, 43)), ("PNG", 700, (397, 342)), ("JPEG", 9, (7, 6))])
def test_views_beyond_the_dct_scales_and_of_other_formats_are_box_reductions(fmt, cap, size):
    img = photo_like(793, 683)  # odd sizes: every division rounds up
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    scale = view_scale(793, 683, cap)
    assert size == (-(-793 // scale), -(-683 // scale))
    out = decode_sized(buf.getvalue(), "o", options(112, view_max_side=cap))
    assert out.view is not None and out.view.size == view_size(793, 683, cap) == size
    ref = np.asarray(decode(buf.getvalue(), "o", **LIMITS).reduce(scale), np.float32)
    tolerance = 0.0 if fmt == "PNG" else 3.0  # PNG: exactly reduce(); JPEG: DCT scaling, then reduce()
    assert np.abs(np.asarray(out.view, np.float32) - ref).mean() <= tolerance


def test_a_small_image_is_its_own_view():
    data = jpeg(photo_like(300, 200))
    out = decode_sized(data, "s.jpg", options(112, view_max_side=1024))
    assert out.view is out.image and out.view.size == (300, 200)


@pytest.mark.parametrize("w,h,cap,expected", [
    (2448, 2048, 1024, (612, 512)), (2048, 2448, 1024, (512, 612)), (640, 480, 1024, (640, 480)),
    (5472, 3648, 1024, (684, 456)), (5472, 3648, 0, (5472, 3648)), (1025, 3, 1024, (513, 2)),
    (1024, 1024, 1024, (1024, 1024)),
])
def test_view_size_is_a_power_of_two_reduction_within_the_cap(w, h, cap, expected):
    assert view_size(w, h, cap) == expected


def test_the_data_loader_reads_through_the_service_decode(tmp_path):
    """Training and evaluation tensors are the served tensors, scaled decode included."""
    path = tmp_path / "part.jpg"
    path.write_bytes(jpeg(photo_like(1600, 1200)))
    mask = tmp_path / "part_mask.png"
    Image.new("L", (1600, 1200), 0).save(mask)  # the mask check uses the stored size
    ds = AnomalyDataset([Sample(path, mask, "p", "hole", 1, 1)], size=112, mean=CLIP_MEAN, std=CLIP_STD,
                        check_sizes=True)
    pixels = ds[0][0].numpy()
    served = decode_sized(path.read_bytes(), "part.jpg", options(112))
    np.testing.assert_array_equal(pixels, preprocess(served.image, 112, CLIP_MEAN, CLIP_STD))
    assert served.image.size == (400, 300)


def test_training_does_not_orient_but_reduces_the_same_way(tmp_path):
    img = photo_like(1600, 1200)
    exif = img.getexif()
    exif[0x0112] = 6
    path = tmp_path / "r.jpg"
    path.write_bytes(jpeg(img, exif=exif.tobytes()))
    stored_grid = load(Image.open(path), "r.jpg", model_side(112), orient=False)
    assert stored_grid.size == (400, 300)
    ds = AnomalyDataset([Sample(path, None, "p", None, 0, 0)], size=112, mean=CLIP_MEAN, std=CLIP_STD)
    np.testing.assert_array_equal(ds[0][0].numpy(), preprocess(stored_grid, 112, CLIP_MEAN, CLIP_STD))


def test_a_view_coarser_than_the_model_decode_is_reduced_from_it():
    """ViT-L/14@518 on 5 MP: the model's decode is 1/2; the 1024 px view (1/4) is its reduce(2)."""
    data = jpeg(photo_like(2448, 2048))
    out = decode_sized(data, "l.jpg", options(518, view_max_side=1024))
    assert out.image.size == (1224, 1024) and out.view is not None and out.view.size == (612, 512)
    np.testing.assert_array_equal(np.asarray(out.view), np.asarray(out.image.reduce(2)))
