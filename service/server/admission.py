"""Admission by expected wait: refuse at once a request that would be answered after its deadline.

The expected finish of a new request is simulated from what the micro-batcher holds now: the
batches being inferred (their measured start and expected length), the images waiting, then the
request's own images, cut into batches of `max_batch_size` and handed to the earliest free
worker, each batch costing what `ServiceTimes` measured for its size. The time a request spends
outside the batcher (reading and decoding before, rendering and sending after) is tracked as two
EWMAs and added.

A refused request gets 503 `overloaded` with `Retry-After` = when it would fit: the expected
finish minus its budget, in whole seconds (at least 1). Polite clients all come back, so each
refusal books its images as a *promise* due at that time; later requests count the promises due
before they would finish as work ahead of them, and later refusals are scheduled after all
promises. So under sustained overload the retries are spread at the rate the encoder serves
them and a retry made when asked is accepted, instead of every retry meeting a line refilled by
newcomers. Only a request with an `Idempotency-Key` books a promise (its retry is recognised by
the key and redeems it); a promise is forgotten `PROMISE_GRACE_S` after it was due (the caller
gave up). An idle encoder always admits (so an overestimate corrects itself). Event-loop only.
"""
from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass

from service.server.batching import MicroBatcher

EWMA_ALPHA = 0.2
PROMISE_GRACE_S = 2.0  # a promised retry later than this past its time is not coming
MAX_PROMISES = 10_000  # memory guard: beyond it the oldest promise is forgotten


@dataclass(frozen=True)
class Decision:
    admit: bool
    expected_s: float | None  # expected seconds from now to the answer (None: nothing measured yet)
    retry_after_s: int  # when refused: the Retry-After value


@dataclass
class _Promise:
    due: float
    images: int
    key: str | None


class Ewma:
    def __init__(self, alpha: float = EWMA_ALPHA):
        self.alpha, self.value = alpha, 0.0
        self._seen = False

    def observe(self, x: float) -> None:
        x = max(x, 0.0)
        self.value = x if not self._seen else self.value + self.alpha * (x - self.value)
        self._seen = True


class Admission:
    """Decides, per request, admit or refuse with a Retry-After (one per served model)."""

    def __init__(self, batcher: MicroBatcher, fallback_retry_after_s: int = 1, clock=time.perf_counter):
        self.batcher = batcher
        self.fallback_retry_after_s = fallback_retry_after_s
        self.clock = clock
        self.before_batch = Ewma()  # arrival -> queued (read body, decode, preprocess)
        self.after_batch = Ewma()  # batch done -> answer sent (render, JSON)
        self._promises: list[_Promise] = []  # ordered by due

    # --- the model ----------------------------------------------------------------------
    def finish_s(self, images: int, now: float, ahead: int = 0) -> float | None:
        """Seconds from `now` until `images` more images, queued behind what waits now (plus
        `ahead` promised ones), are encoded; None before any batch time is known."""
        b = self.batcher
        times = b.service_times
        if not times:
            return None
        free = [max(0.0, started + (times.estimate(size) or 0.0) - now) for size, started in b.running_batches()]
        free += [0.0] * max(0, b.workers - len(free))
        heapq.heapify(free)
        remaining, end = b.live_depth() + ahead + images, 0.0
        while remaining > 0:
            size = min(b.max_batch_size, remaining)
            end = heapq.heappop(free) + (times.estimate(size) or 0.0)
            heapq.heappush(free, end)
            remaining -= size
        return end

    def _forget_stale(self, now: float) -> None:
        self._promises = [p for p in self._promises if p.due + PROMISE_GRACE_S > now][-MAX_PROMISES:]

    def _redeem(self, now: float, key: str | None) -> None:
        """This arrival is (probably) a promised retry: its images stop counting as promised."""
        if key is not None:
            for i, p in enumerate(self._promises):
                if p.key == key:
                    del self._promises[i]
                    return

    def _promised_before(self, now: float, images: int) -> tuple[int, float | None]:
        """Promised images due before this request would finish, and that finish."""
        ahead, finish = 0, self.finish_s(images, now)
        for p in self._promises:
            if finish is None or p.due >= now + finish:
                break
            ahead += p.images
            finish = self.finish_s(images, now, ahead)
        return ahead, finish

    # --- decisions ----------------------------------------------------------------------
    def decide(self, images: int, budget_s: float | None, elapsed_s: float, *, before_body: bool = False,
               key: str | None = None, redeem: bool = True) -> Decision:
        """Admit, or refuse with when to retry. `elapsed_s`: time since the request arrived;
        `before_body`: the body is not read yet (its decode time is still to come); `redeem`:
        this is the request's first decision (a promised retry counts once)."""
        now = self.clock()
        self._forget_stale(now)
        if redeem:
            self._redeem(now, key)
        _, finish = self._promised_before(now, images)
        if finish is None:
            return Decision(True, None, 0)
        if self._idle():  # nothing to wait for: try (an overestimate must not lock the encoder out for good)
            return Decision(True, finish, 0)
        rest = self.after_batch.value + (self.before_batch.value if before_body else 0.0)
        expected = finish + rest
        if budget_s is None or elapsed_s + expected <= budget_s:
            return Decision(True, expected, 0)
        retry = self._schedule(images, now, elapsed_s + rest - budget_s, key)
        return Decision(False, expected, retry)

    def _idle(self) -> bool:
        return not self.batcher.running_batches() and self.batcher.live_depth() == 0

    def _schedule(self, images: int, now: float, slack_s: float, key: str | None) -> int:
        """The whole seconds (at least 1) until the request would fit behind the line and every
        promise; a request with an Idempotency-Key (a retry can be recognised) books a promise.
        A request without one books none: an impolite client re-posting at once without a key
        would otherwise fill the book with retries that never come as promised."""
        total = sum(p.images for p in self._promises)
        finish = self.finish_s(images, now, total) or 0.0
        retry = max(1, math.ceil(finish + slack_s))
        if key is not None:
            self._promises.append(_Promise(now + retry, images, key))
            self._promises.sort(key=lambda p: p.due)
        return retry

    def retry_after(self) -> int:
        """Retry-After for a refusal that is not about a deadline (the count guards): the time
        the line now waiting needs to drain, at least 1; the configured value before any measure."""
        finish = self.finish_s(0, self.clock())
        if finish is None:
            return self.fallback_retry_after_s
        return max(1, math.ceil(finish))

    @property
    def promised_images(self) -> int:
        return sum(p.images for p in self._promises)


def seed_service_times(warm_up, batcher: MicroBatcher, sizes: list[int]) -> None:
    """Time one more warm-up call per batch size (the first paid one-time costs: graph
    optimisation, CUDA context, TensorRT build) and seed the batcher's `ServiceTimes` with it,
    so admission by expected wait works from the first request. Blocking: run it in a thread."""
    for size in sizes:
        t0 = time.perf_counter()
        warm_up([size])
        batcher.service_times.seed(size, time.perf_counter() - t0)
