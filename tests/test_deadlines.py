"""Deadlines, callers who left, admission by expected wait: the real server (uvicorn on a loopback
port) with the real demo artifact.

The encoder is the artifact's real ONNX Runtime backend behind a gate: a held batch is how a test
makes a queue without depending on how fast the machine is (the tiny demo encoder answers in
milliseconds, so "many concurrent requests" alone would race). Every assertion waits for the
condition it checks; the encoder's own counter (`dapo_images_processed_total`) proves what was
never encoded.
"""
from __future__ import annotations

import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.runtime.artifact import Product, load_manifest
from service.runtime.backends import create_backend
from service.server.app import create_app
from service.server.deadlines import budget_ms
from service.server.local_server import serve_in_thread
from service.server.service_times import ServiceTimes
from service.server.settings import Settings


class GatedBackend:
    """The artifact's real backend; `gate` cleared = the next batch is held inside the encoder."""

    def __init__(self, inner):
        self.inner, self.name, self.provider = inner, inner.name, inner.provider
        self.gate = threading.Event()
        self.gate.set()
        self.calls = 0

    def run(self, pixel_values, allowed):
        self.calls += 1
        self.gate.wait(60)
        return self.inner.run(pixel_values, allowed)


def png(seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


FILES = [("image", ("part.png", png(), "image/png"))]


def wait_for(predicate, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def metric(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return sample.value
    return 0.0


@pytest.fixture
def gated(demo_artifact):
    """(url, backend, app) of a server whose encoder can be held; one batch of one image at a time."""
    backend = GatedBackend(create_backend(demo_artifact, load_manifest(demo_artifact)))
    settings = Settings(artifact=demo_artifact, max_batch_size=1, max_queue_delay_ms=0, workers=1,
                        max_queue_size=256, max_files=16, warmup=True)
    app = create_app(settings, backend=backend, configure_logs=False)
    with serve_in_thread(app) as url:
        yield url, backend, app


def hold_one_batch(url: str, backend: GatedBackend, pool: ThreadPoolExecutor):
    """A request whose batch is held inside the encoder (so whatever comes next waits in the line)."""
    backend.gate.clear()
    calls = backend.calls
    held = pool.submit(httpx.post, url + "/detect", files=FILES, timeout=60)
    wait_for(lambda: backend.calls == calls + 1)
    return held


def test_a_request_whose_deadline_passes_in_the_queue_gets_504_and_is_never_encoded(gated):
    url, backend, app = gated
    batcher = app.state.service.batcher
    encoded = metric(url, "dapo_images_processed_total")
    with ThreadPoolExecutor(4) as pool:
        held = hold_one_batch(url, backend, pool)
        late = pool.submit(httpx.post, url + "/detect", files=FILES, headers={"X-Deadline-Ms": "3000"}, timeout=60)
        r = late.result()  # answered at its deadline, while the encoder is still held
        assert not held.done()
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "deadline_exceeded"
        assert metric(url, "dapo_images_dropped_total", {"cause": "deadline"}) == 1
        backend.gate.set()
        assert held.result().status_code == 200
    assert metric(url, "dapo_images_processed_total") == encoded + 1  # the held image only
    assert batcher.live_depth() == 0


def test_a_caller_who_disconnects_before_batching_costs_no_encoder_work(gated):
    url, backend, app = gated
    batcher = app.state.service.batcher
    encoded = metric(url, "dapo_images_processed_total")
    with ThreadPoolExecutor(4) as pool:
        held = hold_one_batch(url, backend, pool)
        request = httpx.Request("POST", url + "/detect", files=FILES)
        body, content_type = request.read(), request.headers["content-type"]
        target = urlparse(url)
        sock = socket.create_connection((target.hostname, target.port))
        sock.sendall(f"POST /detect HTTP/1.1\r\nHost: {target.netloc}\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_for(lambda: batcher.live_depth() == 1)  # decoded and waiting for a batch
        sock.close()  # the line moved on
        wait_for(lambda: metric(url, "dapo_images_dropped_total", {"cause": "disconnected"}) == 1)
        assert batcher.live_depth() == 0 and not held.done()
        backend.gate.set()
        assert held.result().status_code == 200
    assert metric(url, "dapo_images_processed_total") == encoded + 1  # the held image only
    assert metric(url, "dapo_images_delivered_total") >= 1


def test_a_retry_after_a_dropped_idempotent_request_runs(gated):
    url, backend, app = gated
    key = {"Idempotency-Key": "part-4711"}
    encoded = metric(url, "dapo_images_processed_total")
    with ThreadPoolExecutor(4) as pool:
        held = hold_one_batch(url, backend, pool)
        first = httpx.post(url + "/detect", files=FILES, headers={**key, "X-Deadline-Ms": "2000"}, timeout=60)
        assert first.status_code == 504 and first.json()["error"]["code"] == "deadline_exceeded"
        backend.gate.set()
        assert held.result().status_code == 200
    assert app.state.service.idempotency._lookup(f"anonymous:{key['Idempotency-Key']}") is None  # claim released
    retry = httpx.post(url + "/detect", files=FILES, headers=key, timeout=60)
    assert retry.status_code == 200, retry.text
    assert "idempotent-replayed" not in retry.headers  # it ran: nothing was stored for the dropped one
    assert metric(url, "dapo_images_processed_total") == encoded + 2  # held + the retry, not the dropped one
    again = httpx.post(url + "/detect", files=FILES, headers=key, timeout=60)
    assert again.headers.get("idempotent-replayed") == "true" and again.content == retry.content


def test_retry_after_grows_with_the_queue(gated):
    """Refused at once (503 overloaded) when the work ahead cannot finish within the deadline, with a
    Retry-After that grows with that work. The per-batch time is pinned (it is what the warm-up and
    every batch measure) so the assertion is about the rule, not about this machine's speed."""
    url, backend, app = gated
    model = app.state.service.model
    model.batcher.service_times.seed(1, 0.5)  # 0.5 s per image
    many = [("image", (f"p{i}.png", png(i), "image/png")) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        held = hold_one_batch(url, backend, pool)
        retry_after = []
        for step in range(3):
            queued = pool.submit(httpx.post, url + "/detect", files=many, timeout=120)
            wait_for(lambda n=8 * (step + 1): model.batcher.live_depth() == n)
            r = httpx.post(url + "/detect", files=FILES, headers={"X-Deadline-Ms": "1000"}, timeout=60)
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded", r.text
            retry_after.append(int(r.headers["retry-after"]))
        assert retry_after[0] >= 4  # 8 images ahead at 0.5 s, minus the 1 s budget
        assert retry_after[0] < retry_after[1] < retry_after[2], retry_after
        assert model.admission.promised_images == 0  # without a key a retry cannot be recognised
        # refused callers with an Idempotency-Key are expected back: each later one queues behind them
        keyed = []
        for name in ("late-a", "late-b", "late-a"):
            r = httpx.post(url + "/detect", files=FILES, timeout=60,
                           headers={"X-Deadline-Ms": "1000", "Idempotency-Key": name})
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded", r.text
            keyed.append(int(r.headers["retry-after"]))
        assert retry_after[2] <= keyed[0] < keyed[1], (retry_after, keyed)  # late-b queues behind late-a
        assert keyed[2] < keyed[1], keyed  # late-a, back too early, keeps its place ahead of late-b
        assert model.admission.promised_images == 2  # ... and its promise was renewed, not doubled
        backend.gate.set()
        assert held.result().status_code == 200 and queued.result().status_code == 200


def test_the_budget_comes_from_the_header_then_the_product_then_the_setting(demo_artifact):
    assert budget_ms(250, 4000, 30_000) == 250
    assert budget_ms(None, 4000, 30_000) == 4000
    assert budget_ms(None, None, 30_000) == 30_000
    assert budget_ms(None, None, 0) is None  # DAPO_REQUEST_TIMEOUT_MS=0: no deadline
    assert load_manifest(demo_artifact).products  # manifests without timeout_ms load unchanged
    assert all(p.timeout_ms is None for p in load_manifest(demo_artifact).products.values())
    with pytest.raises(ValueError):
        Product(timeout_ms=0)


def test_service_times_interpolate_between_measured_batch_sizes():
    times = ServiceTimes()
    assert times.estimate(4) is None
    times.seed(1, 0.1)
    times.seed(8, 0.8)
    assert times.estimate(4) == pytest.approx(0.4)
    assert times.estimate(16) == pytest.approx(1.6)
    times.observe(8, 1.8)  # the first real batch replaces the warm-up's figure
    assert times.estimate(8) == pytest.approx(1.8)
    times.observe(8, 1.0)  # later ones are averaged, and their spread is added (a safety margin)
    mean = 1.8 + 0.3 * (1.0 - 1.8)
    assert times.estimate(8) == pytest.approx(mean + 2.0 * 0.3 * 0.8)
