"""A backend that emulates another CPU: the real one's outputs, moved by a few float32 ulps.

Another instruction set makes ONNX Runtime / PyTorch pick other kernels, which changes the
last bits of the encoder's outputs (measured: at most ~2 ulps of 1.0 between the demo artifact
baked under ATEN_CPU_CAPABILITY=default and =avx2). On one machine the answers never change
(not with ORT's optimisation level or thread count), so the suite could not see that fragility;
this wrapper makes it visible. Each float output is stepped `ulps` times with np.nextafter
towards +inf or -inf (a seeded random direction per element), probabilities are kept in [0, 1],
and the type map is recomputed from the moved per-class probabilities, exactly as the graph
computes it (argmax over the allowed classes), so near-ties flip as they would on that CPU.
"""
from __future__ import annotations

import numpy as np

from service.runtime.backends.base import Backend, EncoderOutputs


def nudge(values: np.ndarray, ulps: int, rng: np.random.Generator) -> np.ndarray:
    """`values` (float32) moved `ulps` representable steps up or down, element by element."""
    values = np.asarray(values, np.float32)
    target = np.where(rng.random(values.shape) < 0.5, np.float32(-np.inf), np.float32(np.inf)).astype(np.float32)
    out = values.copy()
    for _ in range(ulps):
        out = np.nextafter(out, target).astype(np.float32)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


class PerturbedBackend:
    """Wraps a real Backend; same contract (service.runtime.backends.base)."""

    def __init__(self, inner: Backend, ulps: int = 4, seed: int = 0):
        self.inner = inner
        self.ulps = ulps
        self.rng = np.random.default_rng(seed)
        self.name = inner.name
        self.provider = inner.provider

    def run(self, pixel_values: np.ndarray, allowed: np.ndarray, class_probs: bool = False) -> EncoderOutputs:
        raw = self.inner.run(pixel_values, allowed, class_probs=True)
        probs = nudge(raw.class_probs, self.ulps, self.rng)
        masked = np.where(np.asarray(allowed, bool)[:, :, None, None], probs, -1.0)
        return EncoderOutputs(
            anomaly_score=nudge(raw.anomaly_score, self.ulps, self.rng),
            type_scores=nudge(raw.type_scores, self.ulps, self.rng),
            anomaly_map=nudge(raw.anomaly_map, self.ulps, self.rng),
            type_map=masked.argmax(axis=1).astype(np.uint8),
            class_max=nudge(raw.class_max, self.ulps, self.rng),
            class_probs=probs if class_probs else None,
        )
