"""Ray Serve scale-out: the same app as two replicas behind Serve's proxy, on local CPU Ray.

Asserts that each replica ran the app's lifespan (both answer /readyz and /detect), that ~20
requests spread over both replicas (`X-Replica`), and that every answer equals the single-
process service's for the same image (score, defect types, regions, mask), as the replicas
run the same code on the same artifact. Batch size 1 on both sides makes the computation
identical, so the comparison is exact.

The replicas share their state through a real redis-server (DAPO_STATE_URL) and one feedback
database, as a fleet does (docs/fleet.md): a verdict on every answer is accepted whichever
replica takes it, an idempotent retry is replayed by either replica, the concurrent same-key
race runs once, and two parts under one X-Request-ID keep two samples while a verdict naming
that id is refused as ambiguous.

Skipped when ray[serve] is not installed (the `ray` extra); runs otherwise (~30 s, mostly
Ray's own start-up). The fleet test needs Debian's redis-server (skipped without it).
"""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient

serve = pytest.importorskip("ray.serve", reason="ray[serve] not installed (pip install 'dapo-inspect[ray]')")
import ray

from image_util import gradient_png
from state_util import REDIS_SERVER, REDIS_SKIP, Redis, wait_for
from traffic_util import BackgroundClients
from service.server.app import create_app
from service.server.ray_serve import REPLICA_HEADER, app_builder, build_app, deployment_options
from service.server.local_server import free_port, wait_ready
from service.server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
QUERY = "mask_format=rle&heatmap=true"


def image_bytes(seed: int) -> bytes:
    return gradient_png(seed, 72, 56)


def comparable(result: dict) -> dict:
    """A result without what legitimately differs between two runs (timings)."""
    return {k: v for k, v in result.items() if k != "timing_ms"}



@pytest.fixture(scope="module")
def redis_url():
    """The fleet's shared state (None without redis-server: the fleet test skips, the rest runs)."""
    if REDIS_SERVER is None:
        yield None
        return
    server = Redis().start()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray-fleet")


@pytest.fixture(scope="module")
def settings(demo_artifact, redis_url, fleet_dir) -> Settings:
    return Settings(artifact=demo_artifact, max_batch_size=1, max_queue_delay_ms=0, log_level="WARNING",
                    state_url=redis_url, feedback_db=str(fleet_dir / "feedback.sqlite3"),
                    samples_dir=fleet_dir / "samples", samples_policy='{"*": [{"kind": "all"}]}')


# Ray Serve kills a proxy that is not ready within 5 s (RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S) and
# serve.start then fails with ActorDiedError: on a loaded machine (CI with a busy core) starting a
# proxy takes longer. Deadlines that hold on a slow machine, read by Ray's processes at ray.init.
RAY_DEADLINES = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}


@pytest.fixture(scope="module")
def ray_url(settings):
    port = free_port()
    with pytest.MonkeyPatch.context() as env:
        for key, value in RAY_DEADLINES.items():
            env.setenv(key, value)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(settings, replicas=2, num_cpus=1), name="dapo-test", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, 120)  # serve.run returns once replicas are up; the proxy may lag (a deadline)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_share_the_load_and_answer_like_one_process(ray_url, settings):
    images = [image_bytes(seed) for seed in range(4)]
    with TestClient(create_app(settings, configure_logs=False)) as single:
        expected = []
        for i, data in enumerate(images):
            r = single.post(f"/detect?{QUERY}", files={"image": (f"part{i}.png", data, "image/png")},
                            data={"product": "disc", "part_id": f"p{i}"})
            assert r.status_code == 200, r.text
            assert REPLICA_HEADER not in r.headers  # ray mode only
            expected.append(comparable(r.json()["results"][0]))

    def call(k: int) -> httpx.Response:
        i = k % len(images)
        return httpx.post(f"{ray_url}/detect?{QUERY}", timeout=30,
                          files={"image": (f"part{i}.png", images[i], "image/png")},
                          data={"product": "disc", "part_id": f"p{i}"})

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(call, range(20)))
    replicas = {}
    for k, r in enumerate(answers):
        assert r.status_code == 200, r.text
        replica = r.headers[REPLICA_HEADER]
        replicas[replica] = replicas.get(replica, 0) + 1
        body = r.json()
        assert body["model"]["name"] == "dapo-demo"
        assert comparable(body["results"][0]) == expected[k % len(images)]  # score, types, regions, mask
    assert len(replicas) == 2, replicas  # both replicas took requests


def test_each_replica_runs_the_app_lifespan(ray_url):
    # /readyz is 503 until the lifespan has loaded the artifact and warmed up; every replica
    # seen answering ready has therefore run it (ray mode adds the replica header to all routes)
    # Serve's router may keep sending sequential calls to one idle replica, so ask in concurrent
    # bursts (a busy replica makes it pick the other)
    seen = set()
    with ThreadPoolExecutor(8) as pool:
        for _ in range(10):
            for r in pool.map(lambda _: httpx.get(ray_url + "/readyz", timeout=10), range(8)):
                assert r.status_code == 200 and r.json()["status"] == "ready"
                seen.add(r.headers[REPLICA_HEADER])
            if len(seen) == 2:
                break
    assert len(seen) == 2
    r = httpx.get(ray_url + "/v1/model", timeout=5)
    assert r.status_code == 200 and r.json()["backend"]["name"] == "onnxruntime"
    # errors still come in the service's envelope, through the proxy
    r = httpx.post(ray_url + "/detect", timeout=5, files={"image": ("x.png", b"nope", "image/png")})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    assert REPLICA_HEADER in r.headers


def post_part(ray_url: str, seed: int, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{ray_url}/detect", timeout=30, headers=headers or {},
                      files={"image": (f"part{seed}.png", image_bytes(seed), "image/png")}, data={"product": "disc"})


def test_a_fleet_of_two_replicas_keeps_one_process_promises(ray_url, redis_url, fleet_dir):
    if redis_url is None:
        pytest.skip(REDIS_SKIP)
    # a verdict on every answer is accepted, whichever replica answered and whichever takes it
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda k: post_part(ray_url, 100 + k), range(16)))
    assert all(r.status_code == 200 for r in answers)
    assert len({r.headers[REPLICA_HEADER] for r in answers}) == 2
    with ThreadPoolExecutor(4) as pool:
        verdicts = list(pool.map(lambda r: httpx.post(f"{ray_url}/v1/feedback", timeout=30, json={
            "answer_id": r.json()["answer_id"], "index": 0, "verdict": "correct"}), answers))
    assert [v.status_code for v in verdicts] == [201] * 16, [v.text for v in verdicts if v.status_code != 201]

    # idempotent retries are replayed, not run again, whichever replica they reach
    first = post_part(ray_url, 200, {"Idempotency-Key": "ray-part-200"})
    assert first.status_code == 200
    seen = set()
    with ThreadPoolExecutor(4) as pool:
        for _ in range(10):
            for r in pool.map(lambda _: post_part(ray_url, 200, {"Idempotency-Key": "ray-part-200"}), range(4)):
                assert r.status_code == 200 and r.headers["idempotent-replayed"] == "true"
                assert r.content == first.content
                seen.add(r.headers[REPLICA_HEADER])
            if len(seen) == 2:
                break
    assert len(seen) == 2, seen

    # the concurrent same-key race gives one answer
    with ThreadPoolExecutor(8) as pool:
        race = list(pool.map(lambda _: post_part(ray_url, 300, {"Idempotency-Key": "ray-race-300"}), range(8)))
    assert all(r.status_code == 200 for r in race)
    assert len({r.json()["answer_id"] for r in race}) == 1
    assert sum(r.headers.get("idempotent-replayed") != "true" for r in race) == 1

    # two different parts under one X-Request-ID: two samples, and a verdict naming it is refused
    pair = [post_part(ray_url, 400 + i, {"X-Request-ID": "cycle-400"}) for i in range(2)]
    ids = {r.json()["answer_id"] for r in pair}
    assert len(ids) == 2

    def kept():
        # only finished sidecars: a `.tmp-*` file is a write in progress, renamed away at any moment
        found = {json.loads(p.read_text())["answer_id"] for p in (fleet_dir / "samples" / "all").rglob("*.json")
                 if not p.name.startswith(".tmp-")}
        return ids <= found

    wait_for(kept)
    r = httpx.post(f"{ray_url}/v1/feedback", timeout=30, json={"request_id": "cycle-400", "index": 0,
                                                               "verdict": "correct"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "ambiguous_request_id"


def test_serve_config_file_is_valid(demo_artifact):
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "deploy" / "ray_serve.yaml").read_text()))
    app = config.applications[0]
    assert app.import_path == "service.server.ray_serve:app_builder"
    deployment = app.deployments[0]
    assert deployment.name == deployment_options(Settings())["name"]
    assert deployment.autoscaling_config["min_replicas"] <= deployment.autoscaling_config["max_replicas"]
    assert set(app.args) <= set(Settings.model_fields)  # every arg is a Settings field
    env = app.runtime_env["env_vars"]  # the replicas of a fleet share their state (docs/fleet.md)
    assert env["DAPO_STATE_URL"].startswith("redis://") and env["DAPO_FEEDBACK_DB"].startswith("postgresql+psycopg://")
    assert app_builder({**app.args, "artifact": str(demo_artifact)}) is not None  # builds (nothing deployed)


def test_deployment_options():
    s = Settings(max_batch_size=4, max_queue_size=32)
    fixed = deployment_options(s, replicas=3, num_gpus=0.5)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert fixed["max_ongoing_requests"] == 32
    auto = deployment_options(s, replicas="auto", max_replicas=8)
    assert auto["num_replicas"] == "auto"
    assert auto["autoscaling_config"]["max_replicas"] == 8
    assert auto["autoscaling_config"]["target_ongoing_requests"] == 8


def test_cli_flags():
    from service.cli import build_parser

    args = build_parser().parse_args(["serve", "--ray", "--replicas", "auto", "--gpus-per-replica", "0.5"])
    assert (args.ray, args.replicas, args.gpus_per_replica) == (True, "auto", 0.5)
    args = build_parser().parse_args(["serve", "--ray", "--replicas", "2"])
    assert args.replicas == 2
    assert build_parser().parse_args(["serve"]).ray is False


class Traffic(BackgroundClients):
    """Clients posting one fixed image to /detect back to back until stopped, recording every
    answer (status, model version, score, replica) with its completion time."""

    def __init__(self, url: str, image: bytes, clients: int = 2):
        self.url, self.image = url, image
        self.answers: list[tuple[float, int, str | None, float | None, str | None]] = []
        super().__init__(clients)

    def client_loop(self, stop: threading.Event) -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                try:
                    r = client.post(f"{self.url}/detect?mask_format=none",
                                    files={"image": ("part.png", self.image, "image/png")})
                except httpx.HTTPError as e:  # a dropped connection is a failed request too
                    self.answers.append((time.monotonic(), 0, None, None, repr(e)))
                    continue
                ok = r.status_code == 200
                body = r.json() if ok else None
                self.answers.append((time.monotonic(), r.status_code,
                                     body["model"]["version"] if ok else r.text[:300],
                                     body["results"][0]["anomaly_score"] if ok else None,
                                     r.headers.get(REPLICA_HEADER)))


def reference_score(settings: Settings, image: bytes) -> tuple[str, float]:
    with TestClient(create_app(settings, configure_logs=False)) as client:
        body = client.post("/detect?mask_format=none", files={"image": ("part.png", image, "image/png")}).json()
    return body["model"]["version"], body["results"][0]["anomaly_score"]


def wait_for_answers(traffic, which, n: int, timeout: float = 120.0) -> None:
    """Until n of the traffic's answers satisfy `which` (a deadline, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while sum(1 for a in list(traffic.answers) if which(a)) < n:
        assert time.monotonic() < deadline, f"fewer than {n} such answers within {timeout} s"
        time.sleep(0.05)


def test_rolling_update_to_a_new_artifact_fails_no_request(ray_url, settings, demo_artifact_v2):
    """`serve.run` with a new artifact replaces the replicas one at a time (a new one is started
    and ready before the last old one stops); under continuous /detect traffic no request fails,
    each answer's score is the one its named version computes, and once the update has returned
    only the new version answers. Last in this module: it leaves version 0.2.0 deployed."""
    image = image_bytes(99)
    v2 = settings.model_copy(update={"artifact": demo_artifact_v2})
    expected = dict([reference_score(settings, image), reference_score(v2, image)])
    assert len(expected) == 2 and len(set(expected.values())) == 2  # two versions, two different scores

    with Traffic(ray_url, image) as traffic:
        wait_for_answers(traffic, lambda a: True, 3)  # answers from the serving version first
        serve.run(build_app(v2, replicas=2, num_cpus=1), name="dapo-test", route_prefix="/")
        updated = time.monotonic()
        wait_for_answers(traffic, lambda a: a[0] > updated + 0.5, 3)  # the asserted condition, not a sleep
    answers = traffic.answers
    failed = [a for a in answers if a[1] != 200]
    assert not failed, failed[:5]
    for _, _, version, score, _ in answers:
        assert score == pytest.approx(expected[version], abs=1e-6), version  # never a mix of models
    assert answers[0][2] == "0.1.0"
    after = {a[2] for a in answers if a[0] > updated + 0.5}
    assert after == {"0.2.0"}
    replicas = {a[4] for a in answers}
    assert len(replicas) >= 3, replicas  # old replicas were replaced by new ones
