"""Faults: a broken artifact, a failing backend, SIGTERM under load.

Decided behaviour for a broken artifact: `dapo serve` REFUSES TO START. It exits non-zero and
its stderr names the offending file (a missing folder or manifest is caught by the CLI before
uvicorn starts: exit 1; anything found while loading - truncated or tampered file, invalid
manifest, unloadable encoder - fails the app's startup: one `cannot start: <path>: <why>` log
line, then uvicorn exits 3). The process never comes up half-ready; /readyz answers 503 only
during a normal startup and during shutdown (tested in test_api.py).
"""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from robust_util import Server, assert_envelope, encode, free_port, png_bytes
from service.server.app import create_app
from service.runtime.artifact import file_entry, load_manifest
from service.runtime.backends import create_backend
from service.server.settings import Settings


def serve_and_fail(artifact: Path, timeout: float = 90.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", "serve", "--artifact", str(artifact),
                           "--host", "127.0.0.1", "--port", str(free_port())],
                          capture_output=True, text=True, timeout=timeout)


def broken_copy(src: Path, dst: Path, how: str) -> str:
    """Copy the artifact and break it; returns the file name the error must mention."""
    shutil.copytree(src, dst)
    manifest = dst / "manifest.json"
    if how == "missing_folder":
        shutil.rmtree(dst)
        return dst.name
    if how == "missing_manifest":
        manifest.unlink()
        return "manifest.json"
    if how == "missing_file":
        (dst / "text_features.safetensors").unlink()
        return "text_features.safetensors"
    if how == "truncated":
        f = dst / "encoder.onnx"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        return "encoder.onnx"
    if how == "sha_mismatch":  # same size, one byte flipped: only the hash can tell
        f = dst / "text_features.safetensors"
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
        return "text_features.safetensors"
    if how == "invalid_json":
        manifest.write_text(manifest.read_text()[:-40])
        return "manifest.json"
    if how == "invalid_schema":
        doc = json.loads(manifest.read_text())
        doc["vocabulary"][0]["name"] = "scratchy"
        manifest.write_text(json.dumps(doc))
        return "manifest.json"
    if how == "garbage_encoder_rehashed":  # hashes agree, the model itself is garbage
        f = dst / "encoder.onnx"
        f.write_bytes(b"not an onnx model" * 100)
        doc = json.loads(manifest.read_text())
        doc["files"]["encoder.onnx"] = file_entry(f).model_dump()
        manifest.write_text(json.dumps(doc))
        return "encoder.onnx"
    raise ValueError(how)


BREAKAGES = ["missing_folder", "missing_manifest", "missing_file", "truncated", "sha_mismatch", "invalid_json",
             "invalid_schema", "garbage_encoder_rehashed"]


@pytest.fixture(scope="module")
def refusals(demo_artifact, tmp_path_factory) -> dict[str, tuple[str, subprocess.CompletedProcess]]:
    """`dapo serve` on every broken copy, the processes run side by side (each is a whole
    interpreter start, ~2.5 s): breakage -> (the file its error must name, the finished process)."""
    root = tmp_path_factory.mktemp("broken")
    names = {how: broken_copy(demo_artifact, root / f"art-{how}", how) for how in BREAKAGES}
    with ThreadPoolExecutor(len(BREAKAGES)) as pool:
        done = dict(zip(BREAKAGES, pool.map(lambda how: serve_and_fail(root / f"art-{how}"), BREAKAGES)))
    return {how: (names[how], done[how]) for how in BREAKAGES}


@pytest.mark.parametrize("how", BREAKAGES)
def test_broken_artifact_refuses_to_start_naming_the_file(refusals, how):
    name, result = refusals[how]
    caught_by_cli = how in ("missing_folder", "missing_manifest")  # before uvicorn starts: 1; startup: 3
    assert result.returncode == (1 if caught_by_cli else 3), result.stderr[-2000:]
    assert name in result.stderr, result.stderr[-2000:]
    if not caught_by_cli:
        lines = [json.loads(x) for x in result.stderr.splitlines() if x.startswith("{")]
        cannot = [x for x in lines if x["message"].startswith("cannot start")]
        assert cannot and name in cannot[0]["message"], lines  # one clear line, not only a traceback


@pytest.mark.parametrize("how", BREAKAGES)
def test_broken_artifact_in_process_never_becomes_ready(demo_artifact, tmp_path, how):
    """Embedded use (create_app + TestClient): startup raises with the file named."""
    folder = tmp_path / f"art-{how}"
    name = broken_copy(demo_artifact, folder, how)
    app = create_app(Settings(artifact=folder, warmup=False), configure_logs=False)
    with pytest.raises(Exception, match=re.escape(name)):
        with TestClient(app):
            pass
    assert app.state.service.ready is False


# --- backend failures -----------------------------------------------------------------------
class FailSecondCall:
    """The real backend; call 1 is held at a gate, call 2 raises, later calls work."""

    def __init__(self, inner):
        self.inner = inner
        self.name, self.provider = inner.name, inner.provider
        self.calls = 0
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.lock = threading.Lock()

    def run(self, pixel_values, allowed):
        with self.lock:
            self.calls += 1
            n = self.calls
        self.sizes.append(len(pixel_values))
        if n == 1:
            self.gate.wait(20)
        if n == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.inner.run(pixel_values, allowed)


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


def test_backend_failure_fails_only_that_batch(demo_artifact):
    backend = FailSecondCall(create_backend(demo_artifact, load_manifest(demo_artifact)))
    settings = Settings(artifact=demo_artifact, max_batch_size=4, max_queue_delay_ms=200, max_queue_size=16,
                        workers=1, warmup=False)
    app = create_app(settings, backend=backend, configure_logs=False)
    send = lambda c, i: c.post("/detect", files=[("image", (f"{i}.png", png_bytes(), "image/png"))])  # noqa: E731
    with TestClient(app, raise_server_exceptions=False) as c, ThreadPoolExecutor(8) as pool:
        batcher = app.state.service.batcher
        first = pool.submit(send, c, 0)
        wait_for(lambda: backend.calls == 1)  # batch 1 (one image) is held inside the backend
        doomed = [pool.submit(send, c, i) for i in range(1, 5)]
        wait_for(lambda: batcher.depth == 4)  # batch 2 will hold exactly these four
        backend.gate.set()
        assert first.result().status_code == 200
        for f in doomed:
            err = assert_envelope(f.result(), {503})
            assert err["code"] == "inference_failed" and "retry-after" in f.result().headers
            assert "illegal memory" not in err["message"]  # internals are logged, not returned
        assert backend.sizes[:2] == [1, 4]
        after = [pool.submit(send, c, i) for i in range(5, 9)]  # the service recovered
        assert all(f.result().status_code == 200 for f in after)
        assert c.get("/readyz").status_code == 200


def test_backend_failing_every_call_keeps_the_process_serving_errors(demo_artifact):
    class AlwaysFails:
        name, provider = "broken", "none"

        def run(self, pixel_values, allowed):
            raise MemoryError("out of device memory")

    app = create_app(Settings(artifact=demo_artifact, warmup=False), backend=AlwaysFails(), configure_logs=False)
    with TestClient(app, raise_server_exceptions=False) as c:
        for _ in range(5):
            assert_envelope(c.post("/detect", files=[("image", ("x.png", png_bytes(), "image/png"))]), {503})
        assert c.get("/livez").status_code == 200


# --- SIGTERM mid-load -------------------------------------------------------------------------
def big_png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (900, 1200, 3), dtype=np.uint8)
    return encode(Image.fromarray(arr), "PNG", compress_level=1)


def in_flight(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith("dapo_requests_in_flight "):
            return float(line.split()[1])
    return 0.0


def test_sigterm_mid_load_finishes_every_in_flight_request(demo_artifact, tmp_path):
    n = 8
    images = [big_png(i) for i in range(n)]
    with Server(demo_artifact, env={"DAPO_MAX_BATCH_SIZE": "2", "DAPO_MAX_QUEUE_SIZE": "16", "DAPO_WORKERS": "1",
                                    "DAPO_LOG_LEVEL": "INFO"}, log_path=tmp_path / "server.log") as server:
        server.wait_ready()

        def post(data: bytes) -> httpx.Response:  # slow-ish: big image, every rendering on
            return httpx.post(server.url + "/detect?mask_format=png&heatmap=true&overlay=true",
                              files=[("image", ("big.png", data, "image/png"))], timeout=120)

        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(post, d) for d in images]
            wait_for(lambda: in_flight(server.url) >= n + 1 or all(f.done() for f in futures), timeout=60)
            assert not any(f.done() for f in futures), "requests finished before SIGTERM: make them slower"
            server.proc.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        code = server.proc.wait(60)
    log = (tmp_path / "server.log").read_text()
    assert [r.status_code for r in responses] == [200] * n, [r.text[:200] for r in responses if r.status_code != 200]
    for r in responses:
        res = r.json()["results"][0]
        assert res["width"] == 1200 and res["mask"]["format"] == "png" and res["overlay_png"]
    assert code in (0, -signal.SIGTERM), log[-2000:]  # uvicorn re-raises SIGTERM after a clean stop
    assert '"stopped"' in log, log[-2000:]  # the lifespan's shutdown half ran (batcher drained)
