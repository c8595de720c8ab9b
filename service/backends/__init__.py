"""Backends: ONNX Runtime (default, no torch needed) and PyTorch. Same contract (see base.py)."""
from __future__ import annotations

from pathlib import Path

from service.artifact import Manifest
from service.backends.base import Backend, EncoderOutputs

__all__ = ["Backend", "EncoderOutputs", "create_backend"]


def create_backend(folder: Path, manifest: Manifest, backend: str = "onnxruntime",
                   providers: list[str] | None = None, trt_cache_dir: str | None = None,
                   device: str | None = None, precision: str = "fp32", io_binding: bool | None = None) -> Backend:
    """Build the named backend over an already verified artifact folder."""
    folder = Path(folder)
    if backend == "onnxruntime":
        from service.backends.onnxruntime import OrtBackend

        return OrtBackend(folder / "encoder.onnx", providers=providers, trt_cache_dir=trt_cache_dir,
                          io_binding=io_binding)
    if backend == "torch":
        from service.backends.torch import TorchBackend

        return TorchBackend(folder / "encoder.safetensors", manifest.encoder_config(), device=device,
                            precision=precision)
    raise ValueError(f"unknown backend {backend!r}; choose 'onnxruntime' or 'torch'")
