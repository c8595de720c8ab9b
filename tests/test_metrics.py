"""Each metric against small hand-computed values; degenerate inputs give NaN + a reason."""
import math
import warnings

import numpy as np
import pytest

from training.metrics import (
    DegenerateMetricWarning, aupro, average_precision, binary_metrics, image_ap, image_auroc,
    image_max_f1, max_f1, mean_over, multitype_pixel_metrics, pixel_auroc, pro_curve,
)

LABELS = [0, 0, 1, 1]
SCORES = [0.1, 0.4, 0.35, 0.8]


def test_image_auroc():
    # positive/negative pairs ranked right: 0.35>0.1, 0.35<0.4 (wrong), 0.8>0.1, 0.8>0.4 -> 3/4
    assert image_auroc(LABELS, SCORES) == pytest.approx(0.75)


def test_image_ap():
    # ranked: 0.8(+) 0.4(-) 0.35(+) 0.1(-). AP = sum (R_k - R_{k-1}) * P_k
    #   = 0.5 * 1 + 0.5 * 2/3 = 0.8333
    assert image_ap(LABELS, SCORES) == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_max_f1():
    # t=0.8: P=1,R=.5 -> F1=2/3; t=0.4: P=.5,R=.5 -> .5; t=0.35: P=2/3,R=1 -> 0.8; t=0.1: P=.5,R=1 -> 2/3
    f1, t = max_f1(LABELS, SCORES, return_threshold=True)
    assert f1 == pytest.approx(0.8) and t == pytest.approx(0.35)
    assert image_max_f1(LABELS, SCORES) == pytest.approx(0.8)


def test_pixel_auroc():
    masks = np.array([[[1, 0], [0, 0]]])
    maps = np.array([[[0.9, 0.2], [0.5, 0.95]]])
    # one defect pixel (0.9) vs normals 0.2, 0.5, 0.95: beats two of three -> 2/3
    assert pixel_auroc(masks, maps) == pytest.approx(2 / 3)


def test_aupro_by_hand():
    # Two 1x4 images. A: gt [1 1 0 0], scores [.9 .8 .3 .1] -> region R1 of 2 px.
    #                 B: gt [0 0 1 0], scores [.7 .2 .6 .4] -> region R2 of 1 px.
    # 5 normal pixels (.3 .1 .7 .2 .4): each adds 1/5 = 0.2 to FPR.
    # 2 regions: PRO = mean of per-region overlap; an R1 pixel adds (1/2)/2 = .25, the R2 pixel .5.
    # Thresholds, descending (FPR, PRO): start (0,0); .9 -> (0,.25); .8 -> (0,.5); .7 -> (.2,.5);
    #   .6 -> (.2,1); .4 -> (.4,1); .3 -> (.6,1); .2 -> (.8,1); .1 -> (1,1).
    # Area up to FPR .3: 0.2 * 0.5 (FPR 0..0.2 at PRO .5) + 0.1 * 1 (0.2..0.3 at PRO 1) = 0.2;
    # normalised by 0.3 -> 0.6667. Up to FPR 1: 0.2*0.5 + 0.8*1 = 0.9.
    masks = np.array([[[1, 1, 0, 0]], [[0, 0, 1, 0]]])
    maps = np.array([[[0.9, 0.8, 0.3, 0.1]], [[0.7, 0.2, 0.6, 0.4]]])
    fpr, pro = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0, 0, 0, .2, .2, .4, .6, .8, 1], atol=1e-12)
    np.testing.assert_allclose(pro, [0, .25, .5, .5, 1, 1, 1, 1, 1], atol=1e-12)
    assert aupro(masks, maps) == pytest.approx(0.2 / 0.3)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.9)


def test_aupro_8_connectivity_and_ranking():
    # One 3x3 image; the two diagonal defect pixels form ONE region (8-connectivity) of 2 px.
    # gt            scores
    # 1 0 0         .9 .5 .4
    # 0 1 0         .3 .8 .2
    # 0 0 0         .1 .15 .05
    # 7 normal pixels, each 1/7 FPR. Points: (0,0) .9->(0,.5) .8->(0,1) .5->(1/7,1) ...
    # PRO is 1 from FPR 0 on: AUPRO = 1.0.
    gt = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]])
    sc = np.array([[.9, .5, .4], [.3, .8, .2], [.1, .15, .05]])
    assert aupro(gt, sc) == pytest.approx(1.0)
    # Now the upper-left defect scores .3 and normals .5 .4 .35 rank above it:
    gt2 = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]])
    sc2 = np.array([[.3, .5, .4], [.35, .8, .2], [.1, .15, .05]])
    # .8 -> (0,.5); .5 -> (1/7,.5); .4 -> (2/7,.5); .35 -> (3/7,.5); .3 -> (3/7,1)
    # FPR .3 lies between 2/7 and 3/7 where PRO is .5: area .3 * .5 = .15; /.3 = 0.5
    assert aupro(gt2, sc2) == pytest.approx(0.5)


def test_aupro_ties_form_one_step():
    # 1x2 image: a defect and a normal pixel with the SAME score: one diagonal step
    # (0,0) -> (1,1). Area to .3 = .3*.3/2 = .045; /.3 = 0.15.
    assert aupro(np.array([[1, 0]]), np.array([[0.5, 0.5]])) == pytest.approx(0.15)


def test_multitype_by_hand():
    # valid pixels p0..p4 with gt 0,0,1,2,2 (last pixel ignored, -100)
    gt = np.array([[[0, 0, 1], [2, 2, -100]]])
    probs = np.zeros((1, 3, 2, 3))
    rows = {(0, 0): (.8, .1, .1), (0, 1): (.3, .6, .1), (0, 2): (.2, .7, .1),
            (1, 0): (.1, .2, .7), (1, 1): (.5, .1, .4), (1, 2): (0, 0, 1)}
    for (i, j), v in rows.items():
        probs[0, :, i, j] = v
    r = multitype_pixel_metrics(gt, probs, class_names=["normal", "hole", "scratch"])
    # AUROC: normal: pos .8,.3 vs neg .2,.1,.5 -> 5/6; hole: .7 vs .1,.6,.2,.1 -> 1;
    #        scratch: .7,.4 vs .1,.1,.1 -> 1.  macro = (5/6+1+1)/3
    assert r["per_class"]["normal"]["auroc"] == pytest.approx(5 / 6)
    assert r["auroc"] == pytest.approx((5 / 6 + 2) / 3)
    # AP: normal ranked .8(+) .5(-) .3(+) -> .5*1 + .5*2/3 = 5/6; hole 1; scratch 1
    assert r["ap"] == pytest.approx((5 / 6 + 2) / 3)
    # argmax preds 0,1,1,2,0. F1 = 2TP/(2TP+FP+FN): normal 2/(2+1+1)=.5,
    # hole 2/(2+1+0)=2/3, scratch 2/(2+0+1)=2/3 -> macro (.5+2/3+2/3)/3 = 0.6111
    assert r["f1"] == pytest.approx((0.5 + 4 / 3) / 3)
    assert r["classes"] == ["normal", "hole", "scratch"]
    assert r["per_class"]["scratch"]["pixels"] == 2
    r2 = multitype_pixel_metrics(gt, probs, include_normal=False)
    assert r2["auroc"] == pytest.approx(1.0) and r2["f1"] == pytest.approx(2 / 3)


def test_degenerate_cases_give_nan_with_reason():
    with pytest.warns(DegenerateMetricWarning, match="only negative"):
        assert math.isnan(image_auroc([0, 0], [0.1, 0.2]))
    with pytest.warns(DegenerateMetricWarning, match="only positive"):
        assert math.isnan(average_precision([1, 1], [0.1, 0.2]))
    with pytest.warns(DegenerateMetricWarning):
        assert math.isnan(max_f1([], []))
    with pytest.warns(DegenerateMetricWarning, match="no defect regions"):
        assert math.isnan(aupro(np.zeros((1, 2, 2)), np.ones((1, 2, 2))))
    with pytest.warns(DegenerateMetricWarning, match="no normal pixels"):
        assert math.isnan(aupro(np.ones((1, 2, 2)), np.ones((1, 2, 2))))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the aggregate collects reasons instead of warning
        r = binary_metrics([0, 0], [0.1, 0.2], np.zeros((2, 2, 2)), np.zeros((2, 2, 2)))
    assert all(math.isnan(r[k]) for k in ("image_auroc", "image_ap", "image_max_f1", "pixel_auroc", "aupro"))
    assert "only negative" in r["notes"]["image_auroc"] and "no defect regions" in r["notes"]["aupro"]
    # one class only in a multi-type ground truth
    with pytest.warns(DegenerateMetricWarning, match="one class"):
        probs = np.random.default_rng(0).random((1, 3, 2, 2))
        probs[:, 0] += 1  # argmax is always 'normal', which is right everywhere
        r = multitype_pixel_metrics(np.zeros((1, 2, 2), int), probs)
    assert math.isnan(r["auroc"]) and r["f1"] == 1.0 and "one class" in r["notes"]["macro auroc"]
    with pytest.warns(DegenerateMetricWarning, match="all ignored"):
        r = multitype_pixel_metrics(np.full((1, 2, 2), -100), np.random.rand(1, 3, 2, 2))
    assert math.isnan(r["f1"])


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        image_auroc([0, 1], [0.5])
    with pytest.raises(ValueError):
        pixel_auroc(np.zeros((1, 2, 2)), np.zeros((1, 3, 3)))
    with pytest.raises(ValueError):
        multitype_pixel_metrics(np.array([[[5]]]), np.zeros((1, 3, 1, 1)))


def test_binary_metrics_and_mean():
    masks = np.array([[[1, 1, 0, 0]], [[0, 0, 1, 0]]])
    maps = np.array([[[0.9, 0.8, 0.3, 0.1]], [[0.7, 0.2, 0.6, 0.4]]])
    r = binary_metrics(LABELS, SCORES, masks, maps)
    assert r["image_auroc"] == pytest.approx(0.75) and r["aupro"] == pytest.approx(2 / 3)
    assert r["notes"] == {}
    m = mean_over({"a": {"x": 1.0}, "b": {"x": 0.5}, "c": {"x": float("nan")}})
    assert m["x"] == pytest.approx(0.75)


def test_aupro_matches_a_brute_force_threshold_sweep():
    # independent path: for each distinct threshold, compute per-region overlaps explicitly
    from scipy import ndimage

    rng = np.random.default_rng(3)
    gt = np.zeros((3, 12, 12), bool)
    gt[0, 2:5, 2:6] = True
    gt[0, 8:10, 8:9] = True
    gt[1, 5:9, 1:3] = True
    maps = rng.random(gt.shape) + 0.4 * gt
    maps = np.round(maps, 2)  # create ties
    regions = []
    for i in range(3):
        lab, n = ndimage.label(gt[i], structure=np.ones((3, 3)))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    pts = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fpr = (pred & ~gt).sum() / (~gt).sum()
        pro = np.mean([(pred[i] & r).sum() / r.sum() for i, r in regions])
        pts.append((fpr, pro))
    x, y = np.array(pts).T
    k = np.searchsorted(x, 0.3, side="right")
    y_lim = np.interp(0.3, x[k - 1:k + 1], y[k - 1:k + 1])
    xs, ys = np.r_[x[:k], 0.3], np.r_[y[:k], y_lim]
    expected = np.trapezoid(ys, xs) / 0.3 if hasattr(np, "trapezoid") else np.trapz(ys, xs) / 0.3
    assert aupro(gt, maps) == pytest.approx(expected, rel=1e-9)
