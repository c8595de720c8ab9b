"""ONNX Runtime backend: CPU here, CUDA or TensorRT execution providers on a GPU node."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.runtime.backends.base import GRAPH_OUTPUTS, INPUT_NAMES, OUTPUT_NAMES, EncoderOutputs

PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(requested: list[str] | None, trt_cache_dir: str | None) -> list:
    """Requested providers that this onnxruntime build has (in order), else the best available."""
    available = ort.get_available_providers()
    names = [p for p in (requested or PREFERENCE) if p in available]
    if requested and not names:
        raise ValueError(f"none of the requested providers {requested} is available; this build has {available}")
    if "CPUExecutionProvider" not in names:
        names.append("CPUExecutionProvider")
    out: list = []
    for name in names:
        if name == "TensorrtExecutionProvider":
            opts = {"trt_fp16_enable": True}
            if trt_cache_dir:
                os.makedirs(trt_cache_dir, exist_ok=True)
                opts |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": trt_cache_dir,
                         "trt_timing_cache_enable": True, "trt_timing_cache_path": trt_cache_dir}
            out.append((name, opts))
        else:
            out.append(name)
    return out


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, model_path: Path, providers: list[str] | None = None, trt_cache_dir: str | None = None,
                 intra_op_threads: int = 0, io_binding: bool | None = None, precision: str = "fp32"):
        self.model_path = Path(model_path)
        self.precision = precision  # of the graph: encoder.onnx fp32, encoder_fp16.onnx fp16 (I/O fp32 in both)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = intra_op_threads
        self.session = ort.InferenceSession(str(model_path), sess_options=opts,
                                            providers=choose_providers(providers, trt_cache_dir))
        self.provider = self.session.get_providers()[0]
        # On an accelerator, bind inputs/outputs explicitly: the one host->device copy of the batch
        # and the device->host copy of the compact outputs are all that cross the bus; per-class
        # maps are never bound, so they stay on the device. None = on whenever not on the CPU EP.
        self.io_binding = self.provider != "CPUExecutionProvider" if io_binding is None else io_binding

    def run(self, pixel_values: np.ndarray, allowed: np.ndarray, class_probs: bool = False) -> EncoderOutputs:
        feeds = dict(zip(INPUT_NAMES, (np.ascontiguousarray(pixel_values, dtype=np.float32),
                                       np.ascontiguousarray(allowed, dtype=bool))))
        names = GRAPH_OUTPUTS if class_probs else OUTPUT_NAMES  # ORT copies out only what is asked
        if not self.io_binding:
            return EncoderOutputs(*self.session.run(list(names), feeds))
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return EncoderOutputs(*binding.copy_outputs_to_cpu())
