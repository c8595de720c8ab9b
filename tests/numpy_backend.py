"""A small, honest numpy implementation of the Backend protocol, for batching unit tests.

It stands in for the accelerator only: it computes real outputs of the right shapes and
dtypes from the pixels (bright pixels are anomalous; the dominant colour channel picks the
defect type; disallowed classes never win), each image independently of its batch mates, so
"batched == alone" is exact. It records the batch sizes it saw and can be gated (to hold a
batch in flight) or told to fail (to test error isolation).
"""
from __future__ import annotations

import threading

import numpy as np

from service.runtime.backends.base import EncoderOutputs


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


class NumpyBackend:
    name = "numpy"
    provider = "CPU"

    def __init__(self, n_classes: int = 4, gate: threading.Event | None = None, fail: bool = False):
        self.n_classes = n_classes
        self.gate = gate
        self.fail = fail
        self.batch_sizes: list[int] = []
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def run(self, pixel_values: np.ndarray, allowed: np.ndarray) -> EncoderOutputs:
        with self._lock:
            self.batch_sizes.append(int(pixel_values.shape[0]))
            self.threads.add(threading.current_thread().name)
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail:
            raise RuntimeError("simulated accelerator failure")
        b, _, s, _ = pixel_values.shape
        brightness = pixel_values.mean(axis=1)  # (B, S, S)
        anomaly_map = 1.0 / (1.0 + np.exp(-4.0 * (brightness - 1.0)))
        logits = np.empty((b, self.n_classes, s, s), dtype=np.float32)
        logits[:, 0] = 2.0 - 4.0 * anomaly_map
        for c in range(1, self.n_classes):
            logits[:, c] = pixel_values[:, (c - 1) % 3] + 0.01 * c
        probs = _softmax(logits, axis=1)
        masked = np.where(allowed[:, :, None, None], logits, -np.inf)
        type_map = masked.argmax(axis=1).astype(np.uint8)
        type_scores = _softmax(logits.mean(axis=(2, 3)), axis=1)
        return EncoderOutputs(
            anomaly_score=anomaly_map.reshape(b, -1).max(axis=1).astype(np.float32),
            type_scores=type_scores.astype(np.float32),
            anomaly_map=anomaly_map.astype(np.float32),
            type_map=type_map,
            class_max=probs.reshape(b, self.n_classes, -1).max(axis=2).astype(np.float32),
        )
