"""Recent answers kept for operator feedback: the image and the result of every answer, for a
window of time, in memory bounded by bytes (oldest out first).

Answers are keyed by the server's answer id (`service.server.answers.new_answer_id`), never by
the caller's X-Request-ID, which a client may reuse: two parts sent under one request id are two
answers. A verdict that names only a request id is resolved through an index of request id ->
answer ids; when two answers share it the lookup refuses (`Ambiguous`), it never guesses.

Two implementations of one `RecentStore` protocol: `LocalRecent` here (one process; the
upload bytes are referenced, not copied, so keeping an answer costs a dict entry) and
`service.server.fleet.recent.RedisRecent` (a fleet: `DAPO_STATE_URL`). Ids that left the ring
(by age or by the byte bound) are remembered (ids only, bounded) so a late feedback is told
"expired" (410) rather than "unknown" (404).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from service.server.answers import Answer

FORGOTTEN_IDS = 100_000  # ids remembered after eviction, to tell "expired" from "unknown"


class UnknownRequest(LookupError):
    """No answer with this id was given (or the service restarted since)."""


class Expired(LookupError):
    """The answer is older than the feedback window, or was evicted to stay within memory."""


class Ambiguous(LookupError):
    """Several answers share this X-Request-ID: the verdict must name the answer_id."""

    def __init__(self, request_id: str, answer_ids: list[str]):
        super().__init__(request_id)
        self.answer_ids = answer_ids


class RecentStore(Protocol):
    """Where feedback finds the answers it refers to (in process, or shared by a fleet)."""

    async def remember(self, answer: Answer) -> None: ...

    async def by_answer(self, answer_id: str) -> Answer: ...

    async def by_request(self, request_id: str) -> Answer: ...

    def close(self) -> None: ...


class RecentAnswers:
    """The in-process ring (thread-safe, synchronous)."""

    def __init__(self, window_s: float, max_bytes: int, clock: Callable[[], float] = time.monotonic):
        self.window_s, self.max_bytes, self._clock = window_s, max_bytes, clock
        self._answers: OrderedDict[str, tuple[float, Answer]] = OrderedDict()
        self._forgotten: OrderedDict[str, None] = OrderedDict()
        self._requests: OrderedDict[str, list[str]] = OrderedDict()  # request id -> answer ids
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._answers)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, answer: Answer) -> None:
        with self._lock:
            old = self._answers.pop(answer.answer_id, None)
            if old is not None:
                self._bytes -= old[1].nbytes
            self._answers[answer.answer_id] = (self._clock(), answer)
            self._bytes += answer.nbytes
            ids = self._requests.setdefault(answer.request_id, [])
            if answer.answer_id not in ids:
                ids.append(answer.answer_id)
            self._requests.move_to_end(answer.request_id)
            self._evict()

    def get(self, answer_id: str) -> Answer:
        with self._lock:
            self._evict()
            entry = self._answers.get(answer_id)
            if entry is not None:
                return entry[1]
            if answer_id in self._forgotten:
                raise Expired(answer_id)
            raise UnknownRequest(answer_id)

    def find(self, request_id: str) -> Answer:
        """The one answer given under this X-Request-ID; Ambiguous when there were several
        (evicted ones included: a verdict must not fall on the one left by chance)."""
        with self._lock:
            ids = list(self._requests.get(request_id, ()))
        if len(ids) > 1:
            raise Ambiguous(request_id, ids)
        if not ids:
            raise UnknownRequest(request_id)
        return self.get(ids[0])

    def _evict(self) -> None:
        """Drop what is older than the window, then the oldest until within the byte bound."""
        horizon = self._clock() - self.window_s
        while self._answers:
            answer_id, (t, answer) = next(iter(self._answers.items()))
            if t > horizon and self._bytes <= self.max_bytes:
                break
            self._answers.popitem(last=False)
            self._bytes -= answer.nbytes
            self._forgotten[answer_id] = None
            if len(self._forgotten) > FORGOTTEN_IDS:
                self._forgotten.popitem(last=False)
        while len(self._requests) > FORGOTTEN_IDS + len(self._answers):
            self._requests.popitem(last=False)


class LocalRecent:
    """`RecentStore` over the in-process ring (one process: `DAPO_STATE_URL` unset)."""

    def __init__(self, ring: RecentAnswers):
        self.ring = ring

    async def remember(self, answer: Answer) -> None:
        self.ring.put(answer)

    async def by_answer(self, answer_id: str) -> Answer:
        return self.ring.get(answer_id)

    async def by_request(self, request_id: str) -> Answer:
        return self.ring.find(request_id)

    def close(self) -> None:
        pass
