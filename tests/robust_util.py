"""Shared pieces of the robustness suites (fuzz, faults, load smoke, security audit).

Seeds of every accepted format, hand-crafted hostile headers (huge and zero declared sizes),
the error-envelope check, and a helper that starts the real server (`dapo serve`) as a
subprocess on a free 127.0.0.1 port.
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

ERROR_STATUSES = {400, 401, 413, 415, 422}


# --- images -------------------------------------------------------------------------------
def pattern(w: int = 32, h: int = 24) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x * 7 + y * 3) % 256],
                    axis=-1).astype(np.uint8)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_bytes(w: int = 32, h: int = 24) -> bytes:
    return encode(Image.fromarray(pattern(w, h)), "PNG")


def seed_images() -> dict[str, bytes]:
    """Small valid files of every accepted format (and a few pixel layouts)."""
    rgb = Image.fromarray(pattern())
    gray16 = Image.fromarray((np.arange(24 * 32).reshape(24, 32) * 80).astype(np.uint16))
    return {
        "jpeg": encode(rgb, "JPEG", quality=85),
        "jpeg_progressive": encode(rgb, "JPEG", quality=85, progressive=True),
        "png": encode(rgb, "PNG"),
        "png_palette": encode(rgb.quantize(16), "PNG"),
        "png16": encode(gray16, "PNG"),
        "bmp": encode(rgb, "BMP"),
        "tiff": encode(rgb, "TIFF"),
        "tiff_lzw": encode(rgb, "TIFF", compression="tiff_lzw"),
        "tiff16": encode(gray16, "TIFF"),
        "webp": encode(rgb, "WEBP", lossless=True),
        "webp_lossy": encode(rgb, "WEBP", quality=50),
    }


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int, rows: bytes = b"\x00" * 16) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))


def bmp_declaring(width: int, height: int, bpp: int = 24) -> bytes:
    """A BITMAPINFOHEADER BMP whose header claims width x height (pixel data: a few bytes)."""
    pixels = b"\x00" * 64
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bpp, 0, len(pixels), 2835, 2835, 0, 0)
    header = struct.pack("<2sIHHI", b"BM", 14 + len(info) + len(pixels), 0, 0, 14 + len(info))
    return header + info + pixels


def tiff_declaring(width: int, height: int) -> bytes:
    """A little-endian baseline TIFF (8-bit gray, uncompressed) claiming width x height."""
    entries = [  # tag, type, count, value
        (256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
        (273, 4, 1, 8 + 2 + 12 * 9 + 4), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, 16),
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        packed = struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, typ, count) + packed
    ifd += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 16


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real small JPEG with its SOF0 frame size rewritten (JPEG caps sides at 65535)."""
    data = bytearray(encode(Image.fromarray(pattern()), "JPEG", quality=80))
    i = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, i + 5, height, width)
    return bytes(data)


def webp_declaring(width: int, height: int) -> bytes:
    """A VP8X WebP header claiming a width x height canvas (max 16777216 per side)."""
    vp8x = bytes([0x10, 0, 0, 0]) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
    return b"RIFF" + struct.pack("<I", len(body)) + body


def hostile_headers() -> dict[str, bytes]:
    """Files whose headers lie about their size: huge, zero, negative."""
    return {
        "png_100k.png": png_declaring(100_000, 100_000),
        "png_wide.png": png_declaring(2**31 - 1, 1),
        "png_zero.png": png_declaring(0, 0),
        "png_zero_w.png": png_declaring(0, 10),
        "bmp_100k.bmp": bmp_declaring(100_000, 100_000),
        "bmp_neg.bmp": bmp_declaring(100_000, -100_000),
        "bmp_min.bmp": bmp_declaring(-(2**31), -(2**31)),
        "bmp_zero.bmp": bmp_declaring(0, 0),
        "bmp_32bpp_huge.bmp": bmp_declaring(40_000, 40_000, 32),
        "tiff_100k.tif": tiff_declaring(100_000, 100_000),
        "tiff_zero.tif": tiff_declaring(0, 0),
        "tiff_max.tif": tiff_declaring(2**32 - 1, 2**32 - 1),
        "jpeg_65k.jpg": jpeg_declaring(65_535, 65_535),
        "jpeg_zero.jpg": jpeg_declaring(0, 0),
        "webp_16m.webp": webp_declaring(16_777_216, 16_777_216),
        "webp_20k.webp": webp_declaring(20_000, 20_000),
    }


# --- responses ----------------------------------------------------------------------------
def assert_envelope(response, allowed: set[int] | None = None) -> dict:
    """A JSON error per API.md: {"error": {"code", "message", "request_id"}}, 4xx (never 5xx)."""
    allowed = allowed or ERROR_STATUSES
    assert response.status_code in allowed, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"code", "message", "request_id"}, err
    assert isinstance(err["code"], str) and err["code"] and isinstance(err["message"], str)
    assert err["request_id"] == response.headers["x-request-id"]
    return err


def assert_ok_or_client_error(response) -> None:
    """200 (the mutation left a valid image) or a proper 4xx envelope; anything else fails."""
    if response.status_code == 200:
        assert response.json()["results"], response.text[:300]
        return
    assert_envelope(response)


# --- a real server: the shared loopback launcher ------------------------------------------
from service.server.local_server import Server, free_port, rss_kib  # noqa: E402,F401

