"""Decoding every accepted format to 8-bit RGB, the limits, and preprocess."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from service.runtime.imaging import ImageError, decode, preprocess, sniff_format

LIMITS = dict(max_pixels=40_000_000, max_side=16384)
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def rgb_pattern(w: int = 40, h: int = 24) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256], axis=-1).astype(np.uint8)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_raw(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand (Pillow cannot write 48-bit RGB, and bombs need a lying header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))


@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True})])
def test_lossless_rgb_formats_roundtrip_exactly(fmt, kw):
    arr = rgb_pattern()
    img = decode(encode(Image.fromarray(arr), fmt, **kw), f"x.{fmt.lower()}", **LIMITS)
    assert img.mode == "RGB" and img.size == (40, 24)
    np.testing.assert_array_equal(np.asarray(img), arr)


def test_jpeg_decodes_to_rgb_close_to_source():
    arr = rgb_pattern()
    img = decode(encode(Image.fromarray(arr), "JPEG", quality=95), "x.jpg", **LIMITS)
    assert img.mode == "RGB" and img.size == (40, 24)
    assert np.abs(np.asarray(img, dtype=int) - arr).mean() < 6


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_gray_is_scaled_not_clipped(fmt):
    values = np.array([[0, 257, 1000, 32768, 65535, 65280]], dtype=np.uint16)
    img = decode(encode(Image.fromarray(values), fmt), "g16", **LIMITS)
    assert img.mode == "RGB"
    out = np.asarray(img)[0, :, 0]
    np.testing.assert_array_equal(out, np.rint(values[0].astype(float) * 255 / 65535).astype(np.uint8))
    assert out[3] == 128  # mid-grey stays mid-grey (clipping would give 255)


def test_16bit_rgb_png():
    rgb16 = np.array([[[0, 32768, 65535], [65535, 0, 4096]]], dtype=">u2")  # 1 x 2 pixels
    rows = b"\x00" + rgb16.tobytes()
    img = decode(png_raw(2, 1, 16, 2, rows), "rgb48.png", **LIMITS)
    out = np.asarray(img, dtype=int)
    assert img.mode == "RGB"
    np.testing.assert_allclose(out[0], np.round(rgb16[0].astype(float) * 255 / 65535), atol=1)


def test_gray_and_one_bit():
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    img = decode(encode(Image.fromarray(gray), "PNG"), "g.png", **LIMITS)
    np.testing.assert_array_equal(np.asarray(img), np.repeat(gray[..., None], 3, axis=2))
    bits = Image.fromarray(gray > 127).convert("1")
    out = np.asarray(decode(encode(bits, "BMP"), "b.bmp", **LIMITS))
    assert set(np.unique(out)) == {0, 255}


def test_rgba_is_composited_on_black():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:, :2, 3] = 255  # opaque left half
    rgba[:, 2:, 3] = 0  # transparent right half
    out = np.asarray(decode(encode(Image.fromarray(rgba), "PNG"), "a.png", **LIMITS))
    assert (out[:, :2] == 200).all() and (out[:, 2:] == 0).all()
    half = rgba.copy()
    half[..., 3] = 128
    out = np.asarray(decode(encode(Image.fromarray(half), "WEBP", lossless=True), "a.webp", **LIMITS))
    assert np.abs(out.astype(int) - 100).max() <= 1


def test_la_and_palette_with_transparency():
    la = Image.fromarray(np.dstack([np.full((3, 3), 90, np.uint8), np.full((3, 3), 255, np.uint8)]), "LA")
    assert (np.asarray(decode(encode(la, "PNG"), "la.png", **LIMITS)) == 90).all()
    pal = Image.fromarray(rgb_pattern()).quantize(16)
    out = decode(encode(pal, "PNG"), "p.png", **LIMITS)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(pal.convert("RGB")))
    pal.info["transparency"] = 0
    out = np.asarray(decode(encode(pal, "PNG", transparency=0), "pt.png", **LIMITS))
    idx = np.asarray(pal)
    assert (out[idx == 0] == 0).all()


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk(fmt):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = np.asarray(decode(encode(cmyk, fmt), "c", **LIMITS), dtype=int)
    assert out.shape == (8, 8, 3)
    assert out[..., 0].min() > 200 and out[..., 1].max() < 60 and out[..., 2].max() < 60


def test_exif_orientation_is_applied():
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = 255  # left half white (as stored)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW to display
    out = decode(encode(img, "JPEG", exif=exif.tobytes(), quality=95), "r.jpg", **LIMITS)
    assert out.size == (20, 40)  # W and H swapped
    a = np.asarray(out, dtype=int)
    assert a[:20].mean() > 200 and a[20:].mean() < 50  # the white half is now on top


def test_unsupported_types_are_415():
    gif = encode(Image.new("RGB", (4, 4)), "GIF")
    for data in (gif, b"hello world", b"%PDF-1.4 ..."):
        with pytest.raises(ImageError) as e:
            decode(data, "file.bin", **LIMITS)
        assert e.value.status == 415 and "file.bin" in str(e.value)
    assert sniff_format(gif) is None


def test_empty_truncated_and_corrupt_are_400():
    jpeg = encode(Image.fromarray(rgb_pattern(200, 200)), "JPEG")
    png = encode(Image.fromarray(rgb_pattern(200, 200)), "PNG")
    cases = {"empty.png": b"", "trunc.jpg": jpeg[: len(jpeg) // 2], "trunc.png": png[: len(png) // 2],
             "garbage.png": png[:40] + bytes(range(256)) * 4, "header-only.png": png[:8]}
    for name, data in cases.items():
        with pytest.raises(ImageError) as e:
            decode(data, name, **LIMITS)
        assert e.value.status == 400, name
        assert name in str(e.value)


def test_bomb_header_refused_before_decoding():
    # 100k x 100k header with a one-row IDAT: refused from the header alone (413)
    bomb = png_raw(100_000, 100_000, 8, 0, b"\x00" * 10)
    with pytest.raises(ImageError) as e:
        decode(bomb, "bomb.png", **LIMITS)
    assert e.value.status == 413 and "bomb.png" in str(e.value)


def test_pixel_and_side_limits():
    zeros = encode(Image.new("L", (3000, 3000)), "PNG")  # ~9 MP, compresses to a few KB
    with pytest.raises(ImageError) as e:
        decode(zeros, "big.png", max_pixels=1_000_000, max_side=16384)
    assert e.value.status == 413
    with pytest.raises(ImageError) as e:
        decode(encode(Image.new("L", (500, 10)), "PNG"), "wide.png", max_pixels=10**9, max_side=400)
    assert e.value.status == 413 and "maximum side" in str(e.value)


def test_preprocess_is_pure_and_normalised():
    img = Image.new("RGB", (50, 30), (255, 0, 128))
    before = img.tobytes()
    x = preprocess(img, 16, MEAN, STD)
    assert x.shape == (3, 16, 16) and x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
    expected = (np.array([255, 0, 128]) / 255 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(x[:, 5, 5], expected, rtol=1e-5)
    assert img.tobytes() == before and img.size == (50, 30)
    np.testing.assert_array_equal(preprocess(img, 16, MEAN, STD), x)


def test_preprocess_does_not_keep_aspect():
    arr = np.zeros((10, 100, 3), dtype=np.uint8)
    arr[:, 50:] = 255
    x = preprocess(Image.fromarray(arr), 20, (0, 0, 0), (1, 1, 1))
    assert x[0, :, :8].max() < 0.05 and x[0, :, 12:].min() > 0.95  # right half stays right half, full height


MAGICS = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBP"]


@settings(max_examples=150, deadline=None)
@given(magic=st.sampled_from(MAGICS), tail=st.binary(max_size=300))
def test_hostile_bytes_only_ever_raise_image_error(magic, tail):
    """Random bytes behind every accepted magic: a clean ImageError (never a 500) or an image."""
    try:
        img = decode(magic + tail, "fuzz.bin", max_pixels=1_000_000, max_side=4096)
    except ImageError as e:
        assert e.status in (400, 413, 415) and "fuzz.bin" in str(e)
    else:
        assert img.mode == "RGB"


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(min_value=1, max_value=2000), fmt=st.sampled_from(["PNG", "JPEG", "BMP", "TIFF", "WEBP"]))
def test_any_truncation_is_a_clean_error(cut, fmt):
    data = encode(Image.fromarray(rgb_pattern(40, 24)), fmt)
    try:
        decode(data[: min(cut, len(data) - 1)], "cut", **LIMITS)
    except ImageError as e:
        assert e.status in (400, 415)
