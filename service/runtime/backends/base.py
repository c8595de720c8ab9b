"""The backend contract: preprocessed images in, per-image scores and maps out.

Both backends run the same computation (encoder, visual prompts, adapters and the scoring
head), so everything large stays where the encoder runs and only compact results come back:

    inputs   pixel_values  (B, 3, S, S) float32, CLIP-normalised
             allowed       (B, C) bool: classes that may win the type argmax (column 0, normal,
                           is always allowed); this is how a product's defect list is applied
    outputs  anomaly_score (B,)        P(abnormal) from softmax over [t_N, t_Abar] / tau
             type_scores   (B, C)      softmax over [t_N, t_1..t_K] / tau of the global feature
             anomaly_map   (B, S, S)   mean over tapped layers of the summed defect
                                       probabilities, upsampled (bilinear, align_corners) -> [0, 1]
             type_map      (B, S, S)   uint8 argmax over the allowed classes (0 = normal)
             class_max     (B, C)      max over pixels of each class's probability map
    optional class_probs   (B, C, S, S) per-class probability maps; only fetched on request
                           (evaluation's multi-type metrics), never on the serving path
    optional defect_type_map (B, S, S) uint8 argmax over the allowed *defect* classes (normal excluded):
                           the type of a pixel that the reference branch finds anomalous
    optional patch_features (B, g*g, F) the backbone's own patch tokens at `reference_taps`
                           (each tap L2-normalised, concatenated, scaled to unit norm): what a
                           product's reference bank holds and is searched with (artifacts baked
                           before references have no such output; see `has_features`)
             global_feature (B, E)     the L2-normalised pooled image feature (DAPO's global one)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

INPUT_NAMES = ("pixel_values", "allowed")
OUTPUT_NAMES = ("anomaly_score", "type_scores", "anomaly_map", "type_map", "class_max")
GRAPH_OUTPUTS = (*OUTPUT_NAMES, "class_probs")
FEATURE_OUTPUTS = ("defect_type_map", "patch_features", "global_feature")  # fetched only for products with references


def reference_taps(taps: list[int]) -> list[int]:
    """The tapped blocks whose raw patch tokens the reference bank keeps: the two before the last
    tap (4 taps [3, 6, 9, 12] -> [6, 9]; the last block's tokens are the most semantic and the
    least local), or the last two when there are fewer than three taps. One definition for the
    export (training.export) and the torch encoder."""
    taps = list(taps)
    return taps[-3:-1] if len(taps) >= 3 else taps[-2:]


@dataclass
class EncoderOutputs:
    anomaly_score: np.ndarray
    type_scores: np.ndarray
    anomaly_map: np.ndarray
    type_map: np.ndarray
    class_max: np.ndarray
    class_probs: np.ndarray | None = None
    defect_type_map: np.ndarray | None = None
    patch_features: np.ndarray | None = None
    global_feature: np.ndarray | None = None

    def _names(self) -> tuple[str, ...]:
        return tuple(n for n in (*GRAPH_OUTPUTS, *FEATURE_OUTPUTS) if getattr(self, n) is not None)

    def __len__(self) -> int:
        return int(self.anomaly_score.shape[0])

    def item(self, i: int) -> "EncoderOutputs":
        """The i-th image's outputs, each keeping a leading batch axis of 1."""
        return EncoderOutputs(**{n: getattr(self, n)[i : i + 1] for n in self._names()})


class Backend(Protocol):
    """What the batcher calls, from a worker thread, never from the event loop."""

    name: str  # "onnxruntime" | "torch"
    provider: str  # execution provider / device actually in use

    has_features: bool  # whether the encoder can also return FEATURE_OUTPUTS (references)

    def run(self, pixel_values: np.ndarray, allowed: np.ndarray, class_probs: bool = False,
            features: bool = False) -> EncoderOutputs: ...
