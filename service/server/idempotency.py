"""Idempotent retries (`Idempotency-Key` header).

The first request with a key runs; its 200 answer is kept (bounded LRU, TTL from completion)
and a retry with the same key and the same request gets that answer back without a second
inference. A concurrent duplicate waits for the first. The same key with a different request is
refused (422). Failures are not stored, so a retry after a 503 really runs again. Keys are
scoped by the caller's principal (`service.server.auth`).

"Same request" is a fingerprint of what the request means: path, query, the form fields and,
per uploaded file, field name, filename and SHA-256 of its bytes. Hashing the raw multipart body
instead would turn an honest retry into a conflict whenever the client library draws a new
multipart boundary, which most do on every call.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

MAX_IDEMPOTENCY_KEY_LEN = 255


class IdempotencyConflict(ValueError):
    """The key was already used for a different request (422)."""


class IdempotencyInterrupted(RuntimeError):
    """The first request with this key ended without an answer; the caller should retry (503)."""


@dataclass(frozen=True)
class StoredResponse:
    """A complete answer as sent the first time."""

    status: int
    body: bytes
    media_type: str = "application/json"


@dataclass
class _Entry:
    fingerprint: str
    future: asyncio.Future
    expires: float = math.inf


def request_fingerprint(path: str, query: Iterable[tuple[str, str]], fields: Iterable[tuple[str, str]],
                        files: Iterable[tuple[str, str, bytes]]) -> str:
    """SHA-256 over the request's meaning (see the module docstring), order-preserving."""
    doc = {
        "path": path,
        "query": sorted(query),
        "fields": sorted(fields),
        "files": [[name, filename, hashlib.sha256(data).hexdigest()] for name, filename, data in files],
    }
    return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode("utf-8")).hexdigest()


class IdempotencyStore(Protocol):
    """Where Idempotency-Key records live: `MemoryIdempotencyStore` (one process) or
    `service.server.fleet.idempotency.RedisIdempotencyStore` (a fleet, DAPO_STATE_URL)."""

    async def run(self, key: str, fingerprint: str,
                  produce: Callable[[], Awaitable[StoredResponse]]) -> tuple[StoredResponse, bool]:
        """The answer for this key (running `produce` only the first time) and whether replayed."""
        ...


class MemoryIdempotencyStore:
    """Bounded LRU of answers with a TTL; concurrent duplicates share the first one's future."""

    def __init__(self, ttl_s: float = 600.0, max_entries: int = 1024,
                 clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _lookup(self, key: str) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None and entry.expires <= self._clock():
            del self._entries[key]
            return None
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def _evict(self) -> None:
        """Drop expired entries, then the least recently used, down to max_entries."""
        if len(self._entries) <= self.max_entries:
            return
        now = self._clock()
        for key in [k for k, e in self._entries.items() if e.expires <= now]:
            del self._entries[key]
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def run(self, key: str, fingerprint: str,
                  produce: Callable[[], Awaitable[StoredResponse]]) -> tuple[StoredResponse, bool]:
        """The answer for this key (running `produce` only the first time) and whether replayed."""
        entry = self._lookup(key)
        if entry is not None:
            if not hmac.compare_digest(entry.fingerprint, fingerprint):
                raise IdempotencyConflict("Idempotency-Key was already used with a different request")
            return await asyncio.shield(entry.future), True
        entry = _Entry(fingerprint, asyncio.get_running_loop().create_future())
        self._entries[key] = entry
        self._evict()
        try:
            response = await produce()
        except BaseException as e:
            if self._entries.get(key) is entry:
                del self._entries[key]  # failures are not remembered: a retry runs again
            failure = e if isinstance(e, Exception) else IdempotencyInterrupted(
                "the original request with this Idempotency-Key was interrupted; retry")
            entry.future.set_exception(failure)
            entry.future.exception()  # mark retrieved: waiters are optional
            raise
        entry.expires = self._clock() + self.ttl_s
        entry.future.set_result(response)
        return response, False
