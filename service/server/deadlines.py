"""Per-request deadlines: how long the caller (a line with a fixed cycle time) will wait.

A request's budget, first found wins:
  1. the `X-Deadline-Ms` header: milliseconds from when the server receives the request
     (relative, like gRPC's `grpc-timeout`, so the client's and the server's clocks need not
     agree); 1 .. 3,600,000;
  2. the product's `timeout_ms` in the artifact manifest (lines differ; optional field);
  3. `DAPO_REQUEST_TIMEOUT_MS` (0 = no deadline).
The clock starts when the route receives the request (before the body is read). A request
whose deadline passes gets 504 `deadline_exceeded`, never a late 200 (docs/deadlines.md).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.server.admission import Admission
from service.server.batching import (
    BatchResult,
    DeadlineExceeded,
    MicroBatcher,
    QueueFull,
    Ticket,
)
from service.server.errors import ApiError, retry_headers

DEADLINE_HEADER = "X-Deadline-Ms"
MAX_DEADLINE_MS = 3_600_000

log = logging.getLogger("dapo.deadlines")


def budget_ms(header_ms: int | None, product_ms: int | None, default_ms: int) -> int | None:
    """The request's budget (see the module docstring); None = no deadline."""
    if header_ms is not None:
        return header_ms
    if product_ms is not None:
        return product_ms
    return default_ms or None


@dataclass
class Deadline:
    """When the request arrived and how long it may take (`time.perf_counter` seconds)."""

    budget_s: float | None
    start: float = field(default_factory=time.perf_counter)

    @property
    def at(self) -> float | None:
        """The instant the answer is no longer wanted (None: never)."""
        return None if self.budget_s is None else self.start + self.budget_s

    def elapsed(self, now: float | None = None) -> float:
        return (now if now is not None else time.perf_counter()) - self.start

    def expired(self, now: float | None = None) -> bool:
        at = self.at
        return at is not None and (now if now is not None else time.perf_counter()) >= at

    def with_budget_ms(self, ms: int | None) -> Deadline:
        """The same arrival with another budget (the product's, known once the form is read)."""
        return Deadline(None if ms is None else ms / 1000.0, self.start)


def overloaded(decision_retry_after_s: int, message: str) -> ApiError:
    return ApiError(503, "overloaded", message, retry_headers(decision_retry_after_s))


@dataclass
class RequestGuard:
    """One /detect request's deadline, its place in the line (`Ticket`) and its caller's presence.

    The route creates it when the request arrives; the pipeline calls `admit` once the images
    are decoded, `submit` to queue them (a timer drops the request at its deadline, wherever it
    is), and `deliver` once the answer is rendered (a late answer becomes 504, never a 200)."""

    deadline: Deadline
    batcher: MicroBatcher
    admission: Admission | None
    observer: Any  # service.server.metrics.Metrics
    key: str | None = None
    ticket: Ticket = field(default_factory=Ticket)
    promised: bool = False  # a retry the admission had promised its place (service.server.admission)
    queued_at: float | None = None
    encoded_at: float | None = None

    def __post_init__(self) -> None:
        self.ticket.deadline = self.deadline.at

    def set_budget_ms(self, ms: int | None) -> None:
        self.deadline = self.deadline.with_budget_ms(ms)
        self.ticket.deadline = self.deadline.at

    def check(self, images: int) -> None:
        """Raise now if the caller left or the deadline passed (nothing is queued yet: the
        `images` count as dropped, never encoded)."""
        reason = self.ticket.reason(time.perf_counter())
        if reason is not None:
            self.ticket.dropped = reason
            self.observer.observe_dropped(reason.cause, images)
            raise reason

    def admit(self, images: int) -> None:
        """Admission by expected wait, with the request's real image count and budget."""
        self.check(images)
        if self.admission is None:
            return
        d = self.admission.decide(images, self.deadline.budget_s, self.deadline.elapsed(), redeem=False,
                                  promised=self.promised, key=self.key)  # refused here: booked again
        if not d.admit:
            raise overloaded(d.retry_after_s, f"expected answer in {d.expected_s:.1f} s, "
                                              f"after the deadline of {self.deadline.budget_s:.1f} s")

    async def submit(self, items: list[tuple[np.ndarray, np.ndarray]]) -> list[BatchResult]:
        """Queue the images under the ticket; the request is dropped at its deadline or when the
        caller disconnects, whichever comes first, with every image not yet encoded."""
        self.check(len(items))
        try:
            futures = self.batcher.enqueue(items, self.ticket)
        except QueueFull as e:
            retry = self.admission.retry_after() if self.admission is not None else 1
            raise ApiError(503, "queue_full", str(e), retry_headers(retry)) from e
        self.queued_at = time.perf_counter()
        if self.admission is not None:
            self.admission.before_batch.observe(self.queued_at - self.deadline.start)
        timer = None
        at = self.deadline.at
        if at is not None:
            timer = asyncio.get_running_loop().call_later(
                max(0.0, at - time.perf_counter()), self.batcher.drop, self.ticket,
                DeadlineExceeded("the request's deadline passed before its answer was ready"))
        try:
            results = list(await asyncio.gather(*futures))
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        finally:
            if timer is not None:
                timer.cancel()
        self.encoded_at = time.perf_counter()
        return results

    def deliver(self, images: int) -> None:
        """The answer is ready: 504 if it is late (the encoder's work is counted as wasted)."""
        now = time.perf_counter()
        if self.deadline.expired(now):
            self.observer.observe_dropped("late", images)
            self.ticket.dropped = DeadlineExceeded("the answer was ready after the request's deadline")
            raise self.ticket.dropped
        if self.admission is not None and self.encoded_at is not None:
            self.admission.after_batch.observe(now - self.encoded_at)

    def delivered(self, images: int) -> None:
        """Count the images of a 200 sent to a caller still there (goodput's numerator)."""
        if not self.ticket.left:
            self.observer.observe_delivered(images)


async def watch_disconnect(receive: Callable[[], Awaitable[dict]], on_leave: Callable[[], None]) -> None:
    """Wait for the ASGI `http.disconnect` once the body is read (uvicorn delivers it when the
    client closes the connection); cancelled by the route when it answers."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            on_leave()
            return
