"""Score drift against the calibration baseline: the baseline's binning, PSI and mean shift.

`dapo calibrate` summarises the image scores of known-good parts per product
(`baseline_from_scores` -> `artifact.ScoreBaseline`, stored in the manifest); the service
compares the scores of the last images it served for that product with it (`drift_of`). Both
sides bin with the same `bin_counts`, so a window holding exactly the calibration images reads
PSI 0 and mean shift 0.

Two statistics, because they fail differently:
- the population stability index over the baseline's bins: its quantiles inside the range
  calibration saw (equal-population bins, the credit-scoring convention) and one bin on either
  side of that range. PSI = sum_i (a_i - e_i) ln(a_i / e_i) over bin fractions, e the
  baseline's and a the window's. It sees any change of shape. Rule of thumb: < 0.1 stable,
  0.1-0.25 a moderate shift, > 0.25 a significant one. Both fractions are estimated from counts
  with half an image added to every bin (the Jeffreys prior), so an empty bin in a small window
  reads as "rare", not as ln(0). With no drift at all the expected value is still about
  (k - 1) (1/n + 1/N) for a window of n and a baseline of N images over k quantile bins
  (sampling noise: ~0.04 for the defaults and 500 calibration images), which is why neither
  may be small. Within a bin it is blind: a few scores far above the top quantile count as
  much as scores just above it (the outer bins soften this);
- the mean shift in baseline standard deviations, (window mean - baseline mean) / baseline std.
  It keeps a sign (scores rising: parts look less normal than at calibration).

numpy only: this module is shared by the service and `training.calibrate`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.runtime.artifact import ScoreBaseline

DRIFT_BINS = 10  # deciles of the good-part scores (plus the two bins outside their range)
PSEUDO_COUNT = 0.5  # images added to every bin before fractions are taken (ln 0 is undefined)
STD_FLOOR = 1e-6  # a constant baseline still gives a finite (large) shift
# The service reports scores to 6 significant digits (postprocess.sig), calibration sees them
# unrounded: the range's ends sit this far outside the calibration scores, so a calibration
# image the service scores again falls inside the range, not into an outer bin.
SCORE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Drift:
    """Drift of one window of scores against a baseline."""

    psi: float
    mean_shift: float  # in baseline standard deviations
    images: int


def bin_counts(cuts: list[float] | np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Images per bin; bin i is [cuts[i-1], cuts[i]) with open ends (len(cuts) + 1 bins)."""
    index = np.searchsorted(np.asarray(cuts, dtype=np.float64), np.asarray(scores, dtype=np.float64), side="right")
    return np.bincount(index, minlength=len(cuts) + 1)


def baseline_from_scores(scores: np.ndarray | list[float], bins: int = DRIFT_BINS) -> ScoreBaseline:
    """The good-part score distribution: cut points, bin fractions, mean and std.

    Inside the calibration range the cuts are the good scores' own quantiles, so each of these
    `bins` bins holds about 1/bins of the good parts (repeated quantiles, from ties or few
    images, are merged into fewer, wider bins). Two more bins hold scores below the smallest and
    above the largest calibration score: they are empty in the baseline, so a window that lands
    outside the range calibration saw reads as drift even when the inner bins barely change.
    """
    a = np.asarray(scores, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError("a score baseline needs at least one image")
    if not np.all(np.isfinite(a)):
        raise ValueError("scores must be finite")
    if bins < 2:
        raise ValueError(f"a score baseline needs at least 2 bins, got {bins}")
    lo, hi = a.min() - SCORE_TOLERANCE, a.max() + SCORE_TOLERANCE
    inner = np.unique(np.quantile(a, np.arange(1, bins) / bins))
    cuts = np.r_[lo, inner[(inner > a.min()) & (inner < hi)], hi]  # a cut at the minimum: an empty bin
    counts = bin_counts(cuts, a)
    return ScoreBaseline(cuts=[float(c) for c in cuts], fractions=[float(f) for f in counts / a.size],
                         mean=float(a.mean()), std=float(a.std()), images=int(a.size))


def smoothed(counts: np.ndarray, pseudo: float = PSEUDO_COUNT) -> np.ndarray:
    """Bin fractions from counts with `pseudo` images added to every bin (all > 0)."""
    c = np.asarray(counts, dtype=np.float64) + pseudo
    return c / c.sum()


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two fraction vectors (all > 0) over the same bins."""
    e, a = np.asarray(expected, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape or np.any(e <= 0) or np.any(a <= 0):
        raise ValueError("PSI needs two positive fraction vectors over the same bins")
    return float(np.sum((a - e) * np.log(a / e)))


def drift_of(baseline: ScoreBaseline, scores: np.ndarray) -> Drift:
    """PSI and mean shift of `scores` (one window, at least one image) against `baseline`."""
    a = np.asarray(scores, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no scores in the window")
    expected = smoothed(np.asarray(baseline.fractions) * baseline.images)
    actual = smoothed(bin_counts(baseline.cuts, a))
    shift = (float(a.mean()) - baseline.mean) / max(baseline.std, STD_FLOOR)
    return Drift(psi=psi(expected, actual), mean_shift=shift, images=int(a.size))
