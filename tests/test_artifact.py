"""Manifest schema and sha256 verification: a damaged artifact is refused, naming the file."""
from __future__ import annotations

import json
import shutil

import pytest

from service.runtime.artifact import ArtifactError, load_manifest, read_manifest


@pytest.fixture()
def copy(demo_artifact, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(demo_artifact, dst)
    return dst


def test_intact_artifact_loads(copy):
    assert load_manifest(copy).name == "dapo-demo"


def test_tampered_file_is_refused_with_its_name(copy):
    path = copy / "encoder.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"encoder\.onnx: sha256 .* does not match"):
        load_manifest(copy)


def test_truncated_file_is_refused(copy):
    path = copy / "encoder.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=r"encoder\.safetensors: size 100"):
        load_manifest(copy)


def test_missing_file_and_missing_manifest(copy, tmp_path):
    (copy / "text_features.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"text_features\.safetensors: file listed in the manifest is missing"):
        load_manifest(copy)
    with pytest.raises(ArtifactError, match="does not exist"):
        load_manifest(tmp_path / "nowhere")
    (copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest missing"):
        load_manifest(copy)


@pytest.mark.parametrize("edit,msg", [
    (lambda d: d.__setitem__("vocabulary", d["vocabulary"][1:]), "vocabulary ids must be 0..C-1"),
    (lambda d: d["vocabulary"].__setitem__(0, {"id": 0, "name": "scratch"}), "must be 'normal'"),
    (lambda d: d["products"].__setitem__("x", {"defect_types": ["warp"]}), "unknown defect types"),
    (lambda d: d.__setitem__("image_threshold", 1.5), "image_threshold"),
    (lambda d: d["files"]["encoder.onnx"].__setitem__("sha256", "zz"), "sha256"),
    (lambda d: d.pop("temperature"), "temperature"),
])
def test_invalid_manifest_is_refused(copy, edit, msg):
    path = copy / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=f"manifest.json: invalid manifest(.|\n)*{msg}"):
        read_manifest(copy)


def test_manifest_that_is_not_json(copy):
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="invalid manifest"):
        read_manifest(copy)


# --- schema versions ------------------------------------------------------------------------
def _as_schema_1(copy) -> dict:
    """The demo manifest as release 1 wrote it: schema_version 1, no onnx_encoders."""
    data = json.loads((copy / "manifest.json").read_text())
    data["schema_version"] = 1
    data.pop("onnx_encoders")
    (copy / "manifest.json").write_text(json.dumps(data))
    return data


def test_schema_1_manifest_is_upgraded_on_load(copy):
    from service.runtime.artifact import SCHEMA_VERSION, upgrade_v1

    _as_schema_1(copy)
    m = load_manifest(copy)
    assert SCHEMA_VERSION == 3 and m.schema_version == 3
    assert m.onnx_encoders == {"fp32": "encoder.onnx"} and m.onnx_file("fp16") is None
    # the named step on its own: fills only what is missing
    assert upgrade_v1({"files": {"encoder.onnx": {}}})["onnx_encoders"] == {"fp32": "encoder.onnx"}
    kept = {"files": {"encoder.onnx": {}, "e16.onnx": {}}, "onnx_encoders": {"fp32": "encoder.onnx", "fp16": "e16.onnx"}}
    assert upgrade_v1(dict(kept))["onnx_encoders"] == kept["onnx_encoders"]


def test_upgraded_manifest_serves_like_the_original(copy, demo_artifact):
    """An artifact read through the upgrade answers exactly as the current one."""
    import numpy as np

    from service.runtime.detector import Detector

    _as_schema_1(copy)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 112, 112), dtype=np.float32)
    allowed = np.ones((2, 7), bool)
    a = Detector.load(copy).infer(pixels, allowed)
    b = Detector.load(demo_artifact).infer(pixels, allowed)
    np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)


def test_newer_schema_is_refused_naming_the_file(copy):
    data = json.loads((copy / "manifest.json").read_text())
    data["schema_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"manifest\.json: schema_version 99 was written by a newer dapo-inspect"):
        load_manifest(copy)


@pytest.mark.parametrize("version", [0, "2", None])
def test_nonsense_schema_version_is_refused(copy, version):
    data = json.loads((copy / "manifest.json").read_text())
    data["schema_version"] = version
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"manifest\.json: invalid manifest: schema_version"):
        load_manifest(copy)


def test_a_manifest_object_must_carry_the_current_schema(demo_artifact):
    from service.runtime.artifact import Manifest

    data = json.loads((demo_artifact / "manifest.json").read_text())
    data["schema_version"] = 1
    with pytest.raises(ValueError, match="read_manifest, which upgrades"):
        Manifest.model_validate(data)
