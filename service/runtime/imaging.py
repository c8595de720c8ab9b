"""Image decoding and preprocessing: uploaded bytes -> 8-bit RGB -> the encoder's input tensor.

Decoding is where untrusted bytes meet a C library, so it is strict and fails early:

* the format is sniffed from the magic bytes (never from the filename or Content-Type) and only
  JPEG, PNG, BMP, TIFF and WebP are opened (415 otherwise); Pillow is told to try only the
  sniffed format, so no other plugin ever parses the bytes;
* width, height and pixel count are checked from the header, before any pixel is decoded
  (413), so a decompression bomb costs a header read. Pillow's own guard
  (`Image.MAX_IMAGE_PIXELS`, warning above it, `DecompressionBombError` above twice it) is left
  as it is process-wide and `training/` shares this module; our limit is checked first, and if
  an operator raises it above Pillow's, Pillow's error is mapped to the same 413;
* truncated or corrupt data raises 400 (Pillow's LOAD_TRUNCATED_IMAGES stays False).

Every error names the file, since one request may carry many.

Conversion to 8-bit RGB (what CLIP was trained on):
* EXIF orientation is applied first (`ImageOps.exif_transpose`), so maps and boxes are in the
  image as a person sees it;
* 16-bit gray ("I;16*") and 32-bit integer ("I", treated as 16-bit data, the only way PNG/TIFF
  produce it) are scaled by 255/65535 and rounded, not clipped: a 12- or 16-bit camera frame
  keeps its full tonal range;
* alpha (RGBA, LA, PA, transparent palettes) is composited on black, i.e. RGB * alpha: fully
  transparent pixels carry no surface to inspect and whatever colour an editor left under them
  is arbitrary; black is deterministic and is what zero padding looks like to the model. For the
  common case of opaque alpha this is identical to dropping it;
* gray, palette, CMYK, YCbCr, 1-bit go through Pillow's standard conversions.

Decoding only as much as the request needs (`decode_sized`): the model sees an S x S image, so
a 5-20 MP JPEG does not have to be decoded at full resolution first. libjpeg can decode
straight at 1/2, 1/4 or 1/8 scale in the DCT domain (Pillow's `Image.draft`), which skips most
of the IDCT, upsampling and colour-conversion work and the full-size resize that follows. The
scale is the largest that keeps at least `SCALED_DECODE_MIN_RATIO` x S pixels on both sides, so
the bicubic resize to S that follows still averages several decoded pixels per output pixel.
Why 1.75 and not 1 (which is merely "still at least the model's size"): measured on photo-like
5 and 20 MP JPEGs, the model input moves from a full decode by a mean 0.15-0.4 and at most
~5 grey levels (of 255) at ratios >= 1.75, but by a mean 0.8-1.8 and up to 18 as the ratio
nears 1, where the DCT reduction becomes the only low-pass filter (`bench/decode_scale.py`).
JPEGs whose short side is under 2 x 1.75 x S, and all non-JPEG formats, decode exactly as
before.

An overlay is drawn at its view size (the original divided by a power of two, see
`view_size`): reduced from the model's decode when that holds its pixels, else from a decode
of its own (straight from libjpeg for JPEGs), so the model's input never depends on whether an
overlay was asked for; full resolution is decoded only for a full-size overlay.

Measured against simplejpeg and PyTurboJPEG (the maintained libjpeg-turbo bindings), Pillow's
draft decodes the same pixels (within 2 grey levels) in at most ~10 % more time, with no second
decoder to harden against hostile bytes and no system library to match (PyTurboJPEG 2 needs
libjpeg-turbo 3, which Debian 12 does not ship); figures in docs/benchmarks.md.

Training and evaluation read images through `load` as well (`training.data.common`), so the
tensors the model is trained and calibrated on come from the same decode as those it serves.
"""
from __future__ import annotations

import functools
import io
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ACCEPTED_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")
# A DCT-scaled JPEG decode must keep at least this many times the model's side on both sides
# (why 1.75: the module docstring).
SCALED_DECODE_MIN_RATIO = 1.75


class ImageError(ValueError):
    """An upload that cannot be used; `status` and `code` say how the API reports it."""

    def __init__(self, filename: str, message: str, status: int = 400, code: str = "invalid_image"):
        super().__init__(f"{filename}: {message}")
        self.filename = filename
        self.status = status
        self.code = code


EXIF_ORIENTATION = 0x0112


def sniff_format(data: bytes) -> str | None:
    """The Pillow format name from the file's magic bytes, or None if not an accepted one."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # classic and BigTIFF
        return "TIFF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def check_size(filename: str, width: int, height: int, max_pixels: int, max_side: int) -> None:
    """Refuse images over the limits (413) using header dimensions only."""
    if width <= 0 or height <= 0:
        raise ImageError(filename, f"invalid dimensions {width}x{height}")
    if width > max_side or height > max_side:
        raise ImageError(filename, f"{width}x{height} exceeds the maximum side of {max_side} px",
                         413, "image_too_large")
    if width * height > max_pixels:
        raise ImageError(filename, f"{width}x{height} = {width * height} pixels exceeds the limit of "
                         f"{max_pixels}", 413, "image_too_large")


def open_checked(data: bytes, filename: str, max_pixels: int, max_side: int) -> Image.Image:
    """Open lazily (header only), verify the format and the size; pixels not yet decoded."""
    if not data:
        raise ImageError(filename, "empty file")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError(filename, f"unsupported image type; accepted: {', '.join(ACCEPTED_FORMATS)}",
                         415, "unsupported_media_type")
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as e:
        raise ImageError(filename, f"image too large ({e})", 413, "image_too_large") from e
    except UnidentifiedImageError as e:  # Pillow's message only names the BytesIO object
        raise ImageError(filename, f"cannot read {fmt} header: not a valid {fmt} file") from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise ImageError(filename, f"cannot read {fmt} header: {e}") from e
    except Exception as e:  # hostile headers must never become a 500
        raise ImageError(filename, f"cannot read {fmt} header: {type(e).__name__}: {e}") from e
    check_size(filename, img.width, img.height, max_pixels, max_side)
    return img


def _scale_16bit(img: Image.Image) -> Image.Image:
    """16-bit (or 32-bit int) gray -> 8-bit L, scaled by 255/65535 and rounded."""
    arr = np.asarray(img)
    if img.mode == "I":
        arr = np.clip(arr, 0, 65535)
    scaled = np.rint(arr.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)
    return Image.fromarray(scaled)


def _composite_on_black(img: Image.Image) -> Image.Image:
    """RGBA -> RGB as RGB * alpha (see the module docstring for why black)."""
    rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
    rgb = (rgba[..., :3] * rgba[..., 3:4] + 127) // 255
    return Image.fromarray(rgb.astype(np.uint8))


def to_rgb8(img: Image.Image, filename: str = "image") -> Image.Image:
    """Any decoded Pillow mode we accept -> 8-bit RGB (rules in the module docstring)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        return _scale_16bit(img).convert("RGB")
    if mode == "F":
        raise ImageError(filename, "32-bit float images are not supported (8- or 16-bit only)",
                         415, "unsupported_media_type")
    if mode == "P":
        has_alpha = "transparency" in img.info or (img.palette is not None and img.palette.mode == "RGBA")
        return _composite_on_black(img) if has_alpha else img.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        if mode == "La":
            img = img.convert("LA")
        return _composite_on_black(img)
    try:
        return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    except (ValueError, OSError) as e:
        raise ImageError(filename, f"unsupported pixel mode {mode}", 415, "unsupported_media_type") from e


def reduce_on_decode(img: Image.Image, min_side: int) -> int:
    """Ask libjpeg for the largest DCT scale (1/2, 1/4, 1/8) keeping >= min_side px per side.

    Call on an opened, not yet loaded image; a no-op (returns 1) for other formats, for images
    too small to reduce, and for min_side <= 0. Returns the scale denominator chosen.
    """
    if img.format != "JPEG" or min_side <= 0 or min(img.size) < 2 * min_side:
        return 1
    img.draft(None, (min_side, min_side))  # Pillow keeps the size >= the request on both sides
    config = getattr(img, "decoderconfig", ())  # Pillow's JPEG draft records (scale, fast-DCT flag)
    return int(config[0]) if config else 1


def model_side(model_size: int) -> int:
    """The smallest side a scaled decode may leave for an encoder of input side model_size
    (0 = no scaled decode)."""
    return math.ceil(SCALED_DECODE_MIN_RATIO * model_size) if model_size > 0 else 0


def tiled_min_side(width: int, height: int, model_size: int, tile: int) -> int:
    """`model_side` for a tiled product: the smallest side a scaled decode of a width x height
    image may leave so that each tile (`tile` original px, clipped to the image) still has
    model_side(model_size) decoded pixels, i.e. the tiles reach the encoder at the quality an
    untiled image does. A tile covering the whole image gives exactly model_side(model_size)."""
    short = min(width, height)
    return math.ceil(model_side(model_size) * short / min(tile, short)) if model_size > 0 else 0


@dataclass
class _Loaded:
    image: Image.Image  # 8-bit RGB, oriented when asked
    swapped: bool  # the orientation swapped width and height
    dct_scale: int  # 1, 2, 4 or 8: the JPEG was decoded at 1/dct_scale


def _load(img: Image.Image, filename: str, min_side: int, orient: bool) -> _Loaded:
    """`load`, also saying how it decoded (the DCT scale) and whether orientation swapped sides."""
    swapped = False
    try:
        scale = reduce_on_decode(img, min_side)
        img.load()
        orientation = img.getexif().get(EXIF_ORIENTATION, 1) if orient else 1
        if orientation != 1:  # transpose copies: only when needed
            img = ImageOps.exif_transpose(img)
            swapped = orientation in (5, 6, 7, 8)  # exif_transpose's transpose / rotate 90 / 270
    except Image.DecompressionBombError as e:
        raise ImageError(filename, f"image too large ({e})", 413, "image_too_large") from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise ImageError(filename, f"corrupt or truncated {img.format} data: {e}") from e
    except Exception as e:  # any other plugin failure on hostile bytes is still bad input, not a 500
        raise ImageError(filename, f"cannot decode {img.format} data: {type(e).__name__}: {e}") from e
    return _Loaded(to_rgb8(img, filename), swapped, scale)


def load(img: Image.Image, filename: str, min_side: int = 0, orient: bool = True) -> Image.Image:
    """Decode an opened image to 8-bit RGB: DCT-reduced to >= min_side px per side when it is a
    JPEG large enough (0 = full resolution), EXIF-oriented when `orient` (the service; data-set
    masks are drawn on the stored pixel grid, so training passes False). ImageError on failure."""
    return _load(img, filename, min_side, orient).image


def decode(data: bytes, filename: str, max_pixels: int, max_side: int) -> Image.Image:
    """Bytes -> oriented 8-bit RGB image at full resolution, or ImageError (400/413/415)."""
    # Orientation may swap width and height; the limits are symmetric, the area unchanged.
    return load(open_checked(data, filename, max_pixels, max_side), filename)


@dataclass(frozen=True)
class DecodeOptions:
    """How one upload is decoded: the limits, and what the request will do with the pixels."""

    max_pixels: int
    max_side: int
    model_size: int = 0  # the encoder's input side S; 0 = always decode at full resolution
    view_max_side: int | None = None  # an overlay is drawn, at most this long (0 = original size)
    tile: int = 0  # a tiled product's tile side in original px (tiled_min_side); 0 = untiled


@dataclass
class Decoded:
    """One upload decoded for the model, and for an overlay when one is asked for."""

    image: Image.Image  # oriented 8-bit RGB, possibly DCT-reduced: what preprocess() resizes to S
    width: int  # the original (oriented) size: every answer is given at this size
    height: int
    view: Image.Image | None = None  # oriented RGB at view_size(width, height, view_max_side)


def view_scale(width: int, height: int, max_side: int) -> int:
    """The smallest power of two that brings the longer side to at most max_side (0 = 1)."""
    scale = 1
    while max_side > 0 and -(-max(width, height) // scale) > max_side:
        scale *= 2
    return scale


def view_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size of a heatmap/overlay: the original divided by view_scale, rounded up (what libjpeg's
    DCT scaling and Pillow's reduce() produce). Power-of-two steps rather than an exact size:
    a JPEG decodes straight to it at 1/2, 1/4 or 1/8 scale, with no resize after, and every
    view pixel covers a whole s x s block of the original."""
    scale = view_scale(width, height, max_side)
    return -(-width // scale), -(-height // scale)


def view_of(img: Image.Image, max_side: int) -> Image.Image:
    """An already decoded (full-size, oriented) image at its view size: box reduce() by view_scale."""
    scale = view_scale(img.width, img.height, max_side)
    return img.reduce(scale) if scale > 1 else img


def decode_sized(data: bytes, filename: str, options: DecodeOptions) -> Decoded:
    """Bytes -> the pixels this request needs: a reduced decode for the model, and a second
    decode for an overlay only when it needs other pixels than the model's decode has."""
    img = open_checked(data, filename, options.max_pixels, options.max_side)
    stored = img.size
    min_side = tiled_min_side(*stored, options.model_size, options.tile) if options.tile else model_side(options.model_size)
    loaded = _load(img, filename, min_side, orient=True)
    width, height = stored[::-1] if loaded.swapped else stored
    view = None
    if options.view_max_side is not None:
        scale = view_scale(width, height, options.view_max_side)
        if scale % loaded.dct_scale == 0:  # the model's decode holds the view's pixels (e.g. S=518)
            rest = scale // loaded.dct_scale
            view = loaded.image.reduce(rest) if rest > 1 else loaded.image
        else:  # the model's decode is smaller than the view: a second decode
            view = _view(data, filename, options, scale)
    return Decoded(loaded.image, width, height, view)


def _view(data: bytes, filename: str, options: DecodeOptions, scale: int) -> Image.Image:
    """The upload reduced by `scale` (a power of two): DCT-scaled as far as libjpeg goes (1/8),
    the rest by Pillow's box reduce(); non-JPEG images decode in full, then reduce()."""
    img = open_checked(data, filename, options.max_pixels, options.max_side)
    dct = min(scale, 8)
    loaded = _load(img, filename, min(img.size) // dct if dct > 1 else 0, orient=True)
    rest = scale // loaded.dct_scale
    return loaded.image.reduce(rest) if rest > 1 else loaded.image


def preprocess(img: Image.Image, size: int, mean: Sequence[float], std: Sequence[float],
               box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """RGB image -> (3, size, size) float32, CLIP-normalised; a pure function shared with training.

    Bicubic resize straight to size x size (aspect ratio not kept): the anomaly map is resized
    back to the original W x H, so every original pixel maps to one place and nothing is
    cropped away, which for inspection matters more than undistorted proportions.

    `box` (left, upper, right, lower, in the image's pixels, fractions allowed): resize only that
    region (a tile), read in place by Pillow's resampler, never cropped into a copy first; the
    whole image's box gives exactly the result without one.
    """
    if img.mode != "RGB":
        raise ValueError(f"preprocess expects an RGB image, got mode {img.mode}")
    if box is not None and box[2] - box[0] == size and box[3] - box[1] == size and all(float(v).is_integer() for v in box):
        resized = img.crop(tuple(int(v) for v in box))  # a native-resolution tile: the resampler would copy it
    else:
        resized = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
    return normalise(np.asarray(resized), tuple(mean), tuple(std))


@functools.lru_cache(maxsize=16)
def _normalise_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: channel c's CLIP-normalised value of each 8-bit level, computed with the
    very float32 operations a per-pixel (v / 255 - mean) / std performs, so looking it up gives
    the same bits as computing it."""
    levels = np.arange(256, dtype=np.float32)[:, None] / np.float32(255.0)
    table = (levels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(table.T, dtype=np.float32)


def normalise(rgb: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32, (v / 255 - mean) / std per channel: three table
    look-ups instead of four float passes and a transpose (a tiled image normalises many
    tiles; measured 1.5x less thread CPU on a 518 x 518 image, 2-core AVX2; same bits)."""
    table = _normalise_table(mean, std)
    out = np.empty((3, *rgb.shape[:2]), dtype=np.float32)
    for c in range(3):
        np.take(table[c], rgb[..., c], out=out[c])
    return out
