"""Synthetic part images shared by the serving tests."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def gradient_png(seed: int, w: int, h: int) -> bytes:
    """A red/blue gradient with a seeded noisy patch, as PNG: distinct per seed, and textured
    where the random demo model reacts (so scores and masks differ between images)."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None]
    img[..., 2] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    img[h // 3: h // 2, w // 4: w // 2] = rng.integers(0, 255, (h // 2 - h // 3, w // 2 - w // 4, 3))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()
