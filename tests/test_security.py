"""API keys and the idempotency store (real asyncio, injected clock for the TTL)."""
from __future__ import annotations

import asyncio

import pytest
from pydantic import SecretStr

from service.server.auth import ApiKeys, principal_of
from service.server.idempotency import IdempotencyConflict, MemoryIdempotencyStore, StoredResponse, request_fingerprint


def test_api_keys_from_env_and_file(tmp_path):
    f = tmp_path / "keys.txt"
    f.write_text("# line 3 gateway\nfile-key\n\n  spaced-key  \n")
    keys = ApiKeys.from_settings([SecretStr("env-key")], f)
    assert keys.enabled
    for good in ("env-key", "file-key", "spaced-key"):
        assert keys.check(good) == principal_of(good)
    for bad in (None, "", "env-key ", "ENV-KEY", "# line 3 gateway", "é"):
        assert keys.check(bad) is None
    assert ApiKeys([]).check(None) == "anonymous" and not ApiKeys([]).enabled


def test_fingerprint_ignores_nothing_that_matters():
    base = request_fingerprint("/detect", [("heatmap", "true")], [("part_id", "1")], [("image", "a.png", b"123")])
    assert base == request_fingerprint("/detect", [("heatmap", "true")], [("part_id", "1")], [("image", "a.png", b"123")])
    assert base != request_fingerprint("/detect", [("heatmap", "false")], [("part_id", "1")], [("image", "a.png", b"123")])
    assert base != request_fingerprint("/detect", [("heatmap", "true")], [("part_id", "2")], [("image", "a.png", b"123")])
    assert base != request_fingerprint("/detect", [("heatmap", "true")], [("part_id", "1")], [("image", "a.png", b"124")])


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_store_replays_conflicts_expires_and_evicts():
    clock = Clock()
    store = MemoryIdempotencyStore(ttl_s=10, max_entries=2, clock=clock)
    runs = []

    async def produce(tag):
        runs.append(tag)
        return StoredResponse(200, tag.encode())

    async def main():
        assert await store.run("k1", "f1", lambda: produce("a")) == (StoredResponse(200, b"a"), False)
        assert await store.run("k1", "f1", lambda: produce("b")) == (StoredResponse(200, b"a"), True)
        with pytest.raises(IdempotencyConflict):
            await store.run("k1", "other", lambda: produce("c"))
        clock.now = 11  # expired: runs again
        assert (await store.run("k1", "other", lambda: produce("d")))[1] is False
        await store.run("k2", "f", lambda: produce("e"))
        await store.run("k3", "f", lambda: produce("f"))  # evicts the least recently used (k1)
        assert len(store) == 2
        assert (await store.run("k1", "other", lambda: produce("g")))[1] is False

    asyncio.run(main())
    assert runs == ["a", "d", "e", "f", "g"]


def test_failures_are_not_stored_and_concurrent_duplicates_wait():
    store = MemoryIdempotencyStore()
    calls = 0

    async def slow():
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return StoredResponse(200, b"ok")

    async def failing():
        raise RuntimeError("queue full")

    async def main():
        with pytest.raises(RuntimeError):
            await store.run("k", "f", failing)
        assert len(store) == 0
        results = await asyncio.gather(*(store.run("k", "f", slow) for _ in range(5)))
        return results

    results = asyncio.run(main())
    assert calls == 1 and [r[0].body for r in results] == [b"ok"] * 5
    assert sorted(r[1] for r in results) == [False, True, True, True, True]
