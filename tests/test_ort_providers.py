"""The TensorRT provider options the ONNX Runtime backend builds, checked on the CPU build.

TensorRT itself is not here; what can be checked is what ORT is given: fp16 kernels only for
precision fp16, and an explicit profile whose input names and fixed dimensions are those of the
artifact's real ONNX graph (a wrong name or size would make TensorRT refuse the profile).
"""
from __future__ import annotations

import onnxruntime as ort
import pytest

from service.runtime.artifact import load_manifest
from service.runtime.backends import create_backend
from service.runtime.backends.ort_backend import TensorRtOptions, choose_providers, tensorrt_provider_options


def parse_shapes(text: str) -> dict[str, list[int]]:
    """"a:1x3x4,b:1x7" -> {"a": [1, 3, 4], "b": [1, 7]} (the EP's documented format)."""
    out = {}
    for part in text.split(","):
        name, dims = part.split(":")
        out[name] = [int(d) for d in dims.split("x")]
    return out


@pytest.mark.parametrize("precision,fp16", [("fp32", False), ("fp16", True)])
def test_precision_decides_fp16_kernels(demo_artifact, precision, fp16, fp16_artifact):
    folder = fp16_artifact if precision == "fp16" else demo_artifact
    backend = create_backend(folder, load_manifest(folder), "onnxruntime", precision=precision, max_batch_size=8)
    assert backend.trt.fp16 is fp16
    assert tensorrt_provider_options(backend.trt)["trt_fp16_enable"] is fp16


def test_a_given_fp16_flag_never_overrides_the_precision(demo_artifact):
    from service.runtime.backends.ort_backend import OrtBackend

    backend = OrtBackend(demo_artifact / "encoder.onnx", precision="fp32", trt=TensorRtOptions(fp16=True))
    assert backend.trt.fp16 is False


def test_the_profile_covers_batch_1_to_max_for_both_inputs_of_the_real_graph(demo_artifact):
    manifest = load_manifest(demo_artifact)
    backend = create_backend(demo_artifact, manifest, "onnxruntime", max_batch_size=16, trt_cache_dir="/tmp/x")
    opts = tensorrt_provider_options(backend.trt)
    lo, opt, hi = (parse_shapes(opts[f"trt_profile_{k}_shapes"]) for k in ("min", "opt", "max"))
    graph = {i.name: i.shape for i in backend.session.get_inputs()}
    assert set(lo) == set(opt) == set(hi) == set(graph) == {"pixel_values", "allowed"}
    for name, shape in graph.items():
        assert isinstance(shape[0], str)  # the batch axis is the dynamic one
        assert lo[name][1:] == opt[name][1:] == hi[name][1:] == shape[1:]  # every fixed dim as in the graph
        assert (lo[name][0], opt[name][0], hi[name][0]) == (1, 16, 16)
    keyed = f"/tmp/x/encoder-{manifest.files['encoder.onnx'].sha256[:16]}"  # one folder per graph content
    assert opts["trt_engine_cache_enable"] is True and opts["trt_engine_cache_path"] == keyed
    assert opts["trt_timing_cache_path"] == keyed


def test_no_cache_dir_means_no_cache_options_and_no_shapes_means_no_profile():
    opts = tensorrt_provider_options(TensorRtOptions(max_batch=4))
    assert opts == {"trt_fp16_enable": False}


def test_choose_providers_passes_options_only_to_tensorrt(monkeypatch, tmp_path):
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: available)  # the list a GPU build reports
    trt = TensorRtOptions(cache_dir=str(tmp_path / "cache"), fp16=True, max_batch=8, image_size=518, num_classes=5)
    chosen = choose_providers(None, trt)
    assert chosen[0] == ("TensorrtExecutionProvider", tensorrt_provider_options(trt))
    assert chosen[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert (tmp_path / "cache").is_dir()
    assert chosen[0][1]["trt_profile_max_shapes"] == "pixel_values:8x3x518x518,allowed:8x5"



def test_intra_op_threads_do_not_spin(demo_artifact):
    backend = create_backend(demo_artifact, load_manifest(demo_artifact), "onnxruntime")
    assert backend.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
