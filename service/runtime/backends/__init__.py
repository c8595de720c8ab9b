"""Backends: ONNX Runtime (default, no torch needed) and PyTorch. Same contract (see base.py)."""
from __future__ import annotations

from pathlib import Path

from service.runtime.artifact import ONNX_PRECISIONS, ArtifactError, Manifest
from service.runtime.backends.base import Backend, EncoderOutputs

__all__ = ["Backend", "EncoderOutputs", "create_backend"]


def create_backend(folder: Path, manifest: Manifest, backend: str = "onnxruntime",
                   providers: list[str] | None = None, trt_cache_dir: str | None = None,
                   device: str | None = None, precision: str = "fp32", io_binding: bool | None = None,
                   max_batch_size: int = 1) -> Backend:
    """Build the named backend over an already verified artifact folder.

    `precision`: the torch backend's compute dtype (fp32, fp16, bf16); for ONNX Runtime, which
    graph to load: fp32 = encoder.onnx, fp16 = encoder_fp16.onnx (baked with `dapo bake --fp16`).
    `max_batch_size`: the largest batch that will be run (TensorRT's optimisation profile).
    """
    folder = Path(folder)
    if backend == "onnxruntime":
        from service.runtime.backends.ort_backend import OrtBackend, TensorRtOptions

        onnx_file = onnx_encoder_file(manifest, precision, folder)
        trt = TensorRtOptions(cache_dir=engine_cache_dir(trt_cache_dir, manifest, onnx_file), max_batch=max_batch_size,
                              image_size=manifest.image_size, num_classes=len(manifest.class_names))
        return OrtBackend(folder / onnx_file, providers=providers, io_binding=io_binding, precision=precision, trt=trt)
    if backend == "torch":
        from service.runtime.backends.torch_backend import TorchBackend

        return TorchBackend(folder / "encoder.safetensors", manifest.encoder_geometry(), device=device,
                            precision=precision)
    raise ValueError(f"unknown backend {backend!r}; choose 'onnxruntime' or 'torch'")


def onnx_encoder_file(manifest: Manifest, precision: str, folder: Path | None = None) -> str:
    """The artifact's ONNX encoder for `precision`; a clear error if it was not baked."""
    if precision not in ONNX_PRECISIONS:
        raise ValueError(f"the onnxruntime backend serves precision fp32 or fp16, not {precision!r} "
                         "(bf16 is the torch backend's)")
    name = manifest.onnx_file(precision)
    if name is None:
        where = (folder or Path(".")) / f"encoder_{precision}.onnx"
        raise ArtifactError(f"{where}: artifact {manifest.name} {manifest.version} has no {precision} ONNX encoder "
                            f"(precision {precision} with the onnxruntime backend needs one); "
                            "re-bake it with `dapo bake ... --fp16`, or serve precision fp32")
    return name


def engine_cache_dir(root: str | None, manifest: Manifest, onnx_file: str) -> str | None:
    """One TensorRT engine-cache folder per ONNX graph *content* under `root`.

    ONNX Runtime's TensorRT EP names a cached engine after the model file's name and the graph's
    input/node names, not its weights, and reuses any engine whose name matches. Two bakes of
    the same architecture (a new defect word, a re-trained prompt) served from the same path
    (compose mounts every artifact at /models/artifact/encoder.onnx) would therefore share
    engines, and the second would run the first one's weights. Keyed by the file's sha256 from
    the (verified) manifest, each graph gets its own engines; a hot reload builds the new ones
    while the old ones keep serving."""
    if not root:
        return None
    return str(Path(root) / f"{Path(onnx_file).stem}-{manifest.files[onnx_file].sha256[:16]}")
