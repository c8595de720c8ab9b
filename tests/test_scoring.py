"""Per-call scoring policy: product filters, thresholds, overrides, smoothing."""
from __future__ import annotations

import numpy as np
import pytest

from service.runtime.artifact import load_manifest
from service.runtime.scoring import ScoringError, allowed_classes, final_type_map, policy, smooth


def test_product_and_override_filters(demo_artifact):
    m = load_manifest(demo_artifact)
    names = m.class_names
    assert allowed_classes(m).all()
    disc = allowed_classes(m, "disc")
    assert [n for n, a in zip(names, disc) if a] == ["normal", "scratch", "hole", "crack"]
    only = allowed_classes(m, "disc", ["bent"])
    assert [n for n, a in zip(names, only) if a] == ["normal", "bent"]
    with pytest.raises(ScoringError, match="unknown product 'gear'"):
        allowed_classes(m, "gear")
    with pytest.raises(ScoringError, match=r"unknown defect types \['warp'\]"):
        allowed_classes(m, None, ["warp"])


def test_thresholds_resolve_product_then_call(demo_artifact):
    m = load_manifest(demo_artifact)
    assert policy(m).image_threshold == 0.5
    assert policy(m, "plate").image_threshold == 0.6
    assert policy(m, "plate", threshold=0.9).image_threshold == 0.9
    with pytest.raises(ScoringError, match="threshold"):
        policy(m, threshold=1.5)


def test_pixel_threshold_clears_weak_pixels():
    types = np.array([[1, 2], [3, 0]], np.uint8)
    amap = np.array([[0.9, 0.2], [0.6, 0.9]], np.float32)
    assert (final_type_map(types, amap, None) == types).all()
    assert final_type_map(types, amap, 0.5).tolist() == [[1, 0], [3, 0]]


def test_smoothing_is_off_by_default_and_spreads_when_on():
    a = np.zeros((81, 81), np.float32)
    a[40, 40] = 1
    assert smooth(a, 0.0) is a
    s = smooth(a, 4.0)  # far from the border: mass kept, peak spread over ~2*pi*sigma^2 pixels
    assert s[40, 40] < 0.05 and s[40, 44] > 0 and abs(s.sum() - 1) < 1e-3


def test_image_score_modes():
    from service.runtime.scoring import image_score

    amap = np.array([[0.1, 0.9], [0.2, 0.3]], np.float32)
    assert image_score(0.4, amap) == pytest.approx(0.4)  # DAPO's global score by default
    assert image_score(0.4, amap, "global_max") == pytest.approx(0.65)
    with pytest.raises(ValueError, match="unknown image score"):
        image_score(0.4, amap, "mean")


def test_policy_carries_the_manifest_image_score(demo_artifact):
    m = load_manifest(demo_artifact)
    assert policy(m).image_score == "global"
    assert policy(m.model_copy(update={"image_score": "global_max"})).image_score == "global_max"


def test_both_thresholds_are_inclusive():
    """API.md: anomalous when score >= threshold; a pixel AT the pixel threshold keeps its type."""
    from service.runtime.scoring import is_anomalous

    assert is_anomalous(0.5, 0.5) is True and is_anomalous(np.nextafter(0.5, 0), 0.5) is False
    types = np.array([[1, 2, 3]], np.uint8)
    amap = np.array([[0.5, np.nextafter(np.float32(0.5), np.float32(0)), 0.75]], np.float32)
    assert final_type_map(types, amap, 0.5).tolist() == [[1, 0, 3]]


def test_smoothing_equals_scipy_with_nearest_borders():
    """The reference: scipy's Gaussian with the border pixel repeated (not mirrored)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    a = rng.random((20, 24)).astype(np.float32)
    a[:, :3] = 1.0  # a bright border: border modes differ most here
    np.testing.assert_allclose(smooth(a, 2.0), gaussian_filter(a.astype(np.float64), 2.0, mode="nearest"),
                               rtol=0, atol=1e-5)
    assert np.abs(smooth(a, 2.0) - gaussian_filter(a, 2.0, mode="reflect")).max() > 1e-3
