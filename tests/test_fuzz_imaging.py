"""Property-based fuzzing of the decoder: hostile bytes give ImageError (400/413/415), never
anything else, and never decode pixels before the size check.

`decode` is the only place untrusted bytes meet a C library; whatever it is fed, it either
returns an 8-bit RGB image within the limits or raises ImageError with an HTTP status the API
maps to a 4xx. Any other exception would be a 500 in the service.
"""
from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from robust_util import hostile_headers, png_declaring, seed_images
from service.runtime.imaging import DecodeOptions, ImageError, decode, decode_sized, view_size

LIMITS = dict(max_pixels=40_000_000, max_side=16384)
SEEDS = seed_images()
SEED_NAMES = sorted(SEEDS)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decode_or_image_error(data: bytes, name: str = "fuzz.bin", **limits) -> Image.Image | ImageError:
    """decode(), where ImageError is an allowed outcome and must carry a 4xx status."""
    try:
        img = decode(data, name, **(limits or LIMITS))
    except ImageError as e:
        assert e.status in (400, 413, 415), e.status
        assert e.filename == name and name in str(e)
        return e
    assert img.mode == "RGB"
    lim = limits or LIMITS
    assert 0 < img.width <= lim["max_side"] and 0 < img.height <= lim["max_side"]
    assert img.width * img.height <= lim["max_pixels"]
    return img


@st.composite
def mutated(draw) -> bytes:
    """A valid seed file, then a few random edits: flips, overwrites, inserts, deletes, truncation."""
    data = bytearray(SEEDS[draw(st.sampled_from(SEED_NAMES))])
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate", "header"]))
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[pos:pos + len(chunk)] = chunk
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif op == "truncate":
            del data[pos:]
        else:  # the header is where the dimensions and offsets live: hit it harder
            hpos = draw(st.integers(0, min(63, len(data) - 1)))
            data[hpos] = draw(st.integers(0, 255))
    return bytes(data)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_never_escape_as_other_errors(data):
    decode_or_image_error(data)


@FUZZ
@given(st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*", b"II+\x00",
                        b"RIFF\x00\x00\x00\x00WEBP"]),
       st.binary(max_size=512))
def test_valid_magic_with_garbage_body(magic, rest):
    decode_or_image_error(magic + rest)


@FUZZ
@given(mutated())
def test_mutated_valid_images(data):
    decode_or_image_error(data)


@pytest.mark.parametrize("name", SEED_NAMES)
def test_every_truncation_point_of_each_seed(name):
    """Truncated at ~40 points from 0 bytes to one byte short: error or (rarely) an image."""
    data = SEEDS[name]
    step = max(1, len(data) // 40)
    for cut in list(range(0, len(data), step)) + [len(data) - 1]:
        decode_or_image_error(data[:cut], f"{name}-{cut}")


@pytest.mark.parametrize("name", sorted(hostile_headers()))
def test_lying_headers_are_refused_without_decoding(name):
    """Huge declared sizes -> 413 from the header alone; zero/negative -> 400; all fast."""
    import time

    t0 = time.perf_counter()
    out = decode_or_image_error(hostile_headers()[name], name)
    assert isinstance(out, ImageError), f"{name} decoded to {out.size}"
    assert time.perf_counter() - t0 < 1.0  # a header read, not a 10-gigapixel decode
    if "zero" in name:
        assert out.status in (400, 415)
    elif any(k in name for k in ("100k", "16m", "20k", "65k", "max", "wide", "huge", "min", "neg")):
        assert out.status in (400, 413), (name, out.status, str(out))


@FUZZ
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_png_any_declared_size(width, height):
    out = decode_or_image_error(png_declaring(width, height))
    if isinstance(out, ImageError) and 0 < width <= 16384 and 0 < height <= 16384 \
            and width * height <= LIMITS["max_pixels"]:
        assert out.status == 400  # within limits: only the (tiny) pixel data is wrong


@FUZZ
@given(st.integers(1, 64), st.integers(1, 64), st.integers(1, 64 * 64))
def test_tight_limits_hold_for_every_accepted_format(w, h, max_pixels):
    """Whatever the limits, an image over them is 413 and one within them decodes."""
    from robust_util import encode, pattern

    for fmt in ("PNG", "BMP", "TIFF"):
        data = encode(Image.fromarray(pattern(w, h)), fmt)
        out = decode_or_image_error(data, "x", max_pixels=max_pixels, max_side=48)
        if w > 48 or h > 48 or w * h > max_pixels:
            assert isinstance(out, ImageError) and out.status == 413
        else:
            assert not isinstance(out, ImageError) and out.size == (w, h)


def test_tiff_with_many_ifds_and_bad_offsets():
    """A TIFF whose IFD offset points past the end, or into a loop, is a 400."""
    for blob in (b"II*\x00" + struct.pack("<I", 0xFFFFFFF0),
                 b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 0) + struct.pack("<I", 8),
                 b"MM\x00*" + struct.pack(">I", 4)):
        out = decode_or_image_error(blob, "loop.tif")
        assert isinstance(out, ImageError)


def test_error_messages_do_not_leak_object_reprs():
    """Regression: 'cannot identify image file <_io.BytesIO object at 0x7f...>' reached clients."""
    for name, data in hostile_headers().items():
        out = decode_or_image_error(data, name)
        assert isinstance(out, ImageError) and " at 0x" not in str(out), str(out)


@FUZZ
@given(mutated(), st.integers(1, 16), st.sampled_from([None, 0, 4, 9]))
def test_the_sized_decode_of_mutated_images_is_as_strict(data, model_size, view_max_side):
    """The scaled-decode and overlay paths (draft, second decode, reduce) on hostile bytes:
    a Decoded whose sizes agree, or ImageError with a 4xx; a tiny model size makes the seeds
    large enough to be DCT-reduced."""
    options = DecodeOptions(**LIMITS, model_size=model_size, view_max_side=view_max_side)
    try:
        out = decode_sized(data, "fuzz.jpg", options)
    except ImageError as e:
        assert e.status in (400, 413, 415), e.status
        return
    assert out.image.mode == "RGB" and 0 < out.image.width <= out.width and 0 < out.image.height <= out.height
    if view_max_side is not None:
        assert out.view is not None and out.view.size == view_size(out.width, out.height, view_max_side)
