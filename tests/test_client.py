"""`service.client.DapoClient` and `dapo detect`, against a LIVE service (uvicorn on a real socket
with the demo artifact) and, for the retry policy, a transport that loses or refuses chosen
attempts. The end-to-end retry test forwards every attempt to the live service, so it proves
what matters: the retry carries the same Idempotency-Key and the service replays the stored
answer instead of running inference twice."""
from __future__ import annotations

import email.utils
import io
import json
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.server.app import create_app
from service.cli import main as cli_main
from service.client import DapoClient, DapoClientError, retry_after_seconds
from service.server.local_server import serve_in_thread
from service.server.settings import Settings

API_KEY = "client-test-key"


def png_bytes(seed: int = 0, w: int = 64, h: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def live_url(demo_artifact):
    """The real app on a real socket (uvicorn in a thread), API key required."""
    settings = Settings(artifact=demo_artifact, api_keys=[API_KEY], max_batch_size=4)
    with serve_in_thread(create_app(settings, configure_logs=False)) as url:
        with DapoClient(url) as probe:
            assert probe.ready() and probe.wait_ready(timeout=5)
        yield url


@pytest.fixture
def image_file(tmp_path) -> Path:
    path = tmp_path / "part.png"
    path.write_bytes(png_bytes(1))
    return path


class Recorder(httpx.BaseTransport):
    """Forwards to `inner`, recording each request; `plan` says what to do per attempt:
    "ok" forward, "lost" forward then drop the answer (ReadError: the service DID the work),
    "refused" raise ConnectError without forwarding, or an int: answer that status without forwarding."""

    def __init__(self, inner: httpx.BaseTransport, plan: list, headers: dict[str, str] | None = None):
        self.inner, self.plan, self.extra_headers = inner, list(plan), headers or {}
        self.requests: list[httpx.Request] = []  # a snapshot per attempt (headers and body as sent)
        self.responses: list[httpx.Response] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(httpx.Request(request.method, request.url, headers=request.headers.copy(),
                                           content=request.read()))
        step = self.plan.pop(0) if self.plan else "ok"
        if step == "refused":
            raise httpx.ConnectError("connection refused (test)", request=request)
        if isinstance(step, int):
            body = {"error": {"code": f"test_{step}", "message": "injected", "request_id": "rid-test"}}
            return httpx.Response(step, json=body, headers=self.extra_headers, request=request)
        response = self.inner.handle_request(request)
        response.read()
        self.responses.append(response)
        if step == "lost":
            raise httpx.ReadError("connection reset after the request was sent (test)", request=request)
        return response


def metric_value(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


# --- against the live service ---------------------------------------------------------------
def test_detect_model_ready_against_live_service(live_url, image_file):
    with DapoClient(live_url, api_key=API_KEY) as client:
        assert client.ready()
        info = client.model()
        assert info["auth_enabled"] is True and info["name"] == "dapo-demo"
        body = client.detect([image_file, ("second.jpg", png_bytes(2))], product="disc", part_id="P-1",
                             station_id="S-3", recipe_id="R-9", mask_format="png", heatmap=True,
                             threshold=0.3, defect_types=["scratch", "hole"])
    assert [r["filename"] for r in body["results"]] == ["part.png", "second.jpg"]
    first = body["results"][0]
    assert (first["width"], first["height"]) == (64, 48)
    assert first["threshold"] == 0.3 and first["is_anomalous"] == (first["anomaly_score"] >= 0.3)
    assert (first["part_id"], first["station_id"], first["recipe_id"]) == ("P-1", "S-3", "R-9")
    assert first["mask"]["format"] == "png" and first["heatmap_png"]
    first_types = {d["name"] for d in first["defect_types"]}
    assert first_types and first_types <= {"scratch", "hole"}


def test_retry_after_lost_answer_reuses_the_key_and_gets_the_stored_answer(live_url, image_file):
    """First attempt reaches the service (inference runs, answer stored) but the answer is lost;
    the retry sends the same Idempotency-Key and body and is answered from the store."""
    recorder = Recorder(httpx.HTTPTransport(), ["lost", 503, "ok"], headers={"Retry-After": "0"})
    sleeps: list[float] = []
    before = metric_value(live_url, "dapo_images_processed_total")
    with DapoClient(live_url, api_key=API_KEY, transport=recorder, sleep=sleeps.append, backoff=0.01) as client:
        body = client.detect([image_file], part_id="retry-1")
    keys = [r.headers.get("idempotency-key") for r in recorder.requests]
    assert len(keys) == 3 and keys[0] and len(set(keys)) == 1
    assert recorder.requests[0].content == recorder.requests[2].content  # byte-identical body
    lost, final = recorder.responses
    assert lost.status_code == 200 and "idempotent-replayed" not in lost.headers
    assert final.headers.get("idempotent-replayed") == "true"
    assert body == lost.json()  # the stored answer, including the first attempt's request id
    assert sleeps[1] == 0.0  # Retry-After: 0 honoured on the 503
    assert metric_value(live_url, "dapo_images_processed_total") == before + 1  # one inference only

    # a second call is a new operation: a new key, and inference runs again
    with DapoClient(live_url, api_key=API_KEY, transport=recorder, sleep=sleeps.append) as client:
        client.detect([image_file], part_id="retry-1")
    assert recorder.requests[-1].headers["idempotency-key"] != keys[0]
    assert "idempotent-replayed" not in recorder.responses[-1].headers


def test_client_errors_carry_the_servers_envelope_and_are_not_retried(live_url, image_file):
    recorder = Recorder(httpx.HTTPTransport(), [])
    with DapoClient(live_url, api_key="wrong", transport=recorder, sleep=lambda s: None) as client:
        with pytest.raises(DapoClientError) as info:
            client.detect([image_file])
    e = info.value
    assert (e.status, e.code, e.attempts) == (401, "unauthorized", 1)
    assert e.request_id and e.request_id == recorder.responses[0].headers["x-request-id"]
    assert len(recorder.requests) == 1

    with DapoClient(live_url, api_key=API_KEY) as client:
        with pytest.raises(DapoClientError) as info:
            client.detect([("broken.png", b"not an image")])
        assert info.value.status == 415 and "broken.png" in info.value.message and info.value.attempts == 1
        with pytest.raises(DapoClientError) as info:
            client.detect([image_file], threshold=1.5)
        assert info.value.status == 422 and info.value.code == "invalid_parameter"


def test_cli_detect_prints_json_and_summary(live_url, image_file, tmp_path, capsys):
    out = tmp_path / "answer.json"
    rc = cli_main(["detect", str(image_file), "--url", live_url, "--api-key", API_KEY, "--product", "disc",
                   "--mask-format", "none", "--defect-types", "scratch,hole", "--threshold", "0.25",
                   "--out", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    result = printed["results"][0]
    assert result["filename"] == "part.png" and result["threshold"] == 0.25 and "mask" not in result
    result_types = {d["name"] for d in result["defect_types"]}
    assert result_types and result_types <= {"scratch", "hole"}

    rc = cli_main(["detect", str(image_file), "--url", live_url, "--api-key", "wrong", "--retries", "0"])
    assert rc == 1 and "401 unauthorized" in capsys.readouterr().err

    # the installed console script, as an operator runs it (a separate process)
    dapo = Path(sysconfig.get_path("scripts")) / "dapo"
    proc = subprocess.run([str(dapo) if dapo.exists() else sys.executable, *([] if dapo.exists() else
                           ["-m", "service.cli"]), "detect", str(image_file), str(image_file), "--summary"],
                          check=False, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "DAPO_URL": live_url, "DAPO_API_KEY": API_KEY})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["file", "size", "score", "anomalous"]
    assert [line.split()[0] for line in lines[1:3]] == ["part.png", "part.png"]
    assert all(line.split()[1] == "64x48" for line in lines[1:3])
    assert lines[3].startswith("model dapo-demo")


# --- retry policy (no server needed) -----------------------------------------------------------
def ok_response(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"results": [], "key": request.headers.get("idempotency-key")})


def test_retries_on_5xx_429_and_connection_errors_with_one_key():
    date = email.utils.format_datetime(email.utils.localtime().replace(microsecond=0)).strip()
    plan = ["refused", 500, 502, 429]
    recorder = Recorder(httpx.MockTransport(ok_response), plan, headers={"Retry-After": "7"})
    sleeps: list[float] = []
    with DapoClient("http://dapo.invalid", retries=4, backoff=0.5, transport=recorder, sleep=sleeps.append) as c:
        body = c.detect([b"\x89PNG fake"])
    assert len(recorder.requests) == 5
    assert len({r.headers["idempotency-key"] for r in recorder.requests}) == 1
    assert body["key"] == recorder.requests[0].headers["idempotency-key"]
    assert 0.25 <= sleeps[0] <= 0.5  # connection error: backoff with jitter
    assert sleeps[1:] == [7.0, 7.0, 7.0]  # Retry-After wins over backoff when the server sends it
    assert retry_after_seconds(date, now=time.time() - 5) == pytest.approx(5, abs=1.5)
    assert retry_after_seconds("soon") is None and retry_after_seconds("-3") == 0.0


def test_backoff_grows_and_is_capped_and_exhaustion_raises_the_last_error():
    recorder = Recorder(httpx.MockTransport(ok_response), [503] * 10)
    sleeps: list[float] = []
    with DapoClient("http://dapo.invalid", retries=5, backoff=1.0, max_wait=5.0, transport=recorder,
                    sleep=sleeps.append) as c:
        with pytest.raises(DapoClientError) as info:
            c.detect([b"x"])
    assert (info.value.status, info.value.code, info.value.attempts) == (503, "test_503", 6)
    assert info.value.request_id == "rid-test"
    assert len(sleeps) == 5 and all(s <= 5.0 for s in sleeps)
    assert 0.5 <= sleeps[0] <= 1.0 and 1.0 <= sleeps[1] <= 2.0 and 2.0 <= sleeps[2] <= 4.0

    refused = Recorder(httpx.MockTransport(ok_response), ["refused"] * 3)
    with DapoClient("http://dapo.invalid", retries=2, transport=refused, sleep=lambda s: None) as c:
        with pytest.raises(DapoClientError) as info:
            c.model()
    assert (info.value.status, info.value.code, info.value.attempts) == (None, "connection_error", 3)
    assert not DapoClient("http://127.0.0.1:9", timeout=1).ready()  # nothing listens on the discard port
