"""How long the encoder takes per batch size: the measure admission by expected wait rests on.

One EWMA per batch size, seeded by the warm-up and updated by every batch the micro-batcher
runs. A size never seen is interpolated linearly between the nearest sizes that were (an
encoder's batch cost is close to affine in the batch size on CPU and GPU alike) and
extrapolated from the per-image cost of the largest one seen, so one warm-up at sizes 1 and
`max_batch_size` is enough to estimate any batch. Event-loop only (no lock needed).
"""
from __future__ import annotations

import bisect

EWMA_ALPHA = 0.3  # weight of the newest batch: follows a change within a few batches, smooths noise
# estimates are the EWMA mean plus this many EWMA mean absolute deviations: on a shared or
# throttled machine batch times scatter, and admitting on the mean alone would let the slower
# half of the admitted requests finish after their deadline (encoder work for nobody)
SPREAD_FACTOR = 2.0


class ServiceTimes:
    """Seconds per batch, by batch size."""

    def __init__(self, alpha: float = EWMA_ALPHA, spread_factor: float = SPREAD_FACTOR):
        self.alpha, self.spread_factor = alpha, spread_factor
        self._mean: dict[int, float] = {}
        self._dev: dict[int, float] = {}
        self._seconds: dict[int, float] = {}  # mean + spread_factor * deviation, what `estimate` uses
        self._seeded: set[int] = set()  # sizes known only from the warm-up so far

    def __bool__(self) -> bool:
        return bool(self._seconds)

    def seed(self, size: int, seconds: float) -> None:
        """A provisional measure (the warm-up, often taken while the machine is still busy
        starting): the first real batch of that size replaces it rather than averaging with it."""
        self._mean[size], self._dev[size] = max(seconds, 1e-6), 0.0
        self._seconds[size] = self._mean[size]
        self._seeded.add(size)

    def observe(self, size: int, seconds: float) -> None:
        value = max(seconds, 1e-6)
        old = self._mean.get(size)
        if old is None or size in self._seeded:
            self._seeded.discard(size)
            self._mean[size], self._dev[size] = value, 0.0
        else:
            self._dev[size] += self.alpha * (abs(value - old) - self._dev[size])
            self._mean[size] = old + self.alpha * (value - old)
        self._seconds[size] = self._mean[size] + self.spread_factor * self._dev[size]

    def estimate(self, size: int) -> float | None:
        """Expected seconds for a batch of `size` images; None before any measure."""
        if not self._seconds or size <= 0:
            return None if not self._seconds else 0.0
        if size in self._seconds:
            return self._seconds[size]
        sizes = sorted(self._seconds)
        i = bisect.bisect_left(sizes, size)
        if i == 0:  # below the smallest seen: scale down its per-image cost, never below its fixed share
            lo = sizes[0]
            return self._seconds[lo] * size / lo
        if i == len(sizes):  # above the largest seen: its per-image cost
            hi = sizes[-1]
            return self._seconds[hi] * size / hi
        lo, hi = sizes[i - 1], sizes[i]
        t_lo, t_hi = self._seconds[lo], self._seconds[hi]
        return t_lo + (t_hi - t_lo) * (size - lo) / (hi - lo)

    def snapshot(self) -> dict[int, float]:
        return dict(sorted(self._seconds.items()))
