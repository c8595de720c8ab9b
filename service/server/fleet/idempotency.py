"""Idempotency-Key records in Redis: the same semantics as the in-process store
(`service.server.idempotency.MemoryIdempotencyStore`), across replicas.

    SET dapo:idem:<principal>:<key> "claimed <fingerprint> <token>" NX PX <claim_ttl>

decides who runs: exactly one of any number of concurrent requests with one key, on any
replica. The winner runs and replaces the claim with the stored answer (PX = the TTL); a
failure deletes its own claim (compare-and-delete), so a retry runs again. The others poll the
record: a stored answer is replayed (same fingerprint) or refused (422 `idempotency_conflict`),
a claim that disappears (the first failed) answers 503 `retry`. Redis down: 503
`state_unavailable` rather than a possible duplicate.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import Awaitable, Callable

from service.server.fleet.link import StateLink, StateUnavailable
from service.server.idempotency import IdempotencyConflict, IdempotencyInterrupted, StoredResponse

CLAIMED, DONE = b"C", b"D"
_RELEASE = """if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"""


def claim_record(fingerprint: str, token: str) -> bytes:
    return CLAIMED + json.dumps({"fp": fingerprint, "token": token}).encode()


def done_record(fingerprint: str, response: StoredResponse) -> bytes:
    head = json.dumps({"fp": fingerprint, "status": response.status, "media_type": response.media_type}).encode()
    return DONE + head + b"\n" + response.body


def parse(raw: bytes) -> tuple[bytes, dict, bytes]:
    kind, rest = raw[:1], raw[1:]
    head, _, body = rest.partition(b"\n")
    return kind, json.loads(head), body


class RedisIdempotencyStore:
    def __init__(self, link: StateLink, ttl_s: float, claim_ttl_s: float, poll_s: float = 0.02):
        self.link, self.ttl_ms, self.claim_ttl_s, self.poll_s = link, int(ttl_s * 1000), claim_ttl_s, poll_s

    def _key(self, key: str) -> str:
        return f"{self.link.prefix}idem:{key}"

    async def run(self, key: str, fingerprint: str,
                  produce: Callable[[], Awaitable[StoredResponse]]) -> tuple[StoredResponse, bool]:
        rkey = self._key(key)
        deadline = time.monotonic() + self.claim_ttl_s
        seen_claim = False
        while True:
            token = uuid.uuid4().hex
            claim = claim_record(fingerprint, token)
            won = await self.link.call("idempotency", lambda c, claim=claim: c.set(
                rkey, claim, nx=True, px=int(self.claim_ttl_s * 1000)))
            if won:
                return await self._produce(rkey, fingerprint, claim, produce), False
            raw = await self.link.call("idempotency", lambda c: c.get(rkey))
            if raw is None:
                if seen_claim:  # the first request ended without an answer (as in one process: 503 retry)
                    raise IdempotencyInterrupted("the original request with this Idempotency-Key ended "
                                                 "without an answer; retry")
                continue  # expired between SET and GET: try to claim again
            kind, head, body = parse(raw)
            if not hmac.compare_digest(head["fp"], fingerprint):
                raise IdempotencyConflict("Idempotency-Key was already used with a different request")
            if kind == DONE:
                return StoredResponse(head["status"], body, head["media_type"]), True
            seen_claim = True
            if time.monotonic() > deadline:
                raise IdempotencyInterrupted("the original request with this Idempotency-Key is still running; "
                                             "retry")
            await asyncio.sleep(self.poll_s)

    async def _produce(self, rkey: str, fingerprint: str, claim: bytes,
                       produce: Callable[[], Awaitable[StoredResponse]]) -> StoredResponse:
        try:
            response = await produce()
        except BaseException:
            try:  # release our claim so a retry runs again (best effort: it expires anyway)
                await asyncio.shield(self.link.call("idempotency", lambda c: c.eval(_RELEASE, 1, rkey, claim)))
            except (StateUnavailable, asyncio.CancelledError):
                pass
            raise
        try:
            record = done_record(fingerprint, response)
            await self.link.call("idempotency", lambda c: c.set(rkey, record, px=self.ttl_ms))
        except StateUnavailable:
            pass  # answered but not stored: the claim blocks a rerun until it expires (counted by the link)
        return response
