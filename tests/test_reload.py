"""Hot model swap (POST /v1/model/reload, SIGHUP) on the real app, real artifacts, real ORT.

Two demo artifacts that differ only in their random weights (seed 42 -> 0.1.0, seed 7 -> 0.2.0)
give different scores for the same image. Every answer names the model that computed it
(name, version, artifact_sha256), so under continuous load each answer can be checked against
what that model alone answers for the same images (a reference app per artifact). Batch size 1
everywhere makes the comparison exact.
"""
from __future__ import annotations

import asyncio
import gc
import json
import shutil
import signal
import threading
import time
import weakref
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from image_util import gradient_png
from traffic_util import BackgroundClients
from service.runtime.artifact import sha256_file
from service.runtime.detector import Upload
from service.runtime.postprocess import RenderOptions
from service.server.app import create_app
from service.server.local_server import Server, serve_in_thread
from service.server.reload import ReloadInProgress
from service.server.settings import Settings

ADMIN = "admin-key-for-tests"
LINE = "line-client-key"
QUERY = "mask_format=rle"


def image(seed: int, w: int = 80, h: int = 60) -> bytes:
    return gradient_png(seed, w, h)


IMAGES = [("a.png", image(1)), ("b.png", image(2, 50, 70))]  # two per request: a split would show


def files() -> list:
    return [("image", (name, data, "image/png")) for name, data in IMAGES]


def results_of(body: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "timing_ms"} for r in body["results"]]


def settings_for(artifact: Path, **kw) -> Settings:
    return Settings(artifact=artifact, max_batch_size=1, max_queue_delay_ms=0, log_level="WARNING", **kw)


def reference(artifact: Path) -> tuple[dict, list[dict]]:
    """What this artifact alone answers for IMAGES: (model object, results)."""
    with TestClient(create_app(settings_for(artifact), configure_logs=False)) as client:
        body = client.post(f"/detect?{QUERY}", files=files()).json()
    return body["model"], results_of(body)


def corrupt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    onnx = dst / "encoder.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 can tell
    onnx.write_bytes(bytes(data))
    return dst


def metric(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return sample.value
    return 0.0


@pytest.fixture(scope="module")
def references(demo_artifact, demo_artifact_v2) -> dict[str, tuple[dict, list[dict]]]:
    refs = {}
    for artifact in (demo_artifact, demo_artifact_v2):
        model, results = reference(artifact)
        refs[model["artifact_sha256"]] = (model, results)
    assert len(refs) == 2
    (m1, r1), (m2, r2) = refs.values()
    assert (m1["version"], m2["version"]) == ("0.1.0", "0.2.0")
    assert [r["anomaly_score"] for r in r1] != [r["anomaly_score"] for r in r2]  # the swap is visible
    return refs


class Load(BackgroundClients):
    """Client threads posting IMAGES back to back; every answer kept with its timing."""

    def __init__(self, url: str, clients: int = 3):
        self.url = url
        self.answers: list[tuple[float, float, int, dict | str]] = []  # (start, end, status, body)
        super().__init__(clients, join_timeout_s=30)

    def client_loop(self, stop: threading.Event) -> None:
        with httpx.Client(timeout=30, headers={"X-API-Key": LINE}) as client:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    r = client.post(f"{self.url}/detect?{QUERY}", files=files())
                    body = r.json() if r.status_code == 200 else r.text
                    self.answers.append((t0, time.monotonic(), r.status_code, body))
                except httpx.HTTPError as e:
                    self.answers.append((t0, time.monotonic(), 0, repr(e)))

    def wait_answers_started_after(self, t: float, n: int, timeout: float = 60.0) -> None:
        """Until n answers of requests started after `t` are in (however slow the machine)."""
        deadline = time.monotonic() + timeout
        while sum(1 for a in list(self.answers) if a[0] > t) < n:
            assert time.monotonic() < deadline, f"fewer than {n} answers within {timeout} s"
            time.sleep(0.02)


def test_five_swaps_under_load_no_failed_or_mixed_answer_and_a_corrupt_artifact_keeps_the_old(
        demo_artifact, demo_artifact_v2, references, tmp_path):
    corrupt = corrupt_copy(demo_artifact_v2, tmp_path / "corrupt")
    app = create_app(settings_for(demo_artifact, api_keys=[LINE], admin_keys=[ADMIN]), configure_logs=False)
    admin = {"X-API-Key": ADMIN}
    swaps = []
    with serve_in_thread(app) as url, Load(url) as load:
        load.wait_answers_started_after(0.0, 4)
        for target in [demo_artifact_v2, demo_artifact] * 2 + [demo_artifact_v2]:
            t0 = time.monotonic()
            r = httpx.post(f"{url}/v1/model/reload", json={"artifact": str(target)}, headers=admin, timeout=60)
            assert r.status_code == 200, r.text
            swaps.append((t0, time.monotonic(), r.json()))
            load.wait_answers_started_after(swaps[-1][1], 4)  # answers from this model before the next swap
        # a corrupt artifact: refused, naming the file; the model that served keeps serving
        r = httpx.post(f"{url}/v1/model/reload", json={"artifact": str(corrupt)}, headers=admin, timeout=60)
        failed_at = time.monotonic()
        load.wait_answers_started_after(failed_at, 4)
        info = httpx.get(f"{url}/v1/model", headers={"X-API-Key": LINE}, timeout=10).json()
        metrics_text = httpx.get(f"{url}/metrics", timeout=10).text
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_artifact"
    message = r.json()["error"]["message"]
    assert "encoder.onnx" in message and "sha256" in message and "still serving dapo-demo 0.2.0" in message

    # every answer: 200, and exactly what the model it names computes for these images
    assert load.answers, "no traffic"
    bad = [a for a in load.answers if a[2] != 200]
    assert not bad, bad[:3]
    for _, _, _, body in load.answers:
        model, results = references[body["model"]["artifact_sha256"]]
        assert body["model"] == model
        assert results_of(body) == results  # both images from one model: never split
    versions = [body["model"]["version"] for *_, body in load.answers]
    assert versions.count("0.1.0") > 3 and versions.count("0.2.0") > 3

    # each swap answered with the model it switched to and the one it replaced
    for (_, _, report), target, previous in zip(swaps, [demo_artifact_v2, demo_artifact] * 3,
                                                 [demo_artifact, demo_artifact_v2] * 3):
        assert report["status"] == "ok" and report["artifact"] == str(target)
        assert report["model"]["artifact_sha256"] == sha256_file(target / "manifest.json")
        assert report["previous"]["artifact_sha256"] == sha256_file(previous / "manifest.json")
    # requests started after a swap's answer get the new model; after the failed one, still 0.2.0
    for (_, done, report), (next_start, *_) in zip(swaps, swaps[1:] + [(failed_at, None, None)]):
        after = {body["model"]["version"] for t0, _, _, body in load.answers if done < t0 < next_start}
        assert after == {report["model"]["version"]}, after
    assert {body["model"]["version"] for t0, _, _, body in load.answers if t0 > failed_at} <= {"0.2.0"}

    # reported in /v1/model and the metrics
    assert info["version"] == "0.2.0" and info["artifact"] == str(demo_artifact_v2)
    assert info["reload"]["status"] == "failed" and info["reload"]["artifact"] == str(corrupt)
    assert "encoder.onnx" in info["reload"]["error"]
    assert metric(metrics_text, "dapo_model_reloads_total", {"result": "ok"}) == 5
    assert metric(metrics_text, "dapo_model_reloads_total", {"result": "failed"}) == 1
    assert metric(metrics_text, "dapo_model_reload_last_failed") == 1
    assert metric(metrics_text, "dapo_models_loaded") == 1  # every replaced model was released
    assert metric(metrics_text, "dapo_model_info", {"version": "0.2.0",
                                                    "artifact_sha256": info["artifact_sha256"]}) == 1
    assert metric(metrics_text, "dapo_model_info", {"version": "0.1.0"}) == 0


def test_a_request_holding_the_old_model_finishes_on_it_then_the_old_model_is_released(
        demo_artifact, demo_artifact_v2, references):
    """Deterministic: hold the old model the way an admitted /detect does, swap, then run that
    request's image through the old model's batcher: it still runs, it computes the old model's
    answer, and the old model is closed only once the request lets go."""
    settings = settings_for(demo_artifact, admin_keys=[ADMIN])
    app = create_app(settings, configure_logs=False)
    with TestClient(app) as client:
        state = app.state.service
        old = state.model
        name, data = IMAGES[0]

        async def hold_swap_finish():
            old.usage.acquire()  # what /detect does when it admits a request
            report = await state.reloader.reload(demo_artifact_v2)
            loaded_while_held = metric(state.metrics.render().decode(), "dapo_models_loaded")
            prep = old.detector.prepare(Upload(name, data), state.limits)
            policy = old.detector.policy()
            (batch_result,) = await old.batcher.submit_many([(prep.pixel_values, policy.allowed)])
            running_while_held = old.batcher.running
            old.usage.release()  # the request answers
            for _ in range(500):  # the retirement runs on the loop once nobody holds the model
                if not old.batcher.running:
                    break
                await asyncio.sleep(0.01)
            options = RenderOptions("rle", False, False, settings.min_region_px, settings.max_regions)
            fields = old.detector.render(prep, batch_result.outputs, policy, options)
            return report, loaded_while_held, running_while_held, {"filename": name, **fields}

        report, loaded_while_held, running_while_held, result = client.portal.call(hold_swap_finish)
        assert not old.batcher.running  # closed once the request let go
        assert report.model["version"] == "0.2.0" and report.previous["version"] == "0.1.0"
        assert state.model is not old and state.model.manifest.version == "0.2.0"
        assert loaded_while_held == 2  # both models in memory while the old one is held
        assert running_while_held
        assert metric(state.metrics.render().decode(), "dapo_models_loaded") == 1
        old_ref = next(results for model, results in references.values() if model["version"] == "0.1.0")
        assert result == old_ref[0]  # computed by the old model, exactly as it alone answers
        detector = weakref.ref(old.detector)
        del old
        gc.collect()
        assert detector() is None  # nothing keeps the replaced model (its ORT session) alive


def test_one_reload_at_a_time(demo_artifact, demo_artifact_v2):
    app = create_app(settings_for(demo_artifact), configure_logs=False)
    with TestClient(app) as client:
        reloader = app.state.service.reloader

        async def two_at_once():
            first = reloader.start(demo_artifact_v2)
            with pytest.raises(ReloadInProgress):
                reloader.start(demo_artifact)
            return (await first).model["version"]

        assert client.portal.call(two_at_once) == "0.2.0"
        assert client.get("/v1/model").json()["version"] == "0.2.0"


def test_reload_needs_an_admin_key_and_says_why_it_fails(demo_artifact, tmp_path):
    # no admin key configured: reload over HTTP is off (a line client's key never swaps models)
    with TestClient(create_app(settings_for(demo_artifact, api_keys=[LINE]), configure_logs=False)) as client:
        r = client.post("/v1/model/reload", headers={"X-API-Key": LINE})
        assert r.status_code == 403 and "DAPO_ADMIN_KEYS" in r.json()["error"]["message"]
    app = create_app(settings_for(demo_artifact, api_keys=[LINE], admin_keys=[ADMIN]), configure_logs=False)
    with TestClient(app) as client:
        for headers in ({}, {"X-API-Key": LINE}, {"X-API-Key": ADMIN + "x"}):
            r = client.post("/v1/model/reload", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert client.post("/detect", headers={"X-API-Key": ADMIN}, files=files()).status_code == 401
        r = client.post("/v1/model/reload", headers={"X-API-Key": ADMIN}, json={"artifact": str(tmp_path / "none")})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_artifact"
        assert "does not exist" in r.json()["error"]["message"]
        r = client.post("/v1/model/reload", headers={"X-API-Key": ADMIN}, json={"path": "x"})
        assert r.status_code == 422 and "path" in r.json()["error"]["message"]  # not silently the default
        r = client.post("/v1/model/reload", headers={"X-API-Key": ADMIN, "Content-Type": "application/json"},
                        content=b"{not json")
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameter"
        r = client.post("/v1/model/reload", headers={"Content-Type": "application/json"}, content=b"{not json")
        assert r.status_code == 401  # the key is checked before the body is read
        r = client.post("/v1/model/reload", headers={"X-API-Key": ADMIN})  # no body: the configured artifact
        assert r.status_code == 200 and r.json()["artifact"] == str(demo_artifact)
        assert r.json()["model"] == r.json()["previous"]  # same files, same identity


def test_sighup_reloads_the_configured_artifact(demo_artifact, demo_artifact_v2, tmp_path):
    """`dapo serve` on a folder; the folder is replaced (atomic renames) and SIGHUP loads it."""
    served = tmp_path / "models" / "line-3"
    shutil.copytree(demo_artifact, served)
    with Server(served, env={"DAPO_MAX_BATCH_SIZE": "1", "DAPO_LOG_LEVEL": "INFO"},
                log_path=tmp_path / "serve.log") as server:
        assert httpx.get(f"{server.url}/v1/model", timeout=10).json()["version"] == "0.1.0"
        staged = tmp_path / "models" / ".line-3.new"
        shutil.copytree(demo_artifact_v2, staged)
        served.rename(tmp_path / "models" / "line-3.previous")
        staged.rename(served)
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            info = httpx.get(f"{server.url}/v1/model", timeout=10).json()
            if (info["reload"] or {}).get("status") in ("ok", "failed"):
                break
            time.sleep(0.1)
        assert info["reload"]["status"] == "ok" and info["reload"]["source"] == "sighup", info["reload"]
        assert info["version"] == "0.2.0" and info["artifact_sha256"] == sha256_file(served / "manifest.json")
        r = httpx.post(f"{server.url}/detect", files=files(), timeout=30)
        assert r.status_code == 200 and r.json()["model"]["version"] == "0.2.0"
        assert server.proc.poll() is None  # SIGHUP did not end the process
    assert server.proc.returncode in (0, -signal.SIGTERM)
    log = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines() if line.startswith("{")]
    messages = [entry["message"] for entry in log]
    assert "reload: switched" in messages and "reload: previous model released" in messages


def test_engine_cache_folder_is_per_graph_content(demo_artifact, demo_artifact_v2, tmp_path):
    """ORT's TensorRT EP keys cached engines by file and node names, not weights: two bakes of one
    architecture must not share a cache folder, one artifact must always find its own."""
    from service.runtime.artifact import load_manifest
    from service.runtime.backends import engine_cache_dir

    m1, m2 = load_manifest(demo_artifact), load_manifest(demo_artifact_v2)
    d1, d2 = (engine_cache_dir("/cache/trt", m, "encoder.onnx") for m in (m1, m2))
    assert d1 != d2 and Path(d1).parent == Path(d2).parent == Path("/cache/trt")
    assert d1 == engine_cache_dir("/cache/trt", load_manifest(shutil.copytree(demo_artifact, tmp_path / "c")),
                                  "encoder.onnx")
    assert engine_cache_dir(None, m1, "encoder.onnx") is None
