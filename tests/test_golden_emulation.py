"""The golden checks on an emulated other CPU: they must pass there, and still catch real change.

Two emulations of another CPU's last bits (see golden_compare for the checks themselves):
- the demo artifact baked in a subprocess under another `ATEN_CPU_CAPABILITY` (PyTorch then
  picks other kernels, so the exported weights and text features differ in their last bits);
- a test backend (perturbed_backend.PerturbedBackend) that moves every encoder output a few
  float32 ulps with np.nextafter and recomputes the type argmax from the moved probabilities.

Planted real changes, each applied to one emulated answer, must be rejected: a score moved by
1e-4, a threshold moved by 1e-3, one region dropped, a mask shifted by one pixel, a heatmap
level moved by two.
"""
from __future__ import annotations

import base64
import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from golden_compare import (ENCODER_ULPS, Diffs, compare_bodies, compare_results, decode_png)
from perturbed_backend import PerturbedBackend
from PIL import Image
from pycocotools import mask as mask_utils
from test_detect_golden import GOLDEN, assert_answers_match_the_recording, fragile_maps, record

from service.runtime.artifact import load_manifest
from service.runtime.backends import create_backend

ROOT = Path(__file__).resolve().parents[1]


def other_capability() -> str:
    """An ATEN_CPU_CAPABILITY other than the one this process runs under."""
    import torch

    return "avx2" if torch.backends.cpu.get_cpu_capability().lower() == "default" else "default"


@pytest.fixture(scope="module")
def other_isa_artifact(tmp_path_factory) -> Path:
    """The demo artifact baked in a subprocess under another ATEN_CPU_CAPABILITY."""
    folder = tmp_path_factory.mktemp("other-isa") / "demo"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": other_capability(),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    code = "import sys; from training.bake import bake_demo; bake_demo(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(folder)], env=env, check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, timeout=600)
    return folder


@pytest.fixture(scope="module")
def other_isa_answers(other_isa_artifact) -> dict[str, str]:
    return record(other_isa_artifact)


@pytest.fixture(scope="module")
def other_isa_fragile(other_isa_artifact) -> dict[str, dict[str, np.ndarray]]:
    return fragile_maps(other_isa_artifact)


def test_golden_checks_pass_on_an_artifact_baked_under_another_cpu_capability(
        demo_artifact, other_isa_artifact, other_isa_answers, other_isa_fragile):
    if (demo_artifact / "encoder.onnx").read_bytes() == (other_isa_artifact / "encoder.onnx").read_bytes():
        pytest.skip(f"ATEN_CPU_CAPABILITY={other_capability()} bakes the same bytes on this CPU: nothing emulated")
    assert_answers_match_the_recording(other_isa_answers, other_isa_fragile,
                                       f"(artifact baked under ATEN_CPU_CAPABILITY={other_capability()})")


def test_golden_checks_pass_with_encoder_outputs_moved_by_a_few_ulps(demo_artifact, golden_fragile):
    backend = PerturbedBackend(create_backend(demo_artifact, load_manifest(demo_artifact)), ulps=ENCODER_ULPS // 2)
    answers = record(demo_artifact, backend=backend)
    recorded = json.loads(GOLDEN.read_text())
    assert any(answers[k] != recorded[k] for k in recorded), "the perturbation changed no answer byte"
    assert_answers_match_the_recording(answers, golden_fragile, f"(encoder outputs moved {backend.ulps} ulps)")


# --- planted real changes -------------------------------------------------------------------------
def _b64_png(arr: np.ndarray, palette: list[int] | None = None) -> str:
    img = Image.fromarray(arr)
    if palette is not None:
        img.putpalette(palette)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _move_score(body: dict, _fragile) -> None:
    body["results"][0]["anomaly_score"] += 1e-4


def _move_type_score(body: dict, _fragile) -> None:
    body["results"][1]["defect_types"][0]["score"] += 1e-4


def _move_region_score(body: dict, _fragile) -> None:
    body["results"][2]["regions"][0]["score"] -= 1e-4


def _move_threshold(body: dict, _fragile) -> None:
    body["results"][0]["threshold"] += 1e-3


def _drop_region(body: dict, fragile) -> None:
    for r in body["results"]:
        x, y, w, h = r["regions"][0]["bbox"]
        if not fragile[r["filename"]][y:y + h, x:x + w].any():
            del r["regions"][0]
            return
    raise AssertionError("every first region touches a fragile pixel: pick another image")


def _shift_rle_mask(body: dict, _fragile) -> None:
    r = body["results"][1]
    name, rle = next(iter(r["mask"]["rle"].items()))
    bits = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")})
    shifted = np.asfortranarray(np.roll(bits, 1, axis=1))
    rle["counts"] = mask_utils.encode(shifted)["counts"].decode("ascii")


def _shift_png_mask(body: dict, _fragile) -> None:
    r = body["results"][1]
    with Image.open(io.BytesIO(base64.b64decode(r["mask"]["png"]))) as img:
        palette = img.getpalette()
        arr = np.asarray(img)
    r["mask"]["png"] = _b64_png(np.ascontiguousarray(np.roll(arr, 1, axis=0)), palette)


def _heatmap_two_levels(body: dict, _fragile) -> None:
    r = body["results"][0]
    heat = decode_png(r["heatmap_png"]).copy()
    heat[heat.shape[0] // 2, heat.shape[1] // 2] += 2 if heat[heat.shape[0] // 2, heat.shape[1] // 2] < 250 else -2
    r["heatmap_png"] = _b64_png(heat)


def _heatmap_floor(body: dict, _fragile) -> None:
    """Every level one lower where it can be: what floor instead of round does to a heatmap."""
    r = body["results"][1]
    heat = decode_png(r["heatmap_png"]).astype(int)
    r["heatmap_png"] = _b64_png(np.where(np.arange(heat.size).reshape(heat.shape) % 2 == 0,
                                         np.maximum(heat - 1, 0), heat).astype(np.uint8))


PLANTED = {
    "anomaly-score+1e-4": ("mask_format=rle|None", _move_score),
    "defect-type-score+1e-4": ("mask_format=rle|disc", _move_type_score),
    "region-score-1e-4": ("mask_format=rle|plate", _move_region_score),
    "threshold+1e-3": ("mask_format=rle&threshold=0.2|None", _move_threshold),
    "one-region-dropped": ("mask_format=rle|None", _drop_region),
    "rle-mask-shifted-1px": ("mask_format=rle|None", _shift_rle_mask),
    "png-mask-shifted-1px": ("mask_format=png|plate", _shift_png_mask),
    "heatmap-level+2": ("mask_format=none&heatmap=true|None", _heatmap_two_levels),
    "heatmap-half-the-levels-1": ("mask_format=none&heatmap=true|disc", _heatmap_floor),
}


@pytest.mark.parametrize("change", sorted(PLANTED))
def test_a_planted_real_change_is_rejected_on_the_emulated_cpu(other_isa_answers, other_isa_fragile, change):
    key, plant = PLANTED[change]
    fragile = other_isa_fragile[key]
    body = json.loads(other_isa_answers[key])
    recorded = json.loads(json.loads(GOLDEN.read_text())[key])
    assert not compare_bodies(body, recorded, fragile), "the emulated answer itself must match"
    planted = copy.deepcopy(body)
    plant(planted, fragile)
    assert planted != body
    diffs = compare_bodies(planted, recorded, fragile)
    assert diffs, f"planted change {change!r} was not caught"


# --- the pixel rule itself ------------------------------------------------------------------------
def _result_with_mask(classes: np.ndarray) -> dict:
    h, w = classes.shape
    rle = mask_utils.encode(np.asfortranarray((classes == 1).astype(np.uint8)))
    return {"width": w, "height": h, "mask": {"format": "rle", "label_map": {"0": "normal", "1": "hole"},
                                              "rle": {"hole": {"size": [h, w], "counts": rle["counts"].decode()}}}}


@pytest.mark.parametrize("near_threshold", [True, False])
def test_a_flipped_pixel_passes_only_where_its_decision_was_near_the_threshold(near_threshold):
    want = np.zeros((6, 8), np.uint8)
    want[1:4, 2:5] = 1
    got = want.copy()
    got[4, 4] = 1  # one pixel more of "hole"
    fragile = np.zeros_like(want, bool)
    fragile[4, 4] = near_threshold
    diffs = compare_results(_result_with_mask(got), _result_with_mask(want), fragile, Diffs())
    assert bool(diffs) is not near_threshold, diffs.lines


@pytest.mark.parametrize("near_threshold", [True, False])
def test_a_region_may_vanish_only_when_its_box_holds_a_fragile_pixel(near_threshold):
    region = {"defect_type": "hole", "bbox": [2, 1, 3, 3], "area_px": 9, "score": 0.7}
    want = {"width": 8, "height": 6, "regions": [dict(region)]}
    got = {"width": 8, "height": 6, "regions": []}
    fragile = np.zeros((6, 8), bool)
    fragile[2, 3] = near_threshold
    assert bool(compare_results(got, want, fragile, Diffs())) is not near_threshold


def test_the_same_machine_check_compares_two_recordings_byte_for_byte(tmp_path, capsys):
    from record_golden import compare

    answers = json.loads(GOLDEN.read_text())
    (tmp_path / "before.json").write_text(json.dumps(answers))
    (tmp_path / "same.json").write_text(json.dumps(answers))
    key = sorted(answers)[0]
    changed = {**answers, key: answers[key].replace("0.", "0.0", 1)}
    (tmp_path / "after.json").write_text(json.dumps(changed))
    assert compare(tmp_path / "before.json", tmp_path / "same.json") == 0
    assert compare(tmp_path / "before.json", tmp_path / "after.json") == 1
    assert f"differs: {key}" in capsys.readouterr().out
