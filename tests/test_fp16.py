"""fp16 ONNX export (`dapo bake --fp16`): the graph, its verification, serving and benchmarking it.

Everything runs encoder_fp16.onnx for real on ONNX Runtime's CPU provider at ORT_ENABLE_ALL,
the level on which an earlier fp16 conversion segfaulted (see training.export.fp16_blocked_nodes).
"""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.server.app import create_app
from service.runtime.artifact import ArtifactError, load_manifest, sha256_file
from service.runtime.backends import create_backend
from service.server.settings import Settings
from training.bake import FP16_TOLERANCE, BakeOptions, bake, run_onnx_fp16_isolated

FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


def _inputs(manifest, batch, seed=0):
    rng = np.random.default_rng(seed)
    s = manifest.image_size
    allowed = rng.random((batch, len(manifest.vocabulary))) < 0.6
    allowed[:, 0] = True
    return rng.standard_normal((batch, 3, s, s), dtype=np.float32), allowed


def _io(path):
    g = onnx.load(str(path)).graph
    return [(v.name, v.type.tensor_type.elem_type) for v in (*g.input, *g.output)]


def _output_types(path) -> dict[str, int]:
    g = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    return {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.output)}


def test_fp16_bake_writes_a_listed_verified_file(fp16_artifact):
    m = load_manifest(fp16_artifact)  # verifies every listed sha256, encoder_fp16.onnx included
    assert set(m.files) == {"encoder.onnx", "encoder_fp16.onnx", "encoder.safetensors", "text_features.safetensors"}
    assert m.files["encoder_fp16.onnx"].sha256 == sha256_file(fp16_artifact / "encoder_fp16.onnx")
    assert m.onnx_encoders == {"fp32": "encoder.onnx", "fp16": "encoder_fp16.onnx"}
    assert m.onnx_file("fp16") == "encoder_fp16.onnx"
    v = m.verification_fp16
    assert v.passed and v.tolerance == FP16_TOLERANCE and v.type_map_tie_margin == FP16_TOLERANCE
    assert {f"onnxruntime_fp16.{o}" for o in ("anomaly_score", "type_scores", "anomaly_map", "class_max",
                                              "class_probs")} == set(v.max_abs_diff)
    assert 0 < max(v.max_abs_diff.values()) < FP16_TOLERANCE  # really reduced precision, within bounds
    assert v.type_map_mismatch_fraction <= v.type_map_tolerance
    assert m.verification.passed and max(m.verification.max_abs_diff.values()) < 1e-5  # fp32 unaffected


def test_fp16_graph_is_fp16_inside_with_the_fp32_interface(fp16_artifact):
    f32, f16 = fp16_artifact / "encoder.onnx", fp16_artifact / "encoder_fp16.onnx"
    assert _io(f16) == _io(f32)  # names and dtypes: pixel_values float, allowed bool, type_map uint8, ...
    model = onnx.load(str(f16))
    onnx.checker.check_model(model)  # includes topological order
    weights = [i for i in model.graph.initializer if i.data_type in (FLOAT, FLOAT16)]
    assert sum(i.data_type == FLOAT16 for i in weights) > 0.8 * len(weights)
    types = _output_types(f16)
    by_op: dict[str, set[int]] = {}
    for n in model.graph.node:
        by_op.setdefault(n.op_type, set()).add(types.get(n.output[0]))
    assert by_op["MatMul"] >= {FLOAT16} and by_op["Conv"] == {FLOAT16}
    for op in ("LayerNormalization", "Softmax", "ReduceL2", "ReduceMean", "Resize"):  # kept fp32
        assert by_op[op] == {FLOAT}, op
    # the ORT crash pattern (see training.export.separate_transposes_from_matmuls): no MatMul reads a
    # Transpose; the attention's input Transpose is fp16 and reaches its MatMul through a Reshape
    producer = {o: n for n in model.graph.node for o in n.output}
    matmul_inputs = [producer.get(i) for n in model.graph.node if n.op_type == "MatMul" for i in n.input]
    assert not [p.name for p in matmul_inputs if p is not None and p.op_type == "Transpose"]
    unfused = [p for p in matmul_inputs if p is not None and p.name.endswith("_for_matmul")]
    assert len(unfused) == load_manifest(fp16_artifact).backbone.layers
    assert all(p.op_type == "Reshape" and types[producer[p.input[0]].output[0]] == FLOAT16 for p in unfused)
    assert (fp16_artifact / "encoder_fp16.onnx").stat().st_size < 0.8 * (fp16_artifact / "encoder.onnx").stat().st_size


def test_separating_transposes_from_matmuls_changes_no_number(demo_artifact, tmp_path):
    """The crash workaround on the fp32 graph: same outputs bit for bit, one Reshape per block."""
    from training.export import separate_transposes_from_matmuls

    model = onnx.load(str(demo_artifact / "encoder.onnx"))
    m = load_manifest(demo_artifact)
    assert separate_transposes_from_matmuls(model.graph) == m.backbone.layers
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / "encoder.onnx"))
    pixels, allowed = _inputs(m, 2, seed=5)
    a = create_backend(demo_artifact, m, "onnxruntime").run(pixels, allowed, class_probs=True)
    b = create_backend(tmp_path, m, "onnxruntime").run(pixels, allowed, class_probs=True)
    for name in ("anomaly_score", "type_scores", "anomaly_map", "type_map", "class_max", "class_probs"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


@pytest.mark.parametrize("batch", [1, 3])
def test_fp16_graph_matches_fp32_on_ort_cpu(fp16_artifact, batch):
    m = load_manifest(fp16_artifact)
    pixels, allowed = _inputs(m, batch, seed=10 + batch)
    ref = create_backend(fp16_artifact, m, "onnxruntime").run(pixels, allowed, class_probs=True)
    half = create_backend(fp16_artifact, m, "onnxruntime", precision="fp16")
    assert half.model_path.name == "encoder_fp16.onnx" and half.precision == "fp16"
    for io_binding in (False, True):
        half.io_binding = io_binding
        out = half.run(pixels, allowed, class_probs=True)
        for name in ("anomaly_score", "type_scores", "anomaly_map", "class_max", "class_probs"):
            a, b = getattr(ref, name), getattr(out, name)
            assert b.dtype == np.float32 and b.shape == a.shape
            assert 0 < np.abs(a - b).max() < FP16_TOLERANCE, name
        assert out.type_map.dtype == np.uint8
        # a pixel may only change type at a near-tie, and never to a disallowed class
        probs = np.where(allowed[:, :, None, None], ref.class_probs, -1.0)
        best = np.take_along_axis(probs, ref.type_map[:, None].astype(int), 1)[:, 0]
        picked = np.take_along_axis(probs, out.type_map[:, None].astype(int), 1)[:, 0]
        assert (best - picked <= FP16_TOLERANCE).all()
        assert (out.type_map == ref.type_map).mean() > 0.99


def test_fp16_bake_refuses_above_tolerance_and_leaves_nothing(tmp_path, tiny_model):
    out = tmp_path / "strict16"
    with pytest.raises(RuntimeError, match=r"fp16 export verification failed: encoder_fp16\.onnx differs"):
        bake(tiny_model, ["scratch", "hole"], out, BakeOptions(name="strict16", fp16=True, fp16_tolerance=1e-6))
    assert not out.exists() and not list(tmp_path.glob(".bake-*"))


def test_an_fp16_graph_ort_cannot_run_is_a_clear_error_not_a_crash(tmp_path, fp16_artifact):
    broken = tmp_path / "encoder_fp16.onnx"
    broken.write_bytes((fp16_artifact / "encoder_fp16.onnx").read_bytes()[:5000])
    m = load_manifest(fp16_artifact)
    with pytest.raises(RuntimeError, match=r"encoder_fp16\.onnx: ONNX Runtime .* failed to load or run the fp16 graph"):
        run_onnx_fp16_isolated(broken, *_inputs(m, 1))


def test_missing_fp16_file_is_a_clear_error(demo_artifact):
    m = load_manifest(demo_artifact)
    assert m.onnx_file("fp16") is None
    with pytest.raises(ArtifactError, match=r"encoder_fp16\.onnx: .* has no fp16 ONNX encoder.*--fp16"):
        create_backend(demo_artifact, m, "onnxruntime", precision="fp16")
    with pytest.raises(ValueError, match="onnxruntime backend serves precision fp32, fp16, int8 or auto, not 'bf16'"):
        create_backend(demo_artifact, m, "onnxruntime", precision="bf16")
    assert create_backend(demo_artifact, m, "onnxruntime").model_path.name == "encoder.onnx"


def test_manifests_without_onnx_encoders_still_load(fp16_artifact, tmp_path):
    """Artifacts baked before fp16 export (schema 1): no onnx_encoders, no verification_fp16 -> fp32 only."""
    old = tmp_path / "old"
    shutil.copytree(fp16_artifact, old)
    data = json.loads((old / "manifest.json").read_text())
    data["schema_version"] = 1
    for key in ("onnx_encoders", "verification_fp16"):
        data.pop(key)
    for key in ("type_map_tolerance", "type_map_tie_margin", "type_map_flips_at_ties"):
        data["verification"].pop(key)
    (old / "manifest.json").write_text(json.dumps(data))
    m = load_manifest(old)
    assert m.onnx_file("fp32") == "encoder.onnx" and m.onnx_file("fp16") is None
    assert m.verification.passed and m.verification_fp16 is None
    data["onnx_encoders"] = {"fp32": "encoder.onnx", "fp16": "nowhere.onnx"}
    (old / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="onnx_encoders names files missing from files"):
        load_manifest(old)


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _detect(artifact, precision: str, images: list[bytes]):
    app = create_app(Settings(artifact=artifact, backend="onnxruntime", precision=precision), configure_logs=False)
    with TestClient(app) as client:
        backend = app.state.service.backend
        answers = []
        for img in images:
            r = client.post("/detect", files={"image": ("p.png", img, "image/png")})
            assert r.status_code == 200, r.text
            answers.append(r.json()["results"][0])
    return backend, answers


def test_service_serves_fp16_on_onnxruntime(fp16_artifact):
    images = [_png(s) for s in range(3)]
    b32, r32 = _detect(fp16_artifact, "fp32", images)
    b16, r16 = _detect(fp16_artifact, "fp16", images)
    assert b32.model_path.name == "encoder.onnx" and b16.model_path.name == "encoder_fp16.onnx"
    assert b16.precision == "fp16" and b16.provider == "CPUExecutionProvider"
    for a, b in zip(r32, r16):
        assert a["anomaly_score"] != b["anomaly_score"]  # really the other graph
        assert abs(a["anomaly_score"] - b["anomaly_score"]) < FP16_TOLERANCE
        assert [d["name"] for d in a["defect_types"]][:1] == [d["name"] for d in b["defect_types"]][:1]


def test_service_without_fp16_file_refuses_to_start_naming_it(demo_artifact):
    app = create_app(Settings(artifact=demo_artifact, backend="onnxruntime", precision="fp16"), configure_logs=False)
    with pytest.raises(ArtifactError, match=r"encoder_fp16\.onnx"), TestClient(app):
        pass


def test_bench_sweeps_onnxruntime_fp16(fp16_artifact, demo_artifact, capsys):
    from service.bench import bench_encoder

    rows = bench_encoder(fp16_artifact, ["onnxruntime"], ["fp16", "bf16"], [1, 2], seconds=0.0)
    assert "cpu_isa" in rows[0]  # the first row says which CPU the figures come from
    rows = rows[1:]
    assert [(r["precision"], r["batch"]) for r in rows] == [("fp32", 1), ("fp32", 2), ("fp16", 1), ("fp16", 2)]
    for r in rows[2:]:
        assert 0 < max(r["max_abs_diff_vs_ort_fp32"].values()) < FP16_TOLERANCE
    rows = bench_encoder(demo_artifact, ["onnxruntime"], ["fp16"], [1], seconds=0.0)
    assert [r["precision"] for r in rows[1:]] == ["fp32"]
    assert "no encoder_fp16.onnx" in capsys.readouterr().err


def test_cli_bake_fp16_prints_its_figures(tmp_path, capsys):
    from service.cli import main

    assert main(["bake", "--demo", "--fp16", "--out", str(tmp_path / "d16")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bytes"]["encoder_fp16.onnx"] > 0
    assert 0 < report["fp16_max_abs_diff"] < report["fp16_tolerance"] == FP16_TOLERANCE
