"""ONNX Runtime backend: CPU here, CUDA or TensorRT execution providers on a GPU node.

TensorRT is configured as the engine it is (`TensorRtOptions`):
* precision follows the served graph: fp16 kernels (`trt_fp16_enable`) only for precision fp16,
  so fp32 means fp32 end to end;
* one explicit optimisation profile for the dynamic batch axis of both inputs: min 1, opt = max
  = the service's maximum batch size (`trt_profile_min_shapes` / `_opt_` / `_max_`, format
  "input:d0xd1x...,input2:..."). Without it the engine is rebuilt whenever a batch size larger
  than any seen before first appears (warm-up, then again under load); with it the engine is
  built once per artifact and cache, tuned for the full batches a busy node runs, and every
  batch size 1..max runs on it. With the engine cache on, ORT compares the profile with the one
  stored beside the cached engine and rebuilds only when it differs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.runtime.backends.base import FEATURE_OUTPUTS, INPUT_NAMES, OUTPUT_NAMES, EncoderOutputs

PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
TENSORRT = "TensorrtExecutionProvider"


@dataclass(frozen=True)
class TensorRtOptions:
    """What the TensorRT execution provider needs to know about the model and the service."""

    cache_dir: str | None = None  # engine + timing cache folder; None = build at every start
    fp16: bool = False  # fp16 kernels; True only when the served precision is fp16
    max_batch: int = 1  # the profile's opt and max batch (the micro-batcher's max_batch_size)
    image_size: int | None = None  # S of pixel_values (B, 3, S, S); None = no explicit profile
    num_classes: int | None = None  # C of allowed (B, C)


def _shapes(batch: int, trt: TensorRtOptions) -> str:
    """Both inputs at batch size `batch`, in the EP's "name:d0xd1x...,name:..." format."""
    pixel_values, allowed = INPUT_NAMES
    s, c = trt.image_size, trt.num_classes
    return f"{pixel_values}:{batch}x3x{s}x{s},{allowed}:{batch}x{c}"


def tensorrt_provider_options(trt: TensorRtOptions) -> dict[str, Any]:
    """The TensorRT EP's provider options for this model and service configuration."""
    opts: dict[str, Any] = {"trt_fp16_enable": trt.fp16}
    if trt.image_size is not None and trt.num_classes is not None:
        opts |= {"trt_profile_min_shapes": _shapes(1, trt),
                 "trt_profile_opt_shapes": _shapes(trt.max_batch, trt),
                 "trt_profile_max_shapes": _shapes(trt.max_batch, trt)}
    if trt.cache_dir:
        opts |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": trt.cache_dir,
                 "trt_timing_cache_enable": True, "trt_timing_cache_path": trt.cache_dir}
    return opts


def choose_providers(requested: list[str] | None, trt: TensorRtOptions | None = None) -> list:
    """Requested providers that this onnxruntime build has (in order), else the best available;
    TensorRT with its options, the others by name."""
    available = ort.get_available_providers()
    names = [p for p in (requested or PREFERENCE) if p in available]
    if requested and not names:
        raise ValueError(f"none of the requested providers {requested} is available; this build has {available}")
    if "CPUExecutionProvider" not in names:
        names.append("CPUExecutionProvider")
    out: list = []
    for name in names:
        if name == TENSORRT:
            trt = trt or TensorRtOptions()
            if trt.cache_dir:
                os.makedirs(trt.cache_dir, exist_ok=True)
            out.append((name, tensorrt_provider_options(trt)))
        else:
            out.append(name)
    return out


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, model_path: Path, providers: list[str] | None = None, intra_op_threads: int = 0,
                 io_binding: bool | None = None, precision: str = "fp32", trt: TensorRtOptions | None = None):
        """`trt`: the TensorRT cache folder and the profile's shapes (used only when TensorRT is
        among the providers); its fp16 flag is set here from `precision`, never taken as given."""
        self.model_path = Path(model_path)
        self.precision = precision  # of the graph: encoder.onnx fp32, encoder_fp16.onnx fp16 (I/O fp32 in both)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = intra_op_threads
        # No busy-waiting of the intra-op threads between runs: it burns the CPU the service's
        # decode/render threads need (measured: ~7 ms of CPU per /detect on the demo, CPU EP).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.trt = replace(trt or TensorRtOptions(), fp16=precision == "fp16")
        self.session = ort.InferenceSession(str(model_path), sess_options=opts,
                                            providers=choose_providers(providers, self.trt))
        self.provider = self.session.get_providers()[0]
        # On an accelerator, bind inputs/outputs explicitly: the one host->device copy of the batch
        # and the device->host copy of the compact outputs are all that cross the bus; per-class
        # maps are never bound, so they stay on the device. None = on whenever not on the CPU EP.
        self.io_binding = self.provider != "CPUExecutionProvider" if io_binding is None else io_binding
        self.has_features = set(FEATURE_OUTPUTS) <= {o.name for o in self.session.get_outputs()}
        self.providers = self.session.get_providers()  # what the reference search runs on too

    def run(self, pixel_values: np.ndarray, allowed: np.ndarray, class_probs: bool = False,
            features: bool = False) -> EncoderOutputs:
        feeds = dict(zip(INPUT_NAMES, (np.ascontiguousarray(pixel_values, dtype=np.float32),
                                       np.ascontiguousarray(allowed, dtype=bool))))
        if features and not self.has_features:
            raise ValueError(f"{self.model_path.name} has no {FEATURE_OUTPUTS} outputs (baked before references): "
                             "re-bake the artifact to use references")
        # ORT copies out only what is asked
        names = (*OUTPUT_NAMES, *(("class_probs",) if class_probs else ()), *(FEATURE_OUTPUTS if features else ()))
        if not self.io_binding:
            return EncoderOutputs(**dict(zip(names, self.session.run(list(names), feeds))))
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return EncoderOutputs(**dict(zip(names, binding.copy_outputs_to_cpu())))
