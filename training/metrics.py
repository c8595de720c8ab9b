"""Evaluation metrics (what the paper reports).

Binary: image AUROC, AP, max-F1; pixel AUROC; AUPRO (FPR limit 0.3).
Multi-type (per pixel): macro one-vs-rest AUROC, macro AP, macro F1 of the argmax, over the
classes present in the ground truth.

Degenerate inputs (one class only, no defect regions, nothing left after ignoring) give NaN and
a ``DegenerateMetricWarning`` that says why, never an exception. The aggregate helpers also
return the reasons in a ``"notes"`` entry.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from training.data.common import IGNORE_INDEX

NAN = float("nan")


class DegenerateMetricWarning(UserWarning):
    """A metric that is undefined on the given data (returned as NaN)."""


def _nan(metric: str, reason: str, notes: dict | None = None) -> float:
    msg = f"{metric} is undefined: {reason}"
    warnings.warn(msg, DegenerateMetricWarning, stacklevel=3)
    if notes is not None:
        notes[metric] = reason
    return NAN


def _binary_inputs(labels, scores, metric: str):
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"{metric}: {y.size} labels but {s.size} scores")
    y = y.astype(bool) if y.dtype != bool else y
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{metric}: scores contain NaN or inf")
    return y, s


def _one_class_reason(y: np.ndarray) -> str | None:
    if y.size == 0:
        return "no samples"
    if y.all():
        return "only positive (anomalous) samples, no negatives"
    if not y.any():
        return "only negative (normal) samples, no positives"
    return None


# --------------------------------------------------------------------------- image level

def auroc(labels, scores, *, name: str = "auroc", notes: dict | None = None) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    y, s = _binary_inputs(labels, scores, name)
    reason = _one_class_reason(y)
    if reason:
        return _nan(name, reason, notes)
    return float(roc_auc_score(y, s))


def average_precision(labels, scores, *, name: str = "ap", notes: dict | None = None) -> float:
    """Average precision (sklearn's step-wise definition); NaN without positives.

    With positives only it would be 1.0 trivially; it is reported as NaN too (one class)."""
    y, s = _binary_inputs(labels, scores, name)
    reason = _one_class_reason(y)
    if reason:
        return _nan(name, reason, notes)
    return float(average_precision_score(y, s))


def max_f1(labels, scores, *, name: str = "max_f1", notes: dict | None = None, return_threshold: bool = False):
    """The best F1 over all thresholds (score >= t is positive). With ``return_threshold``,
    returns (f1, threshold)."""
    y, s = _binary_inputs(labels, scores, name)
    reason = _one_class_reason(y)
    if reason:
        v = _nan(name, reason, notes)
        return (v, NAN) if return_threshold else v
    precision, recall, thresholds = precision_recall_curve(y, s)
    p, r = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    denom = p + r
    f1 = np.where(denom > 0, 2 * p * r / np.where(denom > 0, denom, 1), 0.0)
    i = int(np.argmax(f1))
    return (float(f1[i]), float(thresholds[i])) if return_threshold else float(f1[i])


def image_auroc(labels, scores, notes: dict | None = None) -> float:
    return auroc(labels, scores, name="image_auroc", notes=notes)


def image_ap(labels, scores, notes: dict | None = None) -> float:
    return average_precision(labels, scores, name="image_ap", notes=notes)


def image_max_f1(labels, scores, notes: dict | None = None) -> float:
    return max_f1(labels, scores, name="image_max_f1", notes=notes)


# --------------------------------------------------------------------------- pixel level

def _pixel_inputs(masks, maps, metric: str):
    m = np.asarray(masks)
    a = np.asarray(maps, dtype=np.float64)
    if m.ndim == 2:
        m, a = m[None], a[None] if a.ndim == 2 else a
    if m.shape != a.shape or m.ndim != 3:
        raise ValueError(f"{metric}: masks {m.shape} and maps {a.shape} must both be (N, H, W)")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{metric}: anomaly maps contain NaN or inf")
    return m.astype(bool) if m.dtype != bool else m, a


def pixel_auroc(masks, maps, notes: dict | None = None) -> float:
    """AUROC over all pixels of all images; ``masks`` (N,H,W) binary, ``maps`` (N,H,W)."""
    m, a = _pixel_inputs(masks, maps, "pixel_auroc")
    return auroc(m.reshape(-1), a.reshape(-1), name="pixel_auroc", notes=notes)


def pro_curve(masks, maps, structure: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The exact per-region-overlap curve: (fpr, pro) at every distinct score threshold,
    starting at (0, 0), FPR increasing.

    For a threshold t: FPR = (normal pixels with score >= t) / (all normal pixels);
    PRO = mean over every connected ground-truth region of all images (8-connectivity, as the
    MVTec AD reference) of (region pixels with score >= t) / (region size).
    Sorting all pixels once gives every threshold; tied scores form one step.
    """
    m, a = _pixel_inputs(masks, maps, "aupro")
    structure = np.ones((3, 3), dtype=int) if structure is None else structure
    weights = np.zeros(m.shape, dtype=np.float64)  # each region pixel: 1 / region size
    n_regions = 0
    for i in range(m.shape[0]):
        lab, n = ndimage.label(m[i], structure=structure)
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel())
        w = np.zeros_like(sizes, dtype=np.float64)
        w[1:] = 1.0 / sizes[1:]
        weights[i] = w[lab]
        n_regions += n
    normal = ~m
    n_normal = int(normal.sum())
    if n_regions == 0 or n_normal == 0:
        return np.zeros(1), np.zeros(1)
    s = a.reshape(-1)
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    fpr = np.cumsum(normal.reshape(-1)[order] / n_normal)
    pro = np.cumsum(weights.reshape(-1)[order] / n_regions)
    # one point per distinct threshold: the last index of each run of equal scores
    last = np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1]
    fpr = np.r_[0.0, np.clip(fpr[last], 0, 1)]
    pro = np.r_[0.0, np.clip(pro[last], 0, 1)]
    return fpr, pro


def _integrate_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under (x, y) (x non-decreasing) from x[0] to ``limit``; y is linearly
    interpolated at the limit."""
    if limit <= x[0]:
        return 0.0
    k = int(np.searchsorted(x, limit, side="right"))  # x[:k] <= limit
    xs, ys = x[:k], y[:k]
    if k < x.size and xs[-1] < limit:
        x0, x1, y0, y1 = x[k - 1], x[k], y[k - 1], y[k]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        xs, ys = np.r_[xs, limit], np.r_[ys, y_lim]
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))


def aupro(masks, maps, fpr_limit: float = 0.3, notes: dict | None = None) -> float:
    """Area under the PRO curve up to ``fpr_limit``, divided by ``fpr_limit`` (0..1).

    Standard MVTec AD definition (see ``pro_curve``); NaN without defect regions or without
    normal pixels."""
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    m, a = _pixel_inputs(masks, maps, "aupro")
    if not m.any():
        return _nan("aupro", "no defect regions in the ground truth", notes)
    if m.all():
        return _nan("aupro", "no normal pixels in the ground truth", notes)
    fpr, pro = pro_curve(m, a)
    return _integrate_to(fpr, pro, fpr_limit) / fpr_limit


# --------------------------------------------------------------------------- multi-type

def multitype_pixel_metrics(
    gt,
    probs,
    *,
    class_names: Sequence[str] | None = None,
    ignore_index: int = IGNORE_INDEX,
    include_normal: bool = True,
) -> dict:
    """Per-pixel multi-type metrics.

    ``gt``: (N, H, W) int class map (0 = normal, ``ignore_index`` skipped).
    ``probs``: (N, C, H, W) per-class scores (softmax probabilities or summed over layers).
    Macro one-vs-rest AUROC and AP over classes present in ``gt`` (class c vs all other valid
    pixels, scored by channel c); macro F1 of the argmax prediction over the same classes.
    ``include_normal``: whether class 0 takes part in the macro averages.
    Returns {"auroc", "ap", "f1", "per_class": {name: {"auroc","ap","f1","pixels"}},
    "classes": [names], "notes": {..}}.
    """
    g = np.asarray(gt)
    p = np.asarray(probs, dtype=np.float64)
    if g.ndim == 2:
        g = g[None]
    if p.ndim == 3:
        p = p[None]
    if p.ndim != 4 or g.ndim != 3 or p.shape[0] != g.shape[0] or p.shape[2:] != g.shape[1:]:
        raise ValueError(f"multi-type metrics: gt {g.shape} must be (N,H,W) and probs {p.shape} (N,C,H,W)")
    C = p.shape[1]
    names = list(class_names) if class_names is not None else [str(c) for c in range(C)]
    if len(names) != C:
        raise ValueError(f"{len(names)} class names for {C} channels")
    valid = g != ignore_index
    yv = g[valid].astype(np.int64)
    if yv.size and (yv.min() < 0 or yv.max() >= C):
        raise ValueError(f"gt holds class ids outside 0..{C - 1} (ignore_index={ignore_index})")
    scores = np.moveaxis(p, 1, -1)[valid]  # (P, C)
    if not np.all(np.isfinite(scores)):
        raise ValueError("multi-type metrics: probs contain NaN or inf")
    notes: dict[str, str] = {}
    out: dict = {"auroc": NAN, "ap": NAN, "f1": NAN, "per_class": {}, "classes": [], "notes": notes}
    if yv.size == 0:
        _nan("multitype", "no valid pixels (all ignored)", notes)
        return out
    pred = scores.argmax(axis=1)
    present = [c for c in np.unique(yv).tolist() if include_normal or c != 0]
    if not present:
        _nan("multitype", "no defect classes present in the ground truth", notes)
        return out
    aurocs, aps, f1s = [], [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateMetricWarning)
        for c in present:
            pos = yv == c
            sub: dict[str, str] = {}
            a_c = auroc(pos, scores[:, c], name=f"auroc[{names[c]}]", notes=sub)
            ap_c = average_precision(pos, scores[:, c], name=f"ap[{names[c]}]", notes=sub)
            tp = int(np.sum(pos & (pred == c)))
            fp = int(np.sum(~pos & (pred == c)))
            fn = int(np.sum(pos & (pred != c)))
            f1_c = 2 * tp / (2 * tp + fp + fn)
            notes.update(sub)
            out["per_class"][names[c]] = {"auroc": a_c, "ap": ap_c, "f1": f1_c, "pixels": int(pos.sum())}
            aurocs.append(a_c)
            aps.append(ap_c)
            f1s.append(f1_c)
    out["classes"] = [names[c] for c in present]

    def macro(vals, metric):
        vals = [v for v in vals if not math.isnan(v)]
        if not vals:
            return _nan(f"macro {metric}", "every present class is degenerate (the ground truth holds one class only)", notes)
        return float(np.mean(vals))

    out["auroc"] = macro(aurocs, "auroc")
    out["ap"] = macro(aps, "ap")
    out["f1"] = float(np.mean(f1s))
    return out


# --------------------------------------------------------------------------- aggregates

def binary_metrics(
    labels, scores, masks=None, maps=None, *, fpr_limit: float = 0.3, pixel: bool = True
) -> dict:
    """All binary metrics for one category: image_auroc, image_ap, image_max_f1 and (when masks
    and maps are given) pixel_auroc, aupro. NaN entries are explained in ``notes``."""
    notes: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateMetricWarning)
        out = {
            "image_auroc": image_auroc(labels, scores, notes),
            "image_ap": image_ap(labels, scores, notes),
            "image_max_f1": image_max_f1(labels, scores, notes),
        }
        if pixel and masks is not None and maps is not None:
            out["pixel_auroc"] = pixel_auroc(masks, maps, notes)
            out["aupro"] = aupro(masks, maps, fpr_limit, notes)
    out["notes"] = notes
    return out


def mean_over(results: dict[str, dict], keys: Sequence[str] | None = None) -> dict[str, float]:
    """Average metrics over categories (NaN entries skipped; NaN when all are NaN)."""
    keys = keys or sorted({k for r in results.values() for k, v in r.items() if isinstance(v, (int, float))})
    out = {}
    for k in keys:
        vals = [float(r[k]) for r in results.values() if k in r and not math.isnan(float(r[k]))]
        out[k] = float(np.mean(vals)) if vals else NAN
    return out
