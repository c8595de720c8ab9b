"""A bounded outbound queue and its worker thread: what keeps a sink from ever slowing /detect.

`offer` (event loop) appends and returns at once. When the queue is full the OLDEST message is
dropped and counted: a line cares about the newest results first, and the queue's memory stays
bounded however long the receiver is down. One worker thread per sink takes messages in order,
waits for the sink's rate limit (a token bucket), and hands each to the transport:

- delivered: counted, next message;
- retry (receiver down, 5xx, timeout): the message goes back to the head of the queue and the
  worker waits (exponential backoff, capped); a message is never lost by a failed attempt,
  only by drop-oldest, so delivery is at least once and receivers dedupe on the message key;
- rejected (the receiver refused this message for good, e.g. HTTP 400): counted and skipped.

An outage is logged once when it starts and once when it ends (with how many were dropped),
never per message. On shutdown the worker gets a short while to drain what is queued.
"""
from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from service.server.answers import ResultMessage
from service.server.metrics import LoopMetrics

log = logging.getLogger("dapo.sinks")


class Status(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    REJECTED = "rejected"


@dataclass(frozen=True)
class Outcome:
    status: Status
    reason: str = ""
    retry_after_s: float | None = None  # the receiver's own hint (HTTP Retry-After)


DELIVERED = Outcome(Status.DELIVERED)


class Transport(Protocol):
    """One kind of receiver (MQTT broker, HTTP endpoint)."""

    name: str

    def start(self) -> None: ...

    def deliver(self, message: ResultMessage, cancel: threading.Event) -> Outcome: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class OutboxOptions:
    queue_size: int = 1000
    rate_per_s: float = 100.0
    burst: int = 1  # tokens the bucket holds: 1 = messages evenly spaced at rate_per_s
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    drain_s: float = 5.0  # how long shutdown waits for the queue to empty


class TokenBucket:
    """At most `rate` per second on average, `burst` at once (worker thread only)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self._clock = rate, max(1, burst), clock
        self._tokens, self._last = float(self.burst), clock()

    def wait(self, cancel: threading.Event) -> None:
        while True:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return
            if cancel.wait((1.0 - self._tokens) / self.rate):
                return


class Outbox:
    """The queue and worker of one sink."""

    def __init__(self, transport: Transport, options: OutboxOptions, metrics: LoopMetrics):
        self.transport, self.options, self.name = transport, options, transport.name
        self._queue: deque[ResultMessage] = deque()
        self._cond = threading.Condition()
        self._stopping = threading.Event()  # no new messages; drain then exit
        self._cancel = threading.Event()  # drain time is over: abandon the attempt in progress
        self._thread: threading.Thread | None = None
        self._delivered = metrics.sink_delivered.labels(self.name)
        self._dropped = metrics.sink_dropped.labels(self.name)
        self._rejected = metrics.sink_rejected.labels(self.name)
        self._retries = metrics.sink_retries.labels(self.name)
        metrics.sink_queue.labels(self.name).set_function(lambda: len(self._queue))  # read at scrape time
        self._up = metrics.sink_up.labels(self.name)
        self._outage: _Outage | None = None
        self._overflowing = False

    # --- event loop side ----------------------------------------------------------------
    def offer(self, message: ResultMessage) -> None:
        """Queue a message; never blocks (drops the oldest when full)."""
        with self._cond:
            if len(self._queue) >= self.options.queue_size:
                self._queue.popleft()
                self._count_drop()
            self._queue.append(message)
            self._cond.notify()

    def _count_drop(self) -> None:  # holding the lock
        self._dropped.inc()
        if self._outage is not None:
            self._outage.dropped += 1
        if not self._overflowing:
            self._overflowing = True
            log.warning("sink %s: queue full (%d), dropping the oldest results", self.name, self.options.queue_size,
                        extra={"sink": self.name})

    @property
    def depth(self) -> int:
        return len(self._queue)

    # --- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self.transport.start()
        self._up.set(1)
        self._thread = threading.Thread(target=self._run, name=f"dapo-sink-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop taking messages, give the worker `drain_s` to empty the queue, close the transport."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(self.options.drain_s)
            self._cancel.set()
            self._thread.join(5.0)
        left = len(self._queue)
        if left:
            log.warning("sink %s: %d results not delivered at shutdown", self.name, left, extra={"sink": self.name})
        self.transport.close()

    # --- worker -------------------------------------------------------------------------
    def _next(self) -> ResultMessage | None:
        with self._cond:
            while not self._queue:
                if self._stopping.is_set():
                    return None
                self._cond.wait(1.0)
            if len(self._queue) <= self.options.queue_size // 2:
                self._overflowing = False
            return self._queue.popleft()

    def _requeue(self, message: ResultMessage) -> None:
        """Back to the head after a failed attempt; if newer ones filled the queue, it is the oldest."""
        with self._cond:
            if len(self._queue) >= self.options.queue_size:
                self._count_drop()
            else:
                self._queue.appendleft(message)

    def _run(self) -> None:
        bucket = TokenBucket(self.options.rate_per_s, self.options.burst)
        backoff = self.options.backoff_initial_s
        while (message := self._next()) is not None:
            bucket.wait(self._cancel)
            if self._cancel.is_set():
                self._requeue(message)
                return
            try:
                outcome = self.transport.deliver(message, self._cancel)
            except Exception as e:  # a transport bug must not kill the worker
                log.exception("sink %s: delivery raised", self.name, extra={"sink": self.name})
                outcome = Outcome(Status.RETRY, f"{type(e).__name__}: {e}")
            if outcome.status is Status.DELIVERED:
                self._delivered.inc()
                self._mark_up()
                backoff = self.options.backoff_initial_s
            elif outcome.status is Status.REJECTED:
                self._rejected.inc()
                self._mark_up()  # the receiver answered: it is up, it just refused this one
                log.warning("sink %s: result %s rejected: %s", self.name, message.key, outcome.reason,
                            extra={"sink": self.name})
            else:
                self._retries.inc()
                self._requeue(message)
                self._mark_down(outcome.reason)
                if self._stopping.is_set():
                    return  # no retries during shutdown: what is left is reported by stop()
                delay = outcome.retry_after_s if outcome.retry_after_s is not None else backoff
                self._stopping.wait(min(delay, self.options.backoff_max_s))
                backoff = min(backoff * 2.0, self.options.backoff_max_s)

    def _mark_down(self, reason: str) -> None:
        with self._cond:
            started = self._outage is None
            if started:
                self._outage = _Outage(time.monotonic())
        if started:
            self._up.set(0)
            log.warning("sink %s down: %s; results wait in the queue (at most %d, then the oldest are dropped)",
                        self.name, reason, self.options.queue_size, extra={"sink": self.name})

    def _mark_up(self) -> None:
        with self._cond:
            outage, self._outage = self._outage, None
        if outage is not None:
            self._up.set(1)
            log.warning("sink %s back after %.1f s; %d results dropped meanwhile", self.name,
                        time.monotonic() - outage.since, outage.dropped, extra={"sink": self.name})


@dataclass
class _Outage:
    since: float
    dropped: int = 0
