"""A seeded synthetic defect data set, written in the custom folder layout (`dapo synth`).

    <out>/<product>/good/000.png
    <out>/<product>/<defect>/000.png
    <out>/<product>/ground_truth/<defect>/000_mask.png     (0 / 255, same size as the image)
    <out>/splits.json

Products: texture families (wood, carpet, metal, fabric, leather, stone, tile, and
"procedural": a new random texture in every image) and simple parts (disc, plate, bolt).
Defects, each with an exact mask: scratch, hole, crack, contamination, bent, discoloration,
missing; sizes from a few pixels to about a fifth of the image area.

Splits (``splits.json``) for the two claims the method makes:
- ``train``:         every product but the held-out one, every defect but the held-out one,
                     the first half of their good images;
- ``test_shift``:    the held-out product (a texture family never seen in training) with the
                     training defects and all its good images (distribution shift);
- ``test_zeroshot``: the training products with the held-out defect word only, plus the second
                     half of their good images (a defect type never seen: zero-shot).

Camera-sized images with small defects (tiled inspection, docs/tiling.md): ``--size 2236``
(5 MP), ``--defect-scale 0.002,0.005`` (defect sizes as fractions of the image side, drawn
log-uniformly; default 0.03,0.5) and ``--defects-per-image 3`` (several defects of the image's
type, one mask).

Deterministic by seed: each image has its own generator seeded by (seed, product, class,
index), so a product's images do not depend on which other products are generated. numpy + PIL.
"""
from __future__ import annotations

import argparse
import json
import shutil
import zlib
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

TEXTURES = ("wood", "carpet", "metal", "fabric", "leather", "stone", "tile", "procedural")
PARTS = ("disc", "plate", "bolt")
PRODUCTS = TEXTURES + PARTS
DEFECTS = ("scratch", "hole", "crack", "contamination", "bent", "discoloration", "missing")
DEFAULT_HOLDOUT_PRODUCT = "leather"
DEFAULT_HOLDOUT_DEFECT = "crack"
DEFAULT_DEFECT_SCALE = (0.03, 0.5)  # defect size as a fraction of the image side (log-uniform)
SPLITS_FILE = "splits.json"
MIN_DEFECT_PIXELS = 4

Array = np.ndarray


# --------------------------------------------------------------------------- helpers

def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    ent = [int(seed) & 0xFFFFFFFF] + [
        zlib.crc32(k.encode()) if isinstance(k, str) else int(k) & 0xFFFFFFFF for k in keys
    ]
    return np.random.default_rng(np.random.SeedSequence(ent))


def _blur(a: Array, sigma: float) -> Array:
    """Gaussian blur of a 2-D array (periodic borders) through the FFT."""
    if sigma <= 0:
        return a
    h, w = a.shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    g = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))
    return np.fft.irfft2(np.fft.rfft2(a) * g, s=(h, w))


def _norm01(a: Array) -> Array:
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _colorize(v: Array, dark: Sequence[float], light: Sequence[float]) -> Array:
    v = np.clip(v, 0, 1)[..., None]
    return np.asarray(dark, np.float32) * (1 - v) + np.asarray(light, np.float32) * v


def _jitter(rng, color: Sequence[float], amount: float = 0.06) -> np.ndarray:
    return np.clip(np.asarray(color) + rng.uniform(-amount, amount, 3), 0, 1)


def _draw_mask(size: int, draw: Callable[[ImageDraw.ImageDraw], None]) -> Array:
    m = Image.new("L", (size, size), 0)
    draw(ImageDraw.Draw(m))
    return np.asarray(m) > 127


def _paint(img: Array, mask: Array, color, alpha: float = 1.0) -> Array:
    out = img.copy()
    out[mask] = out[mask] * (1 - alpha) + np.asarray(color, np.float32) * alpha
    return out


# --------------------------------------------------------------------------- products
# each returns (image float32 (S,S,3) in [0,1], object mask bool (S,S), background colour)

def _grid(S: int):
    y, x = np.mgrid[0:S, 0:S].astype(np.float32)
    return y, x


def _wood(rng, S):
    y, x = _grid(S)
    freq = rng.uniform(0.10, 0.18) * 128 / S
    warp = 6 * _blur(rng.standard_normal((S, S)), S / 10) * S / 10
    rings = np.sin(freq * (x + warp + rng.uniform(0, 100)) + 0.15 * np.sin(y * 0.05))
    grain = _blur(rng.standard_normal((S, S)), 0.7) * 0.08
    v = 0.5 + 0.35 * rings + grain
    img = _colorize(v, _jitter(rng, (0.40, 0.24, 0.12)), _jitter(rng, (0.78, 0.58, 0.36)))
    return img, np.ones((S, S), bool), None


def _carpet(rng, S):
    n = _blur(rng.standard_normal((S, S)), 1.0)
    n2 = _blur(rng.standard_normal((S, S)), 3.0)
    v = 0.5 + 0.9 * n + 1.2 * n2
    img = _colorize(_norm01(v), _jitter(rng, (0.18, 0.22, 0.35)), _jitter(rng, (0.45, 0.52, 0.72)))
    return img, np.ones((S, S), bool), None


def _metal(rng, S):
    rows = rng.standard_normal((S, 1)) * 0.5 + rng.standard_normal((S, S)) * 0.35
    streaks = _blur(np.repeat(rows, 1, axis=1), 0.6)
    # brushed: smooth strongly along x only
    k = np.exp(-0.5 * (np.arange(-12, 13) / 6.0) ** 2)
    k /= k.sum()
    brushed = np.stack([np.convolve(np.r_[r[-12:], r, r[:12]], k, mode="valid") for r in streaks])
    y, _ = _grid(S)
    shade = 0.15 * np.sin(y / S * np.pi * rng.uniform(0.5, 1.5) + rng.uniform(0, 3))
    v = 0.55 + 0.25 * brushed + shade
    img = _colorize(v, _jitter(rng, (0.30, 0.32, 0.35), 0.03), _jitter(rng, (0.85, 0.87, 0.90), 0.03))
    return img, np.ones((S, S), bool), None


def _fabric(rng, S):
    y, x = _grid(S)
    period = rng.uniform(5.0, 8.0) * S / 128
    ph = rng.uniform(0, 2 * np.pi, 2)
    warp = np.sin(2 * np.pi * x / period + ph[0])
    weft = np.sin(2 * np.pi * y / period + ph[1])
    checker = np.sign(np.sin(np.pi * x / period + ph[0]) * np.sin(np.pi * y / period + ph[1]))
    v = 0.5 + 0.22 * np.where(checker > 0, warp, weft) + 0.05 * rng.standard_normal((S, S))
    img = _colorize(v, _jitter(rng, (0.20, 0.35, 0.22)), _jitter(rng, (0.55, 0.75, 0.55)))
    return img, np.ones((S, S), bool), None


def _leather(rng, S):
    cells = _blur(rng.standard_normal((S, S)), 1.5)
    pores = (rng.random((S, S)) < 0.02).astype(np.float32)
    folds = _blur(rng.standard_normal((S, S)), S / 16)
    v = 0.55 + 0.6 * np.abs(cells) * 0.5 - 0.35 * _blur(pores, 0.8) + 0.5 * folds
    img = _colorize(np.clip(v, 0, 1), _jitter(rng, (0.35, 0.20, 0.12)), _jitter(rng, (0.70, 0.50, 0.35)))
    return img, np.ones((S, S), bool), None


def _stone(rng, S):
    """Polished stone: fine mineral grain over cloudy veins, grey to beige."""
    grain = _blur(rng.standard_normal((S, S)), 0.8)
    cloud = _blur(rng.standard_normal((S, S)), S / 12)
    flecks = _blur((rng.random((S, S)) < 0.015).astype(np.float32), 0.6)
    v = 0.55 + 0.35 * grain + 2.0 * cloud * S / 64 + 0.8 * flecks * rng.choice([-1.0, 1.0])
    img = _colorize(np.clip(v, 0, 1), _jitter(rng, (0.32, 0.31, 0.29)), _jitter(rng, (0.80, 0.77, 0.70)))
    return img, np.ones((S, S), bool), None


def _tile(rng, S):
    """Glazed tiles: a grout grid, each tile its own shade with a soft gloss."""
    y, x = _grid(S)
    period = S / rng.integers(3, 5)
    off = rng.uniform(0, period, 2)
    tx, ty = np.floor((x + off[0]) / period), np.floor((y + off[1]) / period)
    shade = _rng(int(rng.integers(1 << 30)), "tile").uniform(-0.08, 0.08, (16, 16))[ty.astype(int) % 16, tx.astype(int) % 16]
    fx, fy = ((x + off[0]) % period) / period, ((y + off[1]) % period) / period
    gloss = 0.10 * np.exp(-((fx - 0.3) ** 2 + (fy - 0.3) ** 2) / 0.08)
    grout = (np.minimum(fx, 1 - fx) * period < 1.2) | (np.minimum(fy, 1 - fy) * period < 1.2)
    v = np.where(grout, 0.25, 0.65 + shade + gloss) + 0.015 * rng.standard_normal((S, S))
    img = _colorize(v, _jitter(rng, (0.15, 0.18, 0.22)), _jitter(rng, (0.85, 0.88, 0.90)))
    return img, np.ones((S, S), bool), None


def _procedural(rng, S):
    """A different random texture in every image (domain randomisation): grain, cloud, stripes
    and weave mixed with random weights, scales, angle and colours. Trained on, it teaches that
    texture alone is not a defect, which is what lets a held-out texture family be inspected."""
    y, x = _grid(S)
    w = rng.dirichlet(np.ones(4)) * rng.uniform(0.6, 1.4)
    grain = _blur(rng.standard_normal((S, S)), rng.uniform(0.5, 2.0))
    cloud = _blur(rng.standard_normal((S, S)), rng.uniform(S / 32, S / 8)) * S / 16
    ang = rng.uniform(0, np.pi)
    period = rng.uniform(4, 24) * S / 128
    u = x * np.cos(ang) + y * np.sin(ang)
    stripes = np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
    weave = np.sign(np.sin(np.pi * x / period) * np.sin(np.pi * y / period)) * 0.5
    v = 0.5 + 0.25 * (w[0] * grain / (grain.std() + 1e-6) + w[1] * cloud / (cloud.std() + 1e-6)
                      + w[2] * stripes + w[3] * weave)
    dark, light = rng.uniform(0.05, 0.5, 3), rng.uniform(0.5, 0.95, 3)
    return _colorize(np.clip(v, 0, 1), dark, light), np.ones((S, S), bool), None


def _background(rng, S):
    bg = _jitter(rng, (0.08, 0.08, 0.10), 0.03)
    noise = _blur(rng.standard_normal((S, S)), 2.0)[..., None] * 0.02
    return np.clip(np.broadcast_to(bg, (S, S, 3)) + noise, 0, 1).astype(np.float32), bg


def _disc(rng, S):
    img, bg = _background(rng, S)
    c = S / 2 + rng.uniform(-0.04, 0.04, 2) * S
    r = S * rng.uniform(0.36, 0.42)
    hole = r * rng.uniform(0.25, 0.35)
    outer = _draw_mask(S, lambda d: d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=255))
    inner = _draw_mask(S, lambda d: d.ellipse([c[0] - hole, c[1] - hole, c[0] + hole, c[1] + hole], fill=255))
    obj = outer & ~inner
    y, x = _grid(S)
    ang = np.arctan2(y - c[1], x - c[0])
    shade = 0.7 + 0.12 * np.cos(ang * 2 + rng.uniform(0, 3)) + 0.02 * rng.standard_normal((S, S))
    metal = _colorize(shade, (0.2, 0.2, 0.22), _jitter(rng, (0.92, 0.90, 0.85), 0.04))
    img[obj] = metal[obj]
    return img, obj, bg


def _plate(rng, S):
    img, bg = _background(rng, S)
    m = S * rng.uniform(0.10, 0.14)
    box = [m, m * rng.uniform(0.9, 1.3), S - m, S - m * rng.uniform(0.9, 1.3)]
    obj = _draw_mask(S, lambda d: d.rectangle(box, fill=255))
    hr = S * rng.uniform(0.045, 0.06)
    holes = np.zeros_like(obj)
    for fx in (0.22, 0.78):
        for fy in (0.22, 0.78):
            cx = box[0] + (box[2] - box[0]) * fx
            cy = box[1] + (box[3] - box[1]) * fy
            holes |= _draw_mask(S, lambda d, cx=cx, cy=cy: d.ellipse([cx - hr, cy - hr, cx + hr, cy + hr], fill=255))
    obj &= ~holes
    y, x = _grid(S)
    v = 0.6 + 0.15 * (x / S) + 0.03 * _blur(rng.standard_normal((S, S)), 1.0)
    col = _colorize(v, (0.25, 0.27, 0.30), _jitter(rng, (0.75, 0.78, 0.82), 0.04))
    img[obj] = col[obj]
    return img, obj, bg


def _bolt(rng, S):
    img, bg = _background(rng, S)
    c = S / 2 + rng.uniform(-0.04, 0.04, 2) * S
    r = S * rng.uniform(0.34, 0.40)
    rot = rng.uniform(0, np.pi / 3)
    hexagon = [(c[0] + r * np.cos(rot + k * np.pi / 3), c[1] + r * np.sin(rot + k * np.pi / 3)) for k in range(6)]
    head = _draw_mask(S, lambda d: d.polygon(hexagon, fill=255))
    rc = r * 0.55
    washer = _draw_mask(S, lambda d: d.ellipse([c[0] - rc, c[1] - rc, c[0] + rc, c[1] + rc], fill=255))
    y, x = _grid(S)
    ang = np.arctan2(y - c[1], x - c[0])
    facet = np.floor(((ang - rot) % (2 * np.pi)) / (np.pi / 3))
    v = 0.55 + 0.08 * facet / 5 + 0.02 * rng.standard_normal((S, S))
    v = np.where(washer, 0.8 + 0.05 * np.cos(3 * ang), v)
    col = _colorize(v, (0.2, 0.2, 0.2), _jitter(rng, (0.80, 0.76, 0.60), 0.05))
    img[head] = col[head]
    return img, head, bg


PRODUCT_MAKERS: dict[str, Callable] = {
    "wood": _wood, "carpet": _carpet, "metal": _metal, "fabric": _fabric, "leather": _leather,
    "stone": _stone, "tile": _tile, "procedural": _procedural,
    "disc": _disc, "plate": _plate, "bolt": _bolt,
}


# --------------------------------------------------------------------------- defects
# each: (rng, img, obj, bg, S, scale) -> (new image, defect mask bool); scale in [0.03, 0.5]

def _point_on(rng, mask: Array, margin: int = 0) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    if margin:
        keep = (ys >= margin) & (ys < mask.shape[0] - margin) & (xs >= margin) & (xs < mask.shape[1] - margin)
        if keep.any():
            ys, xs = ys[keep], xs[keep]
    i = rng.integers(len(ys))
    return float(xs[i]), float(ys[i])


def _contrast_color(rng, img: Array, mask: Array, darker: bool | None = None) -> np.ndarray:
    mean = img[mask].mean(axis=0) if mask.any() else img.reshape(-1, 3).mean(0)
    lum = float(mean.mean())
    if darker is None:
        darker = lum > 0.45
    return np.clip(mean * (0.35 if darker else 1.0) + (0.0 if darker else 0.45), 0, 1)


def _scratch(rng, img, obj, bg, S, scale):
    x0, y0 = _point_on(rng, obj, 2)
    length = max(4.0, scale * S * 1.5)
    ang = rng.uniform(0, np.pi)
    pts = [(x0, y0), (x0 + length * np.cos(ang), y0 + length * np.sin(ang))]
    bend = rng.uniform(-0.2, 0.2)
    mid = ((pts[0][0] + pts[1][0]) / 2 + bend * length * np.sin(ang),
           (pts[0][1] + pts[1][1]) / 2 - bend * length * np.cos(ang))
    width = 1 if scale < 0.15 else (2 if scale < 0.3 else 3)
    m = _draw_mask(S, lambda d: d.line([pts[0], mid, pts[1]], fill=255, width=width)) & obj
    return _paint(img, m, _contrast_color(rng, img, obj, darker=False), 0.9), m


def _hole(rng, img, obj, bg, S, scale):
    r = max(1.5, scale * S * 0.5)
    x0, y0 = _point_on(rng, obj, int(r))
    ar = rng.uniform(0.7, 1.0)
    m = _draw_mask(S, lambda d: d.ellipse([x0 - r, y0 - r * ar, x0 + r, y0 + r * ar], fill=255)) & obj
    dark = np.clip(_jitter(rng, (0.03, 0.03, 0.03), 0.02), 0, 1)
    return _paint(img, m, dark), m


def _crack(rng, img, obj, bg, S, scale):
    x, y = _point_on(rng, obj, 2)
    steps = int(max(6, scale * S * 1.2))
    ang = rng.uniform(0, 2 * np.pi)
    pts = [(x, y)]
    for _ in range(steps):
        ang += rng.normal(0, 0.45)
        x = float(np.clip(x + 1.5 * np.cos(ang), 0, S - 1))
        y = float(np.clip(y + 1.5 * np.sin(ang), 0, S - 1))
        pts.append((x, y))
    width = 1 if scale < 0.15 else (2 if scale < 0.3 else 3)
    m = _draw_mask(S, lambda d: d.line(pts, fill=255, width=width, joint="curve")) & obj
    return _paint(img, m, _contrast_color(rng, img, obj, darker=True), 0.95), m


def _contamination(rng, img, obj, bg, S, scale):
    cx, cy = _point_on(rng, obj, 2)
    r = max(1.5, scale * S * 0.45)
    blobs = int(rng.integers(2, 6))

    def draw(d):
        for _ in range(blobs):
            ox, oy = rng.normal(0, r * 0.6, 2)
            rr = r * rng.uniform(0.4, 1.0)
            d.ellipse([cx + ox - rr, cy + oy - rr * 0.8, cx + ox + rr, cy + oy + rr * 0.8], fill=255)

    m = _draw_mask(S, draw) & obj
    hue = rng.choice(np.array([[0.85, 0.15, 0.1], [0.1, 0.7, 0.15], [0.95, 0.85, 0.1], [0.1, 0.1, 0.1]]))
    return _paint(img, m, _jitter(rng, hue, 0.05), 0.85), m


def _sample_bilinear(img: Array, sx: Array, sy: Array) -> Array:
    S = img.shape[0]
    sx = np.clip(sx, 0, S - 1.001)
    sy = np.clip(sy, 0, S - 1.001)
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    a, b = img[y0, x0], img[y0, x0 + 1]
    c, d = img[y0 + 1, x0], img[y0 + 1, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _bent(rng, img, obj, bg, S, scale):
    """A local warp (part of the shape or pattern pushed sideways). The mask is where the warp
    moved pixels by more than half a pixel AND visibly changed them."""
    if obj.all():
        cx, cy = _point_on(rng, obj, 2)
    else:  # a part: bend its outline
        edge = obj & ~np.roll(obj, 1, 0) | obj & ~np.roll(obj, -1, 0) | obj & ~np.roll(obj, 1, 1) | obj & ~np.roll(obj, -1, 1)
        cx, cy = _point_on(rng, edge if edge.any() else obj)
    sigma = max(2.0, scale * S * 0.3)
    amp = rng.uniform(0.5, 0.9) * sigma
    ang = rng.uniform(0, 2 * np.pi)
    y, x = _grid(S)
    g = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
    dx, dy = amp * g * np.cos(ang), amp * g * np.sin(ang)
    warped = _sample_bilinear(img, x - dx, y - dy)
    # a bend also catches the light: bright on one flank, dark on the other
    flank = ((x - cx) * np.cos(ang) + (y - cy) * np.sin(ang)) / sigma * g
    warped = np.clip(warped * (1 + 0.5 * flank[..., None]), 0, 1)
    new_obj = _sample_bilinear(obj.astype(np.float32)[..., None], x - dx, y - dy)[..., 0] > 0.5
    out = warped if obj.all() else np.where(new_obj[..., None], warped, img * 0 + np.asarray(bg, np.float32))
    changed = np.abs(out - img).max(axis=-1) > 0.04
    m = (np.hypot(dx, dy) > 0.5) & changed
    # keep the mask consistent with the image: pixels outside it are restored exactly
    out = np.where(m[..., None], out, img)
    return out.astype(np.float32), m


def _discoloration(rng, img, obj, bg, S, scale):
    cx, cy = _point_on(rng, obj, 2)
    r = max(2.0, scale * S * 0.6)
    y, x = _grid(S)
    blob = np.exp(-(((x - cx) / r) ** 2 + ((y - cy) / (r * rng.uniform(0.6, 1.0))) ** 2))
    blob = np.clip(blob + 0.25 * _blur(rng.standard_normal((S, S)), r / 3) * (blob > 0.2), 0, 1)
    m = (blob > 0.5) & obj
    tint = rng.choice(np.array([[1.5, 1.1, 0.5], [0.55, 0.75, 1.45], [0.5, 0.5, 0.5], [1.6, 1.6, 1.6]]))
    out = img.copy()
    out[m] = np.clip(img[m] * tint, 0, 1)
    return out, m


def _missing(rng, img, obj, bg, S, scale):
    cx, cy = _point_on(rng, obj, 2)
    r = max(2.0, scale * S * 0.6)
    n = int(rng.integers(5, 9))
    angs = np.sort(rng.uniform(0, 2 * np.pi, n))
    poly = [(cx + r * rng.uniform(0.5, 1.0) * np.cos(a), cy + r * rng.uniform(0.5, 1.0) * np.sin(a)) for a in angs]
    m = _draw_mask(S, lambda d: d.polygon(poly, fill=255)) & obj
    fill = np.asarray(bg, np.float32) if bg is not None else np.clip(_jitter(rng, (0.06, 0.05, 0.05), 0.02), 0, 1)
    return _paint(img, m, fill), m


DEFECT_MAKERS: dict[str, Callable] = {
    "scratch": _scratch, "hole": _hole, "crack": _crack, "contamination": _contamination,
    "bent": _bent, "discoloration": _discoloration, "missing": _missing,
}


# --------------------------------------------------------------------------- generation

def render(product: str, defect: str | None, seed: int, index: int, size: int = 128,
           defect_scale: tuple[float, float] = DEFAULT_DEFECT_SCALE, count: int = 1) -> tuple[Array, Array]:
    """One image (uint8 (S,S,3)) and its defect mask (bool (S,S); all False for good): `count`
    defects of the type, each of a size drawn log-uniformly within `defect_scale` x S."""
    if product not in PRODUCT_MAKERS:
        raise ValueError(f"unknown product {product!r}; known: {', '.join(PRODUCT_MAKERS)}")
    if defect is not None and defect not in DEFECT_MAKERS:
        raise ValueError(f"unknown defect {defect!r}; known: {', '.join(DEFECT_MAKERS)}")
    rng = _rng(seed, product, defect or "good", index)
    img, obj, bg = PRODUCT_MAKERS[product](rng, size)
    img = np.clip(img, 0, 1).astype(np.float32)
    mask = np.zeros((size, size), bool)
    lo, hi = defect_scale
    for _ in range(count if defect is not None else 0):
        # sizes from tiny to large: log-uniform fraction of the image side
        scale = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        for attempt in range(20):
            out, m = DEFECT_MAKERS[defect](rng, img, obj, bg, size, scale * (1 + 0.15 * attempt))
            if int(m.sum()) >= MIN_DEFECT_PIXELS:
                img, mask = out, mask | m
                break
        else:  # pragma: no cover - every maker succeeds well before this
            raise RuntimeError(f"could not place a {defect} on {product} (seed {seed}, #{index})")
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), mask


def _check_names(names: Iterable[str], known: dict, what: str) -> list[str]:
    names = list(names)
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown {what} {bad}; known: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate {what} in {names}")
    return names


def generate(
    out_dir: str | Path,
    seed: int = 0,
    n_per_class: int = 8,
    size: int = 128,
    products: Sequence[str] | None = None,
    defects: Sequence[str] | None = None,
    holdout_product: str | None = DEFAULT_HOLDOUT_PRODUCT,
    holdout_defect: str | None = DEFAULT_HOLDOUT_DEFECT,
    n_good: int | None = None,
    overwrite: bool = False,
    defect_scale: tuple[float, float] = DEFAULT_DEFECT_SCALE,
    defects_per_image: int = 1,
) -> dict:
    """Write the synthetic data set under ``out_dir`` and return the splits description (also
    written to ``out_dir/splits.json``).

    ``n_per_class`` defective images per (product, defect); ``n_good`` good images per product
    (default 2 * n_per_class; half for train, half for test_zeroshot). The held-out product /
    defect must be among ``products`` / ``defects``, or None for no such split.
    """
    out = Path(out_dir)
    products = _check_names(products if products is not None else PRODUCTS, PRODUCT_MAKERS, "products")
    defects = _check_names(defects if defects is not None else DEFECTS, DEFECT_MAKERS, "defects")
    if n_per_class < 1 or size < 16:
        raise ValueError("n_per_class must be >= 1 and size >= 16")
    if not 0 < defect_scale[0] <= defect_scale[1] <= 1 or defects_per_image < 1:
        raise ValueError(f"defect_scale must be 0 < min <= max <= 1 and defects_per_image >= 1, got "
                         f"{defect_scale}, {defects_per_image}")
    for name, pool, what in ((holdout_product, products, "holdout_product"), (holdout_defect, defects, "holdout_defect")):
        if name is not None and name not in pool:
            raise ValueError(f"{what} {name!r} is not among {pool}")
    if holdout_product is not None and len(products) < 2:
        raise ValueError("a held-out product needs at least one other product")
    if holdout_defect is not None and len(defects) < 2:
        raise ValueError("a held-out defect needs at least one other defect")
    n_good = 2 * n_per_class if n_good is None else int(n_good)
    if n_good < 2:
        raise ValueError("n_good must be >= 2")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty (pass overwrite=True / --overwrite)")
        for p in [*PRODUCTS, SPLITS_FILE]:
            q = out / p
            if q.is_dir():
                shutil.rmtree(q)
            elif q.is_file():
                q.unlink()
    out.mkdir(parents=True, exist_ok=True)

    train_products = [p for p in products if p != holdout_product]
    train_defects = [d for d in defects if d != holdout_defect]
    files: dict[str, list[str]] = {"train": [], "test_shift": [], "test_zeroshot": []}
    half = n_good // 2

    def write(product: str, defect: str | None, i: int) -> str:
        arr, mask = render(product, defect, seed, i, size, defect_scale, defects_per_image)
        cls = defect or "good"
        rel = f"{product}/{cls}/{i:03d}.png"
        (out / product / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr, "RGB").save(out / rel, compress_level=1)
        if defect is not None:
            gdir = out / product / "ground_truth" / cls
            gdir.mkdir(parents=True, exist_ok=True)
            Image.fromarray((mask * 255).astype(np.uint8), "L").save(gdir / f"{i:03d}_mask.png", compress_level=1)
        return rel

    for product in products:
        held = product == holdout_product
        for i in range(n_good):
            rel = write(product, None, i)
            if held:
                files["test_shift"].append(rel)
            elif i < half or holdout_defect is None:
                files["train"].append(rel)
            else:
                files["test_zeroshot"].append(rel)
        for defect in defects:
            if held and defect == holdout_defect:
                continue  # neither a pure shift nor a pure zero-shot case
            key = "test_shift" if held else ("test_zeroshot" if defect == holdout_defect else "train")
            for i in range(n_per_class):
                files[key].append(write(product, defect, i))

    splits = {
        "format": "dapo-synth/1",
        "seed": int(seed),
        "size": int(size),
        "n_per_class": int(n_per_class),
        "n_good": int(n_good),
        "defect_scale": list(defect_scale),
        "defects_per_image": int(defects_per_image),
        "products": list(products),
        "defects": list(defects),
        "holdout_product": holdout_product,
        "holdout_defect": holdout_defect,
        "vocabulary": ["normal", *defects],
        "splits": {
            "train": {"products": train_products, "defects": train_defects, "files": files["train"]},
            "test_shift": {
                "products": [holdout_product] if holdout_product else [],
                "defects": train_defects if holdout_product else [],
                "files": files["test_shift"],
            },
            "test_zeroshot": {
                "products": train_products if holdout_defect else [],
                "defects": [holdout_defect] if holdout_defect else [],
                "files": files["test_zeroshot"],
            },
        },
    }
    (out / SPLITS_FILE).write_text(json.dumps(splits, indent=2) + "\n", encoding="utf-8")
    return splits


def load_split(root: str | Path, split: str = "train"):
    """Samples of one split of a generated data set, with class ids from the full synthetic
    vocabulary (stable across splits: 'normal' + every generated defect, in order)."""
    from training.data.common import DataLayoutError
    from training.data.folder import load_folder
    from training.data.vocab import Vocabulary

    root = Path(root)
    sf = root / SPLITS_FILE
    if not sf.is_file():
        raise DataLayoutError(sf, "missing splits.json (not a `dapo synth` output?)")
    info = json.loads(sf.read_text(encoding="utf-8"))
    if split not in info["splits"]:
        raise KeyError(f"unknown split {split!r}; known: {', '.join(info['splits'])}")
    part = info["splits"][split]
    wanted = set(part["files"])
    if not wanted:
        return []
    vocab = Vocabulary(info["defects"])
    samples = load_folder(root, products=part["products"], vocab=vocab)
    picked = [s for s in samples if s.image.relative_to(root).as_posix() in wanted]
    if len(picked) != len(wanted):
        have = {s.image.relative_to(root).as_posix() for s in picked}
        missing = sorted(wanted - have)[:3]
        raise DataLayoutError(root / missing[0], f"file listed in {sf} ({split}) is missing")
    return picked


# --------------------------------------------------------------------------- CLI

def add_synth_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--out", required=True, help="output folder (custom layout + splits.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-per-class", type=int, default=8, help="defective images per product and defect")
    p.add_argument("--n-good", type=int, default=None, help="good images per product (default 2 x n-per-class)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--products", default=",".join(PRODUCTS), help=f"comma list from {','.join(PRODUCTS)}")
    p.add_argument("--defects", default=",".join(DEFECTS), help=f"comma list from {','.join(DEFECTS)}")
    p.add_argument("--holdout-product", default=DEFAULT_HOLDOUT_PRODUCT, help="'none' for no test_shift")
    p.add_argument("--holdout-defect", default=DEFAULT_HOLDOUT_DEFECT, help="'none' for no test_zeroshot")
    p.add_argument("--defect-scale", default=",".join(map(str, DEFAULT_DEFECT_SCALE)), metavar="MIN,MAX",
                   help="defect sizes as fractions of the image side, log-uniform (e.g. 0.002,0.005 at --size 2236)")
    p.add_argument("--defects-per-image", type=int, default=1, help="defects of the image's type in each image")
    p.add_argument("--overwrite", action="store_true")
    return p


def synth_main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """`dapo synth`: accepts a parsed Namespace (from the main CLI, built with
    ``add_synth_arguments``) or an argv list."""
    if not isinstance(args, argparse.Namespace):
        args = add_synth_arguments(argparse.ArgumentParser(prog="dapo synth", description=__doc__.split("\n")[0])).parse_args(args)

    def names(s):
        return [x.strip() for x in s.split(",") if x.strip()]

    def opt(s):
        return None if s is None or str(s).lower() in ("", "none") else s

    splits = generate(
        args.out, seed=args.seed, n_per_class=args.n_per_class, size=args.size,
        products=names(args.products), defects=names(args.defects),
        holdout_product=opt(args.holdout_product), holdout_defect=opt(args.holdout_defect),
        n_good=args.n_good, overwrite=args.overwrite,
        defect_scale=tuple(float(v) for v in args.defect_scale.split(",")),
        defects_per_image=args.defects_per_image,
    )
    counts = {k: len(v["files"]) for k, v in splits["splits"].items()}
    print(f"wrote {sum(counts.values())} images to {args.out} ({', '.join(f'{k}: {n}' for k, n in counts.items())})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(synth_main())
