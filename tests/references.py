"""Independent references for tests: how a mask, a heatmap and a colour ramp SHOULD look.

Written from the definitions (exact rationals, Pillow's documented filter), never by calling
the service's own code, so a test comparing the service with these compares it with the truth.
See tests/test_placement.py for the conventions they encode.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np


def reference_nearest(n_out: int, n_in: int) -> list[int]:
    """Source index per output index, exact: floor((i + 1/2) * n_in / n_out)."""
    return [int((Fraction(2 * i + 1, 2) * Fraction(n_in, n_out)).__floor__()) for i in range(n_out)]


def ties(n_out: int, n_in: int) -> list[int]:
    """Output indices whose centre falls exactly on a source-pixel boundary."""
    return [i for i in range(n_out) if (Fraction(2 * i + 1, 2) * Fraction(n_in, n_out)).denominator == 1]


def bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) Pillow BILINEAR weights: triangle of half-width max(scale, 1), renormalised."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale
    taps = np.arange(n_in) + 0.5
    w = np.clip(1.0 - np.abs(taps[None, :] - centres[:, None]) / support, 0.0, None)
    return w / w.sum(axis=1, keepdims=True)


def reference_bilinear(a: np.ndarray, width: int, height: int) -> np.ndarray:
    return bilinear_weights(a.shape[0], height) @ a.astype(np.float64) @ bilinear_weights(a.shape[1], width).T


def jet_reference(v: int) -> tuple[float, float, float]:
    """Exact ramp value of byte v (x = v / 255), in 0..255 before rounding:
    r = clip(1.5 - |4x - 3|), g = clip(1.5 - |4x - 2|), b = clip(1.5 - |4x - 1|), times 255.
    Every unsaturated channel is then k + 1/2 exactly, so the rounded table may go either way."""
    return tuple(float(min(max(Fraction(765, 2) - abs(4 * v - 255 * k), 0), 255)) for k in (3, 2, 1))
