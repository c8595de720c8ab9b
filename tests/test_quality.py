"""Quality metrics for the line (service/server/quality.py, service/runtime/drift.py).

Counts are checked against the /detect answers themselves (verdicts, defect types and scores
the client received), through the real app on the demo artifact. Drift is checked with
`dapo synth` textures: a copy of the demo artifact calibrated on wood, then fed the very same
wood images (PSI exactly 0: the service scores what calibration scored), fresh wood (flat), and
carpet (a shift). The PSI references are computed here from the answers' scores with
np.histogram and the textbook formula, and the formula itself against a hand computation.
"""
from __future__ import annotations

import io
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from service.runtime.artifact import Product, ScoreBaseline, load_manifest
from service.runtime.drift import SCORE_TOLERANCE as TOL, baseline_from_scores, bin_counts, drift_of, psi
from service.server.app import create_app
from service.server.quality import QualityMetrics, QualityOptions
from service.server.settings import Settings

from quality_util import CALIBRATION_IMAGES, DRIFT_BINS, good_images as good


# --- helpers ------------------------------------------------------------------------------
def samples(client: TestClient, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called `name` in /metrics."""
    out = []
    for family in text_string_to_metric_families(client.get("/metrics").text):
        out += [(s.labels, s.value) for s in family.samples if s.name == name]
    return out


def value(client: TestClient, name: str, **labels: str) -> float | None:
    found = [v for lab, v in samples(client, name) if lab == labels]
    assert len(found) <= 1
    return found[0] if found else None


def png(seed: int, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def detect(client: TestClient, images: list[bytes], data: dict | None = None, params: dict | None = None,
           headers: dict | None = None) -> list[dict]:
    files = [("image", (f"{i}.png", b, "image/png")) for i, b in enumerate(images)]
    r = client.post("/detect", files=files, data=data or {}, params=params or {}, headers=headers or {})
    assert r.status_code == 200, r.text
    return r.json()["results"]


def reference_psi(baseline: ScoreBaseline, scores: list[float]) -> float:
    """PSI with half an image added to every bin, from np.histogram (not the service's binning)."""
    edges = np.r_[-np.inf, baseline.cuts, np.inf]
    actual = np.histogram(scores, edges)[0] + 0.5
    expected = np.asarray(baseline.fractions) * baseline.images + 0.5
    a, e = actual / actual.sum(), expected / expected.sum()
    return float(sum((ai - ei) * math.log(ai / ei) for ai, ei in zip(a, e)))


# --- the statistics by hand --------------------------------------------------------------
def test_baseline_psi_and_mean_shift_by_hand():
    b = baseline_from_scores([0.1, 0.2, 0.3, 0.4], bins=2)
    # one quantile cut at the median 0.25 between the range's ends: bins (-inf, .1) [.1, .25)
    # [.25, .4] (.4, inf), the ends widened by the scores' reporting tolerance; std = sqrt(mean of .15^2, .05^2, .05^2, .15^2) = sqrt(.0125)
    assert b.cuts == pytest.approx([0.1 - TOL, 0.25, 0.4 + TOL], abs=1e-12)  # the range's ends widened
    assert b.fractions == [0.0, 0.5, 0.5, 0.0] and b.images == 4
    assert (b.mean, b.std) == (pytest.approx(0.25), pytest.approx(math.sqrt(0.0125)))
    d = drift_of(b, np.array([0.1, 0.1, 0.1, 0.3]))
    # counts 0 3 1 0 plus half an image per bin: window (.5, 3.5, 1.5, .5) / 6, baseline
    # (.5, 2.5, 2.5, .5) / 6. PSI = (1/6) ln(3.5/2.5) + (-1/6) ln(1.5/2.5)
    assert d.psi == pytest.approx((math.log(1.4) + math.log(5 / 3)) / 6)
    assert d.mean_shift == pytest.approx((0.15 - 0.25) / math.sqrt(0.0125)) and d.images == 4
    assert drift_of(b, np.array([0.1, 0.2, 0.3, 0.4])).psi == 0.0  # the baseline's own images
    # outside the calibration range, one below and one above: window (1.5, .5, .5, 1.5) / 4 =
    # (3/8, 1/8, 1/8, 3/8) vs (1/12, 5/12, 5/12, 1/12); each outer bin adds 7/24 ln(9/2), each
    # inner one -7/24 ln(3/10)
    assert drift_of(b, np.array([0.05, 0.5])).psi == pytest.approx(7 / 12 * (math.log(4.5) + math.log(10 / 3)))


def test_baseline_bins_merge_ties_and_bad_input_is_refused():
    # quartiles of five 0.2s and five 0.5s: 0.2, 0.35, 0.5; the one at the minimum merges with
    # the range's start: bins (-inf, .2-) [.2-, .35) [.35, .5) [.5, .5+) [.5+, inf)
    b = baseline_from_scores([0.2] * 5 + [0.5] * 5, bins=4)
    assert b.cuts == pytest.approx([0.2 - TOL, 0.35, 0.5, 0.5 + TOL], abs=1e-12)
    assert b.fractions == [0.0, 0.5, 0.0, 0.5, 0.0]
    assert list(bin_counts(b.cuts, np.array([0.35, 0.5, 0.1, 0.9]))) == [1, 0, 1, 1, 1]  # [lo, hi)
    constant = baseline_from_scores([0.3] * 6)
    assert constant.cuts == pytest.approx([0.3 - TOL, 0.3 + TOL], abs=1e-12) and constant.std == 0.0
    assert drift_of(constant, np.array([0.3])).mean_shift == 0.0
    assert drift_of(constant, np.full(6, 0.3)).psi == 0.0  # (a window of another size differs by smoothing)
    assert drift_of(constant, np.array([0.31])).mean_shift > 1e3  # finite, large
    assert drift_of(constant, np.array([0.31])).psi > 0.25
    for bad in ([], [0.1, float("nan")]):
        with pytest.raises(ValueError):
            baseline_from_scores(bad)
    with pytest.raises(ValueError):
        baseline_from_scores([0.1, 0.2], bins=1)
    with pytest.raises(ValueError):
        drift_of(b, np.array([]))
    with pytest.raises(ValueError):
        psi(np.array([0.5, 0.5]), np.array([1.0, 0.0]))


def test_manifest_baseline_is_optional_and_checked(demo_artifact):
    manifest = load_manifest(demo_artifact)  # written without baselines: still loads
    assert all(p.baseline is None for p in manifest.products.values())
    b = baseline_from_scores([0.1, 0.2, 0.3, 0.4], bins=2)
    assert Product.model_validate_json(Product(baseline=b).model_dump_json()).baseline == b
    for broken in ({"cuts": [0.2], "fractions": [1.0]}, {"cuts": [0.3, 0.2], "fractions": [0.3, 0.3, 0.4]},
                   {"cuts": [0.2], "fractions": [0.7, 0.7]}):
        with pytest.raises(ValidationError):
            ScoreBaseline(mean=0.2, std=0.1, images=4, **broken)


def test_station_allow_list_is_bounded():
    assert Settings(quality_stations="line-1, line-2,line-1").quality_stations == ["line-1", "line-2"]
    for bad in ("line-1,other", "none", ",".join(f"s{i}" for i in range(257)), "x" * 65):
        with pytest.raises(ValidationError):
            Settings(quality_stations=bad)
    with pytest.raises(ValidationError):
        Settings(drift_window=20, drift_min_images=21)


# --- counts after known /detect calls ----------------------------------------------------------
def test_counts_follow_the_answers(demo_artifact):
    app = create_app(Settings(artifact=demo_artifact), configure_logs=False)
    with TestClient(app) as client:
        answered: list[tuple[str, dict]] = []  # (product label, result) of every counted image
        forced = detect(client, [png(i) for i in range(3)], {"product": "disc", "station_id": "S-17"},
                        {"threshold": 0.0})
        assert all(r["is_anomalous"] for r in forced)  # score >= 0: every verdict is anomalous
        answered += [("disc", r) for r in forced]
        passed = detect(client, [png(10), png(11)], {"product": "plate"}, {"threshold": 1.0})
        assert not any(r["is_anomalous"] for r in passed)
        answered += [("plate", r) for r in passed]
        answered += [("none", r) for r in detect(client, [png(20)])]  # no product field
        key = {"Idempotency-Key": "retry-1"}
        once = detect(client, [png(30)], {"product": "disc"}, {"threshold": 0.0}, key)
        assert detect(client, [png(30)], {"product": "disc"}, {"threshold": 0.0}, key) == once  # replayed
        answered += [("disc", r) for r in once]
        bad = client.post("/detect", files=[("image", ("a.png", png(1), "image/png")),
                                            ("image", ("b.png", b"not an image", "image/png"))])
        assert bad.status_code == 415  # undecodable: nothing of this request is counted
        unknown = client.post("/detect", files=[("image", ("a.png", png(1), "image/png"))], data={"product": "tyre"})
        assert unknown.status_code == 422

        verdicts = Counter((p, "anomalous" if r["is_anomalous"] else "normal") for p, r in answered)
        got = {(lab["product"], lab["verdict"]): v for lab, v in samples(client, "dapo_inspections_total")}
        assert got == dict(verdicts)
        assert all("station_id" not in lab for lab, _ in samples(client, "dapo_inspections_total"))  # no allow-list
        defects = Counter((p, d["name"]) for p, r in answered if r["is_anomalous"] for d in r["defect_types"])
        assert defects, "the forced-anomalous images should name some defect types"
        got = {(lab["product"], lab["defect_type"]): v for lab, v in samples(client, "dapo_defects_total")}
        assert got == dict(defects)
        for product in ("disc", "plate", "none"):
            scores = np.array([r["anomaly_score"] for p, r in answered if p == product])
            assert value(client, "dapo_anomaly_score_count", product=product) == len(scores)
            assert value(client, "dapo_anomaly_score_sum", product=product) == pytest.approx(scores.sum(), abs=1e-5)
            for lab, v in samples(client, "dapo_anomaly_score_bucket"):
                if lab["product"] == product:
                    assert v == np.sum(scores <= float(lab["le"])), lab
        assert samples(client, "dapo_score_drift_psi") == []  # the demo artifact has no baseline
        assert samples(client, "dapo_score_drift_window_images") == []


def test_station_label_with_an_allow_list(demo_artifact):
    app = create_app(Settings(artifact=demo_artifact, quality_stations="line-1,line-2"), configure_logs=False)
    with TestClient(app) as client:
        for station in ("line-1", "line-1", "line-9", None):
            detect(client, [png(5)], {"product": "disc", **({"station_id": station} if station else {})},
                   {"threshold": 1.0})
        got = {lab["station_id"]: v for lab, v in samples(client, "dapo_inspections_total")}
        assert got == {"line-1": 2.0, "other": 1.0, "none": 1.0}  # unlisted folds into `other`


# --- drift against a calibrated baseline -------------------------------------------------------
def stream(client: TestClient, paths: list[Path], product: str = "wood", **data: str) -> list[float]:
    scores = []
    for i in range(0, len(paths), 8):
        results = detect(client, [p.read_bytes() for p in paths[i:i + 8]], {"product": product, **data})
        scores += [r["anomaly_score"] for r in results]
    return scores


def test_drift_is_flat_on_good_parts_and_rises_on_a_shift(wood_artifact, textures):
    baseline = load_manifest(wood_artifact).products["wood"].baseline
    assert baseline is not None and baseline.images == CALIBRATION_IMAGES and len(baseline.cuts) == DRIFT_BINS + 1
    settings = Settings(artifact=wood_artifact, drift_window=CALIBRATION_IMAGES, drift_min_images=12)
    wood, carpet = good(textures, "wood"), good(textures, "carpet")
    with TestClient(create_app(settings, configure_logs=False)) as client:
        first = stream(client, wood[:8])
        assert value(client, "dapo_score_drift_window_images", product="wood") == 8
        assert value(client, "dapo_score_drift_psi", product="wood") is None  # fewer than drift_min_images

        # the calibration images themselves: the service scores exactly what calibration scored
        calib = first + stream(client, wood[8:CALIBRATION_IMAGES])
        assert np.mean(calib) == pytest.approx(baseline.mean, abs=1e-6)
        assert np.std(calib) == pytest.approx(baseline.std, abs=1e-6)
        assert value(client, "dapo_score_drift_psi", product="wood") == pytest.approx(0.0, abs=1e-9)
        assert value(client, "dapo_score_mean_shift", product="wood") == pytest.approx(0.0, abs=1e-3)

        # fresh good parts of the same texture: flat
        fresh = stream(client, wood[CALIBRATION_IMAGES:])
        flat = value(client, "dapo_score_drift_psi", product="wood")
        assert flat == pytest.approx(reference_psi(baseline, fresh), rel=1e-9)
        assert flat < 0.25 and abs(value(client, "dapo_score_mean_shift", product="wood")) < 1.0

        # another material arrives under the same product: half the window, then all of it
        half = stream(client, carpet[:CALIBRATION_IMAGES // 2])
        window = fresh[CALIBRATION_IMAGES // 2:] + half  # the last drift_window scores
        assert value(client, "dapo_score_drift_psi", product="wood") == pytest.approx(
            reference_psi(baseline, window), rel=1e-9)
        rest = stream(client, carpet[CALIBRATION_IMAGES // 2:CALIBRATION_IMAGES])
        shifted = value(client, "dapo_score_drift_psi", product="wood")
        assert shifted == pytest.approx(reference_psi(baseline, half + rest), rel=1e-9)
        assert shifted > 1.0 and shifted > 5 * flat
        shift = value(client, "dapo_score_mean_shift", product="wood")
        assert shift == pytest.approx((np.mean(half + rest) - baseline.mean) / baseline.std, rel=1e-6)
        assert abs(shift) > 5
        assert value(client, "dapo_score_drift_window_images", product="wood") == CALIBRATION_IMAGES
        assert samples(client, "dapo_score_drift_psi") == [({"product": "wood"}, shifted)]  # only baselined products


def test_a_new_model_starts_new_drift_windows(wood_artifact, demo_artifact):
    calibrated, plain = load_manifest(wood_artifact), load_manifest(demo_artifact)
    registry = CollectorRegistry()
    quality = QualityMetrics(registry, QualityOptions(drift_window=10, drift_min_images=2))
    results = [{"anomaly_score": 0.9, "is_anomalous": True, "defect_types": [{"name": "scratch"}]}] * 2
    quality.observe(calibrated, results, {"product": "wood"})
    assert registry.get_sample_value("dapo_score_drift_window_images", {"product": "wood"}) == 2
    assert registry.get_sample_value("dapo_score_drift_psi", {"product": "wood"}) > 0.25
    quality.observe(plain, results[:1], {"product": "disc"})  # a reload to a model without baselines
    assert registry.get_sample_value("dapo_score_drift_psi", {"product": "wood"}) is None
    assert registry.get_sample_value("dapo_score_drift_window_images", {"product": "wood"}) is None
    assert registry.get_sample_value("dapo_inspections_total", {"product": "wood", "verdict": "anomalous"}) == 2
    # a product or a defect type outside the model's sets folds into `other`
    quality.observe(plain, [{"anomaly_score": 0.7, "is_anomalous": True, "defect_types": [{"name": "burr"}]}],
                    {"product": "tyre"})
    assert registry.get_sample_value("dapo_defects_total", {"product": "other", "defect_type": "other"}) == 1
