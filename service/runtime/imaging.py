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
"""
from __future__ import annotations

import io
import struct
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ACCEPTED_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")


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


def decode(data: bytes, filename: str, max_pixels: int, max_side: int) -> Image.Image:
    """Bytes -> oriented 8-bit RGB image, or ImageError (400/413/415) naming the file."""
    img = open_checked(data, filename, max_pixels, max_side)
    try:
        img.load()
        if img.getexif().get(EXIF_ORIENTATION, 1) != 1:  # transpose copies: only when needed
            img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as e:
        raise ImageError(filename, f"image too large ({e})", 413, "image_too_large") from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise ImageError(filename, f"corrupt or truncated {img.format} data: {e}") from e
    except Exception as e:  # any other plugin failure on hostile bytes is still bad input, not a 500
        raise ImageError(filename, f"cannot decode {img.format} data: {type(e).__name__}: {e}") from e
    # Orientation may swap width and height; the limits are symmetric, the area unchanged.
    return to_rgb8(img, filename)



def preprocess(img: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """RGB image -> (3, size, size) float32, CLIP-normalised; a pure function shared with training.

    Bicubic resize straight to size x size (aspect ratio not kept): the anomaly map is resized
    back to the original W x H, so every original pixel maps to one place and nothing is
    cropped away, which for inspection matters more than undistorted proportions.
    """
    if img.mode != "RGB":
        raise ValueError(f"preprocess expects an RGB image, got mode {img.mode}")
    resized = img.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(resized, dtype=np.float32) / np.float32(255.0)
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)
