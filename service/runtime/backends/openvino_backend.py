"""OpenVINO backend (CPU): the same contract as ONNX Runtime's, at an explicitly chosen precision.

Why every property is set here and nothing is left to OpenVINO's defaults:
* `INFERENCE_PRECISION_HINT`: on a CPU with AVX-512 bf16 / AMX OpenVINO's default is bf16,
  silently (measured: anomaly map 3.6e-3 away from ONNX Runtime, where explicit f32 is 3e-7).
  fp32 here means f32; bf16 is asked for by name and refused on a CPU without it; int8 runs the
  NNCF-quantised IR with every layer NNCF left unquantised in f32 (not bf16).
* `PERFORMANCE_HINT` LATENCY: THROUGHPUT was 1.15-2.1x slower on 2 cores (it splits the cores
  into streams; the micro-batcher already makes the batches).
* `INFERENCE_NUM_THREADS`: the service's CPU-threads setting when given, else OpenVINO's own
  (one per physical core).

The graph has a dynamic batch axis (encoder.onnx: dim "batch"), so every batch size 1..max the
micro-batcher forms runs on one compiled model, as with ONNX Runtime.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.properties as props
import openvino.properties.hint as hints

from service.runtime.backends.base import (
    FEATURE_OUTPUTS,
    INPUT_NAMES,
    OUTPUT_NAMES,
    EncoderOutputs,
)
from service.runtime.precision import cpu_isa

OV_TYPES = {"fp32": ov.Type.f32, "bf16": ov.Type.bf16, "int8": ov.Type.f32}  # int8: unquantised layers in f32
DEVICE = "CPU"


class PrecisionUnavailable(RuntimeError):
    """The CPU cannot run the requested precision natively (bf16 without AVX-512 bf16 / AMX)."""


def cpu_capabilities(core: ov.Core) -> list[str]:
    """OpenVINO's OPTIMIZATION_CAPABILITIES of the CPU: FP32, INT8, BF16, ... (what it runs natively)."""
    return list(core.get_property(DEVICE, props.device.capabilities))


def compile_properties(precision: str, threads: int | None) -> dict:
    """The compile properties for a precision: every one explicit (see the module docstring)."""
    if precision not in OV_TYPES:
        raise ValueError(f"the openvino backend serves precision fp32, bf16 or int8, not {precision!r}")
    config = {hints.inference_precision: OV_TYPES[precision],
              hints.performance_mode: hints.PerformanceMode.LATENCY}
    if threads:
        config[props.inference_num_threads] = int(threads)
    return config


class OpenVinoBackend:
    name = "openvino"

    def __init__(self, model_path: Path, precision: str = "fp32", threads: int | None = None):
        """`model_path`: encoder.onnx (fp32, bf16) or the int8 IR (encoder_int8.xml)."""
        self.model_path = Path(model_path)
        self.precision = precision
        self.isa = cpu_isa()
        core = ov.Core()
        if precision == "bf16" and "BF16" not in cpu_capabilities(core):
            raise PrecisionUnavailable(
                f"precision bf16 needs a CPU with native bf16 (AVX-512 bf16 or AMX); this one ({self.isa}) has "
                f"{cpu_capabilities(core)}: OpenVINO would emulate it, slower than fp32. Serve fp32, int8 or auto")
        self.compiled = core.compile_model(core.read_model(str(self.model_path)), DEVICE,
                                           compile_properties(precision, threads))
        ran = self.compiled.get_property(hints.inference_precision)
        if precision != "int8" and ran != OV_TYPES[precision]:  # never a precision that was not asked for
            raise PrecisionUnavailable(f"OpenVINO compiled {self.model_path.name} at {ran}, not {precision}")
        # the reference features (a product's bank, service.runtime.references) when the graph has them;
        # the search then runs on ONNX Runtime's CPU provider, on the same CPU as this encoder
        self.has_features = set(FEATURE_OUTPUTS) <= {n for out in self.compiled.outputs for n in out.get_names()}
        self.threads = int(self.compiled.get_property(props.inference_num_threads))
        self.provider = f"{DEVICE}:{precision}"
        self._local = threading.local()  # one infer request per calling thread (workers > 1)

    def _request(self) -> ov.InferRequest:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request

    def run(self, pixel_values: np.ndarray, allowed: np.ndarray, class_probs: bool = False,
            features: bool = False) -> EncoderOutputs:
        if features and not self.has_features:
            raise ValueError(f"{self.model_path.name} has no {FEATURE_OUTPUTS} outputs (baked before references): "
                             "re-bake the artifact to use references")
        feeds = dict(zip(INPUT_NAMES, (np.ascontiguousarray(pixel_values, dtype=np.float32),
                                       np.ascontiguousarray(allowed, dtype=bool))))
        request = self._request()
        request.infer(feeds, share_inputs=True, share_outputs=True)
        # copy out only what is asked
        names = (*OUTPUT_NAMES, *(("class_probs",) if class_probs else ()), *(FEATURE_OUTPUTS if features else ()))
        return EncoderOutputs(**{n: np.array(request.get_tensor(n).data, copy=True) for n in names})
