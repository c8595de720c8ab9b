"""The micro-batcher against a real (numpy) backend: batching, bounds, failures, shutdown."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from numpy_backend import NumpyBackend

from service.server.batching import BackendError, MicroBatcher, QueueFull

S, C = 8, 4
ALLOWED = np.ones(C, dtype=bool)


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(3, S, S)).astype(np.float32)


class Recorder:
    def __init__(self):
        self.batches: list[int] = []
        self.waits: list[float] = []
        self.depths: list[int] = []

    def observe_batch(self, size, inference_s):
        self.batches.append(size)

    def observe_queue_wait(self, seconds):
        self.waits.append(seconds)

    def set_queue_depth(self, depth):
        self.depths.append(depth)


async def started(backend, **kw) -> MicroBatcher:
    batcher = MicroBatcher(backend.run, **kw)
    await batcher.start()
    return batcher


def test_concurrent_submits_are_batched_and_equal_single_runs():
    backend = NumpyBackend(C)
    rec = Recorder()

    async def main():
        b = await started(backend, max_batch_size=8, max_queue_delay_ms=20, observer=rec)
        results = await asyncio.gather(*(b.submit(image(i), ALLOWED) for i in range(20)))
        await b.stop()
        return results

    results = asyncio.run(main())
    assert max(backend.batch_sizes) > 1 and max(backend.batch_sizes) <= 8
    assert sum(backend.batch_sizes) == 20 and rec.batches == backend.batch_sizes
    assert len(rec.waits) == 20 and "MainThread" not in backend.threads
    for i, r in enumerate(results):
        alone = backend.run(image(i)[None], ALLOWED[None])
        for name in ("anomaly_score", "type_scores", "anomaly_map", "type_map", "class_max"):
            np.testing.assert_array_equal(getattr(r.outputs, name), getattr(alone, name))
        assert r.outputs.anomaly_map.shape == (1, S, S) and r.batch_size >= 1


def test_allowed_is_per_item():
    backend = NumpyBackend(C)

    async def main():
        b = await started(backend, max_batch_size=4, max_queue_delay_ms=20)
        only_normal = np.array([True, False, False, False])
        r1, r2 = await asyncio.gather(b.submit(image(1), ALLOWED), b.submit(image(1), only_normal))
        await b.stop()
        return r1, r2

    r1, r2 = asyncio.run(main())
    assert r1.batch_size == 2
    assert (r2.outputs.type_map == 0).all() and r1.outputs.type_map.any()


def test_single_image_waits_at_most_about_the_delay():
    async def main(delay_ms):
        b = await started(NumpyBackend(C), max_batch_size=8, max_queue_delay_ms=delay_ms)
        t0 = time.perf_counter()
        await b.submit(image(0), ALLOWED)
        elapsed = time.perf_counter() - t0
        await b.stop()
        return elapsed

    assert asyncio.run(main(0)) < 0.5
    assert 0.05 <= asyncio.run(main(50)) < 1.0


def test_queue_full_is_immediate_and_all_or_nothing():
    gate = threading.Event()
    backend = NumpyBackend(C, gate=gate)

    async def main():
        b = await started(backend, max_batch_size=1, max_queue_delay_ms=0, max_queue_size=3, workers=1)
        first = asyncio.create_task(b.submit(image(0), ALLOWED))
        while not backend.batch_sizes:  # wait until the first image is inside the backend
            await asyncio.sleep(0.005)
        waiting = [asyncio.create_task(b.submit(image(i), ALLOWED)) for i in (1, 2)]
        await asyncio.sleep(0.01)
        assert b.depth == 2
        with pytest.raises(QueueFull):
            await b.submit_many([(image(3), ALLOWED), (image(4), ALLOWED)])  # room for one only
        assert b.depth == 2  # nothing of the refused request was queued
        gate.set()
        await asyncio.gather(first, *waiting)
        await b.stop()

    asyncio.run(main())
    assert backend.batch_sizes == [1, 1, 1]


def test_backend_failure_fails_only_that_batch():
    backend = NumpyBackend(C, fail=True)

    async def main():
        b = await started(backend, max_batch_size=4, max_queue_delay_ms=10)
        with pytest.raises(BackendError):
            await b.submit(image(0), ALLOWED)
        backend.fail = False
        ok = await b.submit(image(1), ALLOWED)
        assert b.running
        await b.stop()
        return ok

    assert asyncio.run(main()).outputs.anomaly_score.shape == (1,)


def test_cancelled_requests_are_skipped():
    gate = threading.Event()
    backend = NumpyBackend(C, gate=gate)

    async def main():
        b = await started(backend, max_batch_size=8, max_queue_delay_ms=0, workers=1)
        first = asyncio.create_task(b.submit(image(0), ALLOWED))
        while not backend.batch_sizes:
            await asyncio.sleep(0.005)
        gone = asyncio.create_task(b.submit_many([(image(1), ALLOWED), (image(2), ALLOWED)]))
        kept = asyncio.create_task(b.submit(image(3), ALLOWED))
        await asyncio.sleep(0.01)
        gone.cancel()
        gate.set()
        await first
        result = await kept
        await b.stop()
        return result

    result = asyncio.run(main())
    assert backend.batch_sizes == [1, 1] and result.batch_size == 1


def test_stop_drains_queued_and_running_work_then_refuses():
    gate = threading.Event()
    backend = NumpyBackend(C, gate=gate)

    async def main():
        b = await started(backend, max_batch_size=2, max_queue_delay_ms=0, workers=1)
        tasks = [asyncio.create_task(b.submit(image(i), ALLOWED)) for i in range(5)]
        await asyncio.sleep(0.02)
        stopping = asyncio.create_task(b.stop())
        await asyncio.sleep(0.02)
        with pytest.raises(QueueFull):
            await b.submit(image(9), ALLOWED)
        gate.set()
        await stopping
        return [t.result() for t in tasks]

    results = asyncio.run(main())
    assert len(results) == 5 and sum(backend.batch_sizes) == 5


def test_several_workers_run_batches_concurrently():
    gate = threading.Event()
    backend = NumpyBackend(C, gate=gate)

    async def main():
        b = await started(backend, max_batch_size=1, max_queue_delay_ms=0, workers=2)
        tasks = [asyncio.create_task(b.submit(image(i), ALLOWED)) for i in range(2)]
        deadline = time.perf_counter() + 2
        while len(backend.batch_sizes) < 2 and time.perf_counter() < deadline:
            await asyncio.sleep(0.005)
        both_inside = len(backend.batch_sizes) == 2
        gate.set()
        await asyncio.gather(*tasks)
        await b.stop()
        return both_inside

    assert asyncio.run(main())
