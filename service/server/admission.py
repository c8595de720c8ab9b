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
MAX_RESCHEDULE_S = 600  # a promised retry refused again is given the first second it fits, up to this


@dataclass(frozen=True)
class Decision:
    admit: bool
    expected_s: float | None  # expected seconds from now to the answer (None: nothing measured yet)
    retry_after_s: int  # when refused: the Retry-After value
    promised: bool = False  # the request is a retry that was promised its place (redeemed a promise)


@dataclass(eq=False)  # identity: promises are told apart by who made them
class _Promise:
    due: float  # when the refused caller comes back (perf_counter)
    images: int
    key: str | None
    budget_s: float  # its deadline, counted from `due`


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
    def _simulate(self, now: float, arrivals: list[tuple[float, int, object]]) -> tuple[dict[object, float], float]:
        """Play the line forward from `now`: the batches running, the images waiting, then each
        arrival `(time, images, tag)` joining the line at its time (FIFO); batches take up to
        `max_batch_size` images as soon as a worker is free. Returns when each tagged arrival's
        last image is encoded, and when the last batch ends."""
        b = self.batcher
        times = b.service_times
        free = [now + max(0.0, started + (times.estimate(size) or 0.0) - now) for size, started in b.running_batches()]
        free += [now] * max(0, b.workers - len(free))
        heapq.heapify(free)
        line: list[list] = [[now, b.live_depth(), None]] if b.live_depth() else []
        pending = sorted(arrivals, key=lambda a: a[0])
        done: dict[object, float] = {}
        last = max(free) if free else now
        i = 0
        while line or i < len(pending):
            w = heapq.heappop(free)
            if not line:
                w = max(w, pending[i][0])
            while i < len(pending) and pending[i][0] <= w:
                line.append(list(pending[i]))
                i += 1
            size, taken = 0, []
            while line and size < b.max_batch_size:
                k = min(line[0][1], b.max_batch_size - size)
                line[0][1] -= k
                size += k
                if line[0][1] == 0:
                    taken.append(line.pop(0)[2])
            end = w + (times.estimate(size) or 0.0)
            for tag in taken:
                if tag is not None:
                    done[tag] = end
            last = max(last, end)
            heapq.heappush(free, end)
        return done, last

    def _promise_arrivals(self) -> list[tuple[float, int, object]]:
        return [(p.due + self.before_batch.value, p.images, p) for p in self._promises]

    def _late_promises(self, done: dict[object, float]) -> set[int]:
        after = self.after_batch.value
        return {id(p) for p in self._promises if p in done and done[p] + after > p.due + p.budget_s}

    def _forget_stale(self, now: float) -> None:
        self._promises = [p for p in self._promises if p.due + PROMISE_GRACE_S > now][-MAX_PROMISES:]

    def _redeem(self, now: float, key: str | None) -> bool:
        """This arrival is a promised retry (same Idempotency-Key): it stops counting as promised."""
        if key is not None:
            for i, p in enumerate(self._promises):
                if p.key == key:
                    del self._promises[i]
                    return True
        return False

    def _idle(self) -> bool:
        return not self.batcher.running_batches() and self.batcher.live_depth() == 0

    # --- decisions ----------------------------------------------------------------------
    def decide(self, images: int, budget_s: float | None, elapsed_s: float, *, before_body: bool = False,
               key: str | None = None, redeem: bool = True, promised: bool = False) -> Decision:
        """Admit, or refuse with when to retry. `elapsed_s`: time since the request arrived;
        `before_body`: the body is not read yet (its decode time is still to come); `redeem`:
        this is the request's first decision (a promised retry counts once); `promised`: an
        earlier decision found it to be a promised retry.

        Admitted when the request's answer is expected within its budget AND, unless it is a
        promised retry itself, it makes no promised retry late that would have been in time
        without it (a newcomer joins the line before them; a promised retry had its place)."""
        now = self.clock()
        self._forget_stale(now)
        if redeem:
            promised = self._redeem(now, key) or promised
        if not self.batcher.service_times:
            return Decision(True, None, 0)
        pre = self.before_batch.value if before_body else 0.0
        after = self.after_batch.value
        me = object()
        arrivals = self._promise_arrivals()
        done, _ = self._simulate(now, [(now + pre, images, me), *arrivals])
        expected = done[me] - now + after
        if self._idle():  # nothing to wait for: try (an overestimate must not lock the encoder out for good)
            return Decision(True, expected, 0, promised)
        if budget_s is None:
            return Decision(True, expected, 0, promised)
        fits = elapsed_s + expected <= budget_s
        if fits and self._promises and not promised:
            baseline, _ = self._simulate(now, arrivals)
            fits = not (self._late_promises(done) - self._late_promises(baseline))
        if fits:
            return Decision(True, expected, 0, promised)
        if promised:  # keeps its place in line: the first moment it fits, not behind every later promise
            return Decision(False, expected, self._reschedule(images, now, budget_s, key))
        return Decision(False, expected, self._schedule(images, now, budget_s, key))

    def _reschedule(self, images: int, now: float, budget_s: float, key: str | None) -> int:
        """For a promised retry that still does not fit (its batch ahead ran longer than
        estimated): the first whole second at which it would, with the promises as they are."""
        arrivals, pre, after = self._promise_arrivals(), self.before_batch.value, self.after_batch.value
        me = object()
        retry = 1
        for retry in range(1, MAX_RESCHEDULE_S + 1):
            done, _ = self._simulate(now, [(now + retry + pre, images, me), *arrivals])
            if done[me] + after <= now + retry + budget_s:
                break
        if key is not None:
            self._promises.append(_Promise(now + retry, images, key, budget_s))
            self._promises.sort(key=lambda p: p.due)
        return retry

    def _schedule(self, images: int, now: float, budget_s: float, key: str | None) -> int:
        """The whole seconds (at least 1) until the request, sent again with the same budget,
        fits behind the line and every promise: when the last of them is encoded, less what its
        budget leaves for waiting.
        A request with an Idempotency-Key (its retry can be recognised) books a promise; one
        without books none: an impolite client re-posting at once without a key would otherwise
        fill the book with retries that never come as promised."""
        _, last = self._simulate(now, self._promise_arrivals())
        own = (self.batcher.service_times.estimate(images) or 0.0) + self.before_batch.value + self.after_batch.value
        retry = max(1, math.ceil(last + own - budget_s - now))
        if key is not None:
            self._promises.append(_Promise(now + retry, images, key, budget_s))
            self._promises.sort(key=lambda p: p.due)
        return retry

    def retry_after(self) -> int:
        """Retry-After for a refusal that is not about a deadline (the count guards): the time
        the line now waiting needs to drain, at least 1; the configured value before any measure."""
        if not self.batcher.service_times:
            return self.fallback_retry_after_s
        now = self.clock()
        _, last = self._simulate(now, [])
        return max(1, math.ceil(last - now))

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
