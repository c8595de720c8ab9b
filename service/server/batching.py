"""The micro-batcher: images from concurrent requests share one accelerator call (Triton-style).

Requests `submit` preprocessed images and await futures. One collector task forms batches: it
waits for a free inference worker, takes the oldest waiting image, then keeps adding images
until the batch holds `max_batch_size` or the oldest image has waited `max_queue_delay_ms`
(so under load, while a batch runs, the next one fills up and no image waits longer than the
delay for company). The batch runs in a dedicated thread pool, never on the event loop; results
are split back per image and set on the futures by the loop.

The queue is bounded in images: a request whose images do not all fit is refused at once
(QueueFull -> 503 with Retry-After), never half-queued and never left to pile up. A backend
exception fails only that batch's futures (BackendError -> 503) and the collector carries on.
`stop()` refuses new work, lets queued and running batches finish, then returns.

Each request's images travel under one `Ticket` (its deadline and whether its caller is still
there). Before an image joins a batch the collector looks at its ticket: a request whose
deadline has passed or whose client disconnected is dropped whole - every image of it, tiles
of a tiled request included - with `DeadlineExceeded` / `ClientLeft`, and no image of it is
encoded. Every batch's time is recorded per batch size (`ServiceTimes`) for admission by
expected wait (service.server.admission).

The waiting line is a deque plus an Event rather than asyncio.Queue with wait_for, because
cancelling a timed-out Queue.get can lose an item on Python 3.11.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Protocol

import numpy as np

from service.runtime.backends.base import EncoderOutputs
from service.server.service_times import ServiceTimes

# (pixel_values (B, 3, S, S), allowed (B, C)) -> outputs: `Detector.infer` (or a backend's `run`)
Infer = Callable[[np.ndarray, np.ndarray], EncoderOutputs]

log = logging.getLogger("dapo.batching")


class QueueFull(RuntimeError):
    """The waiting line cannot take this request's images (or the batcher is stopping)."""


class BackendError(RuntimeError):
    """The backend failed on the batch this image was part of."""


class Dropped(RuntimeError):
    """The request was taken out of the line before any of its images was encoded."""

    cause = "dropped"


class DeadlineExceeded(Dropped):
    """The request's deadline passed (in the line, or before its answer was ready) -> 504."""

    cause = "deadline"


class ClientLeft(Dropped):
    """The caller disconnected while its images waited: nobody would read the answer."""

    cause = "disconnected"


class BatchObserver(Protocol):
    """Metrics hooks; `service.server.metrics.Metrics` implements them."""

    def observe_batch(self, size: int, inference_s: float) -> None: ...
    def observe_queue_wait(self, seconds: float) -> None: ...
    def set_queue_depth(self, depth: int) -> None: ...
    def observe_dropped(self, cause: str, images: int) -> None: ...


class _NoObserver:
    def observe_batch(self, size: int, inference_s: float) -> None:
        pass

    def observe_dropped(self, cause: str, images: int) -> None:
        pass

    def observe_queue_wait(self, seconds: float) -> None:
        pass

    def set_queue_depth(self, depth: int) -> None:
        pass


@dataclass
class BatchResult:
    """One image's outputs (leading axis 1) plus how it got them."""

    outputs: EncoderOutputs
    queue_wait_s: float
    inference_s: float
    batch_size: int


@dataclass
class Ticket:
    """One request in the line: the unit that is dropped (all its images - tiles too - together).

    `deadline` is a `time.perf_counter()` instant (None = none); `leave()` is called when the
    caller disconnects. The batcher fills `items` at admission; a tiled request (several images
    per upload) submits all its tiles under one ticket, so they are dropped together."""

    deadline: float | None = None
    left: bool = False
    dropped: Dropped | None = None
    items: list[_Item] = field(default_factory=list)

    def leave(self) -> None:
        self.left = True

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now if now is not None else time.perf_counter()) >= self.deadline

    def reason(self, now: float) -> Dropped | None:
        """Why this request should not be encoded now (None: it should)."""
        if self.dropped is not None:
            return self.dropped
        if self.left:
            return ClientLeft("the client disconnected before its images were encoded")
        if self.expired(now):
            return DeadlineExceeded("the request's deadline passed while its images waited for a batch")
        return None

    def drop(self, reason: Dropped) -> tuple[int, int]:
        """Fail every image of the request not answered yet; returns how many were never encoded
        and how many were in a running batch (failed too - the caller gets its answer now - but
        their encoding is not undone)."""
        self.dropped = reason
        never_encoded = in_batch = 0
        for item in self.items:
            if not item.future.done():
                item.future.set_exception(reason)
                never_encoded += not item.batched
                in_batch += item.batched
        return never_encoded, in_batch


@dataclass
class _Item:
    pixel_values: np.ndarray
    allowed: np.ndarray
    future: asyncio.Future
    ticket: Ticket
    enqueued: float = field(default_factory=time.perf_counter)
    batched: bool = False  # taken into a batch: from here on it is encoded whatever happens


class MicroBatcher:
    """Collects submitted images into batches and runs them through `infer` in worker threads."""

    def __init__(self, infer: Infer, *, max_batch_size: int, max_queue_delay_ms: float, max_queue_size: int,
                 workers: int = 1, observer: BatchObserver | None = None):
        """The sizes and the delay have no defaults here: they come from `Settings` (one definition)."""
        self.infer = infer
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self.workers = workers
        self.observer: BatchObserver = observer or _NoObserver()
        self.service_times = ServiceTimes()  # seconds per batch size (seeded by the warm-up)
        self._busy: dict[int, tuple[int, float]] = {}  # running batches: id -> (size, started)
        self._pending: deque[_Item] = deque()
        self._wakeup: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._collector: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._closing = False

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Create the loop-bound primitives and the collector task (call inside the loop)."""
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self.workers)
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="dapo-infer")
        self._closing = False
        self._collector = asyncio.create_task(self._collect(), name="dapo-batcher")

    @property
    def running(self) -> bool:
        return self._collector is not None and not self._collector.done() and not self._closing

    @property
    def depth(self) -> int:
        """Images waiting for a batch (not counting those being inferred)."""
        return len(self._pending)

    def live_depth(self) -> int:
        """Images waiting whose request still wants them (what admission counts)."""
        return sum(1 for item in self._pending if not item.future.done())

    def running_batches(self) -> list[tuple[int, float]]:
        """(size, perf_counter start) of each batch being inferred now."""
        return list(self._busy.values())

    async def stop(self) -> None:
        """Refuse new work, finish everything queued or running, release the threads."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._collector is not None:
            await self._collector
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._collector = None

    # --- requests -----------------------------------------------------------------------
    async def submit(self, pixel_values: np.ndarray, allowed: np.ndarray) -> BatchResult:
        """Queue one image (3, S, S) with its allowed classes (C,) and await its result."""
        return (await self.submit_many([(pixel_values, allowed)]))[0]

    async def submit_many(self, items: list[tuple[np.ndarray, np.ndarray]],
                          ticket: Ticket | None = None) -> list[BatchResult]:
        """Queue all of a request's images or none of them (QueueFull), then await them all.
        All images under one `ticket` are dropped together (deadline passed, caller gone)."""
        futures = self.enqueue(items, ticket)
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            for f in futures:  # a failed or cancelled request frees its places in the line
                f.cancel()
            raise

    def enqueue(self, items: list[tuple[np.ndarray, np.ndarray]],
                ticket: Ticket | None = None) -> list[asyncio.Future]:
        """All-or-nothing admission; runs without awaiting, so the capacity check is atomic."""
        if self._closing or self._collector is None or self._collector.done():
            raise QueueFull("the service is shutting down")
        if len(self._pending) + len(items) > self.max_queue_size:
            raise QueueFull(f"queue full ({len(self._pending)} of {self.max_queue_size} images waiting)")
        loop = asyncio.get_running_loop()
        ticket = ticket if ticket is not None else Ticket()
        futures = []
        for pixel_values, allowed in items:
            item = _Item(pixel_values, allowed, loop.create_future(), ticket)
            self._pending.append(item)
            ticket.items.append(item)
            futures.append(item.future)
        self.observer.set_queue_depth(len(self._pending))
        assert self._wakeup is not None
        self._wakeup.set()
        return futures

    # --- the collector ------------------------------------------------------------------
    def _pop_live(self) -> _Item | None:
        """The oldest waiting image whose request still wants it. Cancelled ones are skipped; a
        request whose deadline passed or whose caller left is dropped whole, here, unencoded."""
        while self._pending:
            item = self._pending.popleft()
            if item.future.done():
                continue
            now = time.perf_counter()
            reason = item.ticket.reason(now)
            if reason is None:
                item.batched = True
                return item
            self.observer.observe_queue_wait(now - item.enqueued)
            self.drop(item.ticket, reason)
        return None

    def drop(self, ticket: Ticket, reason: Dropped) -> None:
        """Take a request out of the line (its deadline timer, its disconnect watcher, or the
        collector calls this); counts the images that will never be encoded, by cause."""
        dropped, in_batch = ticket.drop(reason)
        if dropped:
            self.observer.observe_dropped(reason.cause, dropped)
        if in_batch:  # encoded (or being encoded) for nobody
            self.observer.observe_dropped("late" if isinstance(reason, DeadlineExceeded) else "abandoned",
                                          in_batch)

    async def _next_item(self) -> _Item | None:
        """Wait for an image; None once stopping and nothing is left."""
        assert self._wakeup is not None
        while True:
            item = self._pop_live()
            if item is not None:
                return item
            if self._closing:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _fill(self, batch: list[_Item]) -> None:
        """Add images until the batch is full or the oldest one's delay is used up."""
        assert self._wakeup is not None
        deadline = batch[0].enqueued + self.max_queue_delay_s
        while len(batch) < self.max_batch_size:
            item = self._pop_live()
            if item is not None:
                batch.append(item)
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or self._closing:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    async def _collect(self) -> None:
        """Form batches forever (until stopped and drained) and hand them to the workers."""
        assert self._slots is not None
        while True:
            await self._slots.acquire()
            first = await self._next_item()
            if first is None:
                self._slots.release()
                return
            batch = [first]
            await self._fill(batch)
            self.observer.set_queue_depth(len(self._pending))
            task = asyncio.create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _execute(self, batch: list[_Item]) -> None:
        """Run one batch in a worker thread and resolve its futures; never raises."""
        assert self._slots is not None
        started = time.perf_counter()
        self._busy[id(batch)] = (len(batch), started)
        try:
            for item in batch:
                self.observer.observe_queue_wait(started - item.enqueued)
            pixel_values = np.stack([item.pixel_values for item in batch]).astype(np.float32, copy=False)
            allowed = np.stack([item.allowed for item in batch]).astype(bool, copy=False)
            loop = asyncio.get_running_loop()
            outputs = await loop.run_in_executor(self._executor, self.infer, pixel_values, allowed)
            if len(outputs) != len(batch):
                raise RuntimeError(f"backend returned {len(outputs)} results for a batch of {len(batch)}")
            inference_s = time.perf_counter() - started
            self.service_times.observe(len(batch), inference_s)
            self.observer.observe_batch(len(batch), inference_s)
            for i, item in enumerate(batch):
                if not item.future.done():
                    item.future.set_result(BatchResult(outputs.item(i), started - item.enqueued,
                                                       inference_s, len(batch)))
        except Exception as e:  # one bad batch must not stop the service
            log.exception("inference failed for a batch of %d", len(batch))
            err = BackendError(f"inference failed: {type(e).__name__}")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(err)
        finally:
            self._busy.pop(id(batch), None)
            self._slots.release()
