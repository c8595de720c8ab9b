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
