"""PyTorch backend: the plain-torch encoder from `encoder.safetensors` (no training/, no pickle)."""
from __future__ import annotations

from pathlib import Path

import threading

import numpy as np
import torch
import torch.nn.functional as F

from service.runtime.artifact import EncoderGeometry
from service.runtime.backends.base import FEATURE_OUTPUTS, GRAPH_OUTPUTS, EncoderOutputs
from service.runtime.backends.torch_model import load_encoder

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchBackend:
    name = "torch"

    def __init__(self, weights: Path, geometry: EncoderGeometry, device: str | None = None, precision: str = "fp32"):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {sorted(DTYPES)}")
        self.device = torch.device(device)
        self.dtype = DTYPES[precision]
        self.model = load_encoder(str(weights), geometry, device=device, dtype=self.dtype)
        self.provider = f"{self.device.type}:{precision}"
        self.has_features = True

    @torch.inference_mode()
    def run(self, pixel_values: np.ndarray, allowed: np.ndarray, class_probs: bool = False,
            features: bool = False) -> EncoderOutputs:
        x = torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32)).to(self.device, self.dtype)
        a = torch.from_numpy(np.ascontiguousarray(allowed, dtype=bool)).to(self.device)
        outs = dict(zip((*GRAPH_OUTPUTS, *FEATURE_OUTPUTS), self.model(x, a)))
        if not class_probs:
            del outs["class_probs"]  # the per-class maps stay on the device
        if not features:
            for name in FEATURE_OUTPUTS:
                del outs[name]
        return EncoderOutputs(**{n: t.float().cpu().numpy() if t.dtype != torch.uint8 else t.cpu().numpy()
                                 for n, t in outs.items()})


class TorchSearch:
    """A product's reference search (service.runtime.references) in torch, on this backend's device."""

    def __init__(self, device: str, grid: int, image_size: int):
        self.device, self.grid, self.image_size = device, grid, image_size
        self.provider = f"torch:{device}"
        self._cache: dict[int, object] = {}
        self._lock = threading.Lock()

    def _on_device(self, array: np.ndarray):
        with self._lock:  # the bank crosses to the device once, not per call
            key = id(array)
            if key not in self._cache:
                self._cache[key] = (array, torch.from_numpy(array).to(self.device))
            return self._cache[key][1]

    def __call__(self, queries, bank, global_, global_bank):
        with torch.inference_mode():
            q = torch.from_numpy(np.ascontiguousarray(queries, np.float32)).to(self.device)
            g = torch.from_numpy(np.ascontiguousarray(global_, np.float32)).to(self.device)
            d = torch.cdist(q, self._on_device(bank)[None].expand(q.shape[0], -1, -1)).amin(-1)
            gd = torch.cdist(g[None], self._on_device(global_bank)[None])[0].amin(-1)
            grid = d.reshape(-1, 1, self.grid, self.grid)
            up = F.interpolate(grid, size=(self.image_size, self.image_size), mode="bilinear", align_corners=True)
            return up[:, 0].cpu().numpy(), d.amax(-1).cpu().numpy(), gd.cpu().numpy()
