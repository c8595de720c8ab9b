"""The runtime's Detector on the real demo artifact: the one way every caller predicts.

References are independent of the Detector's own composition: the recorded /detect answers
(`fixtures/detect_demo_golden.json`) and the bare backend run on hand-made inputs.
"""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from golden_compare import Diffs, compare_results
from test_detect_golden import GOLDEN, images

from service.runtime import imaging
from service.runtime.artifact import ArtifactError, load_manifest
from service.runtime.backends import create_backend
from service.runtime.detector import Detector, ImageLimits, RuntimeOptions, Upload
from service.runtime.postprocess import RenderOptions
from service.runtime.scoring import ScoringError

LIMITS = ImageLimits(max_pixels=40_000_000, max_side=16384)


@pytest.fixture(scope="module")
def detector(demo_artifact) -> Detector:
    return Detector.load(demo_artifact, RuntimeOptions(backend="onnxruntime"))


@pytest.mark.parametrize("product", [None, "disc"])
def test_predict_renders_the_recorded_detect_fields(detector, golden_fragile, product):
    """predict(bytes) == what /detect answered when the golden file was recorded (within
    golden_compare's cross-CPU tolerances: the file may come from another CPU)."""
    key = f"mask_format=rle|{product}"
    recorded = json.loads(json.loads(GOLDEN.read_text())[key])["results"]
    uploads = [Upload(name, blob) for name, blob in images()]
    results = detector.predict(uploads, detector.policy(product), RenderOptions("rle"), limits=LIMITS, batch_size=3)
    assert [r.filename for r in results] == [r["filename"] for r in recorded]
    for got, want in zip(results, recorded):
        want = {k: v for k, v in want.items() if k not in ("filename", "product")}
        diffs = compare_results(got.fields, want, golden_fragile[key][got.filename], Diffs())
        assert not diffs, "\n".join(diffs.lines)
        assert got.scores.is_anomalous == want["is_anomalous"]
        assert (got.width, got.height) == (want["width"], want["height"])


def test_scores_match_the_bare_backend(detector, demo_artifact):
    """Scores-only predict on PIL images == the backend run by hand on imaging.preprocess."""
    pil = [Image.open(io.BytesIO(blob)).convert("RGB") for _, blob in images()]
    results = detector.predict(pil, class_probs=True)
    m = load_manifest(demo_artifact)
    pixels = np.stack([imaging.preprocess(im, m.image_size, m.mean, m.std) for im in pil])
    raw = create_backend(demo_artifact, m).run(pixels, np.ones((len(pil), len(m.vocabulary)), bool),
                                               class_probs=True)
    for i, r in enumerate(results):
        assert r.fields is None
        assert r.scores.anomaly_score == pytest.approx(float(raw.anomaly_score[i]), abs=1e-6)  # "global", no smoothing
        np.testing.assert_allclose(r.scores.anomaly_map, raw.anomaly_map[i], atol=1e-6)
        np.testing.assert_allclose(r.scores.class_probs, raw.class_probs[i], atol=1e-6)
        assert r.scores.is_anomalous == (r.scores.anomaly_score >= m.image_threshold)


def test_policy_overrides_change_the_score_mode_and_smoothing(detector):
    pil = [Image.open(io.BytesIO(images()[1][1])).convert("RGB")]
    base = detector.policy()
    plain = detector.predict(pil, base)[0].scores
    fused = detector.predict(pil, detector.policy(image_score="global_max"))[0].scores
    assert fused.anomaly_score == pytest.approx(0.5 * (plain.anomaly_score + float(plain.anomaly_map.max())))
    smoothed = detector.predict(pil, detector.policy(gaussian_sigma=2.0))[0].scores
    assert smoothed.anomaly_map.max() < plain.anomaly_map.max()  # a Gaussian lowers a peak
    assert smoothed.anomaly_score == plain.anomaly_score  # global mode ignores the map


def test_policy_resolves_products_and_refuses_unknown_names(detector):
    m = detector.manifest
    disc = detector.policy("disc")
    assert list(np.nonzero(~disc.allowed)[0]) == [i for i, n in enumerate(m.class_names)
                                                  if i and n not in m.products["disc"].defect_types]
    assert detector.policy(threshold=0.2).image_threshold == 0.2
    with pytest.raises(ScoringError, match="unknown product"):
        detector.policy("gear")
    with pytest.raises(ScoringError, match="unknown defect types"):
        detector.policy(defect_types=["unicorn"])


def test_bytes_need_limits_and_are_checked_against_them(detector):
    name, blob = images()[3]  # 333 x 333
    with pytest.raises(ValueError, match="ImageLimits"):
        detector.prepare(Upload(name, blob))
    with pytest.raises(imaging.ImageError) as info:
        detector.prepare(Upload(name, blob), ImageLimits(max_pixels=100 * 100, max_side=16384))
    assert info.value.status == 413 and name in str(info.value)


def test_load_verifies_the_files_and_names_the_tampered_one(demo_artifact, tmp_path):
    copy = tmp_path / "a"
    shutil.copytree(demo_artifact, copy)
    with open(copy / "text_features.safetensors", "r+b") as f:  # one bit of a float, at the end
        f.seek(-1, 2)
        byte = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ArtifactError, match="text_features.safetensors"):
        Detector.load(copy)
    unverified = Detector.load(copy, RuntimeOptions(verify=False))  # the caller's choice, loads
    assert unverified.name == "dapo-demo" and unverified.backend.name == "onnxruntime"


def test_torch_backend_gives_the_same_scores(detector, demo_artifact):
    pil = [Image.open(io.BytesIO(blob)).convert("RGB") for _, blob in images()[:2]]
    torch_detector = Detector.load(demo_artifact, RuntimeOptions(backend="torch", device="cpu"))
    assert torch_detector.backend.name == "torch"
    for a, b in zip(detector.predict(pil), torch_detector.predict(pil)):
        assert a.scores.anomaly_score == pytest.approx(b.scores.anomaly_score, abs=1e-4)
