"""Recent answers kept for operator feedback: the image and the result of every request, for a
window of time, in memory bounded by bytes (oldest out first).

The upload bytes are referenced, not copied: keeping an answer costs a dict entry. Ids that
left the ring (by age or by the byte bound) are remembered (ids only, bounded) so a late
feedback is told "expired" (410) rather than "unknown" (404).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from service.server.answers import Answer

FORGOTTEN_IDS = 100_000  # ids remembered after eviction, to tell "expired" from "unknown"


class UnknownRequest(LookupError):
    """No answer with this request id was given (or the service restarted since)."""


class Expired(LookupError):
    """The answer is older than the feedback window, or was evicted to stay within memory."""


class RecentAnswers:
    def __init__(self, window_s: float, max_bytes: int, clock: Callable[[], float] = time.monotonic):
        self.window_s, self.max_bytes, self._clock = window_s, max_bytes, clock
        self._answers: OrderedDict[str, tuple[float, Answer]] = OrderedDict()
        self._forgotten: OrderedDict[str, None] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._answers)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, answer: Answer) -> None:
        with self._lock:
            old = self._answers.pop(answer.request_id, None)
            if old is not None:  # a client reused its X-Request-ID: the newest answer wins
                self._bytes -= old[1].nbytes
            self._answers[answer.request_id] = (self._clock(), answer)
            self._bytes += answer.nbytes
            self._evict()

    def get(self, request_id: str) -> Answer:
        with self._lock:
            self._evict()
            entry = self._answers.get(request_id)
            if entry is not None:
                return entry[1]
            if request_id in self._forgotten:
                raise Expired(request_id)
            raise UnknownRequest(request_id)

    def _evict(self) -> None:
        """Drop what is older than the window, then the oldest until within the byte bound."""
        horizon = self._clock() - self.window_s
        while self._answers:
            request_id, (t, answer) = next(iter(self._answers.items()))
            if t > horizon and self._bytes <= self.max_bytes:
                return
            self._answers.popitem(last=False)
            self._bytes -= answer.nbytes
            self._forgotten[request_id] = None
            if len(self._forgotten) > FORGOTTEN_IDS:
                self._forgotten.popitem(last=False)
