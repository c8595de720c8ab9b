"""Backends: ONNX Runtime (default, no torch needed), OpenVINO (CPU; the `openvino` extra) and
PyTorch. Same contract (see base.py)."""
from __future__ import annotations

from pathlib import Path

from service.runtime.artifact import ONNX_PRECISIONS, OPENVINO_PRECISIONS, ArtifactError, Manifest
from service.runtime.backends.base import Backend, EncoderOutputs

__all__ = ["Backend", "EncoderOutputs", "create_backend"]


def create_backend(folder: Path, manifest: Manifest, backend: str = "onnxruntime",
                   providers: list[str] | None = None, trt_cache_dir: str | None = None,
                   device: str | None = None, precision: str = "fp32", io_binding: bool | None = None,
                   max_batch_size: int = 1, threads: int | None = None) -> Backend:
    """Build the named backend over an already verified artifact folder.

    `precision`: the torch backend's compute dtype (fp32, fp16, bf16); for ONNX Runtime, which
    graph to load: fp32 = encoder.onnx, fp16 = encoder_fp16.onnx (baked with `dapo bake --fp16`).
    `max_batch_size`: the largest batch that will be run (TensorRT's optimisation profile).
    OpenVINO: fp32 / bf16 run encoder.onnx at that inference precision, int8 the artifact's
    encoder_int8.xml. `auto` (onnxruntime, openvino): the fastest precision on this CPU among
    those the artifact carries and that passed their accuracy check (service.runtime.precision).
    `threads`: OpenVINO's inference threads (None = its default, one per physical core).
    """
    folder = Path(folder)
    failed = manifest.precision_checks.get(f"{backend}:{precision}")
    if failed is not None and not failed.passed:
        raise ArtifactError(f"{folder}: the {backend} {precision} encoder failed its accuracy check at bake "
                            f"(max abs diff {failed.max_abs_diff}, tolerance {failed.tolerance}); serve fp32 or auto")
    if precision == "auto":
        from service.runtime.precision import choose

        def build(p: str) -> Backend:
            return create_backend(folder, manifest, backend, providers, trt_cache_dir, device, p, io_binding,
                                  max_batch_size, threads)
        return choose(manifest, backend, build)[0]
    if backend == "onnxruntime":
        from service.runtime.backends.ort_backend import OrtBackend, TensorRtOptions

        onnx_file = onnx_encoder_file(manifest, precision, folder)
        trt = TensorRtOptions(cache_dir=engine_cache_dir(trt_cache_dir, manifest, onnx_file), max_batch=max_batch_size,
                              image_size=manifest.image_size, num_classes=len(manifest.class_names))
        return OrtBackend(folder / onnx_file, providers=providers, io_binding=io_binding, precision=precision, trt=trt)
    if backend == "openvino":
        try:
            from service.runtime.backends.openvino_backend import OpenVinoBackend
        except ImportError as e:
            raise ImportError(f"the openvino backend needs the openvino package: pip install 'dapo-inspect[openvino]' "
                              f"({e})") from e
        return OpenVinoBackend(folder / openvino_encoder_file(manifest, precision, folder), precision=precision,
                               threads=threads)
    if backend == "torch":
        from service.runtime.backends.torch_backend import TorchBackend

        return TorchBackend(folder / "encoder.safetensors", manifest.encoder_geometry(), device=device,
                            precision=precision)
    raise ValueError(f"unknown backend {backend!r}; choose 'onnxruntime', 'openvino' or 'torch'")


def onnx_encoder_file(manifest: Manifest, precision: str, folder: Path | None = None) -> str:
    """The artifact's ONNX encoder for `precision`; a clear error if it was not baked."""
    if precision not in ONNX_PRECISIONS:
        raise ValueError(f"the onnxruntime backend serves precision fp32, fp16, int8 or auto, not {precision!r} "
                         "(bf16 is the torch and openvino backends')")
    name = manifest.onnx_file(precision)
    if name is None:
        where = (folder or Path(".")) / f"encoder_{precision}.onnx"
        raise ArtifactError(f"{where}: artifact {manifest.name} {manifest.version} has no {precision} ONNX encoder "
                            f"(precision {precision} with the onnxruntime backend needs one); re-bake it with "
                            f"`dapo bake ... --{precision}`{_INT8_ORT if precision == 'int8' else ''}, or serve precision fp32")
    return name


_INT8_ORT = (" (ONNX Runtime INT8 is kept only where it measured faster than fp32 on the baking CPU and passed its "
             "check: see the manifest's provenance.int8)")


def openvino_encoder_file(manifest: Manifest, precision: str, folder: Path | None = None) -> str:
    """The file the openvino backend reads for `precision`: encoder.onnx for fp32 and bf16
    (OpenVINO reads ONNX directly), the NNCF IR for int8; a clear error if it was not baked."""
    if precision in ("fp32", "bf16"):
        return manifest.onnx_file("fp32") or "encoder.onnx"
    if precision not in OPENVINO_PRECISIONS:
        raise ValueError(f"the openvino backend serves precision fp32, bf16, int8 or auto, not {precision!r}")
    name = manifest.openvino_file(precision)
    if name is None:
        raise ArtifactError(f"{(folder or Path('.')) / 'encoder_int8.xml'}: artifact {manifest.name} {manifest.version} "
                            "has no int8 OpenVINO encoder; add one with `dapo quantize --artifact DIR --calibration "
                            "ROOT` (or `dapo bake ... --int8 --calibration ROOT`), or serve precision fp32")
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
