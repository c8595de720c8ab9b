"""A fleet keeps one process's promises: answer ids that never collide, and state shared by
replicas through a real redis-server (and feedback in a real PostgreSQL) started here.

Two apps on one Redis stand for two replicas (the Ray test, tests/test_ray_serve.py, runs the
same against real Ray replicas): a verdict reaches whichever app, an idempotent retry is
replayed by the other app, a concurrent same-key race runs once. Redis stopped under load:
/detect without a key keeps serving, with a key and feedback answer 503 `state_unavailable`
with Retry-After, one outage is counted, and the service recovers by itself when Redis is back.
"""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from loop_util import metric, png
from state_util import PG_BIN, PG_SKIP, REDIS_SERVER, REDIS_SKIP, Postgres, Redis, wait_for
from service.server.app import create_app
from service.server.settings import Settings
from training.data.folder import load_folder

KEY = {"X-API-Key": "fleet-key"}
ALL = json.dumps({"*": [{"kind": "all"}]})

needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason=REDIS_SKIP)


def post(client, image: bytes, headers: dict | None = None, **fields):
    return client.post("/detect", files=[("image", ("part.png", image, "image/png"))], data=fields,
                       headers={**KEY, **(headers or {})})


def verdict(client, **body):
    return client.post("/v1/feedback", json=body, headers=KEY)


def settings_for(demo_artifact, tmp, **extra) -> Settings:
    return Settings(artifact=demo_artifact, api_keys="fleet-key", feedback_db=str(tmp / "fb.sqlite3"),
                    samples_dir=tmp / "samples", samples_policy=ALL, log_level="WARNING", **extra)


def same_request_id_two_parts(client, samples):
    """Two different parts under one X-Request-ID: two answers, two samples, an ambiguous verdict."""
    a = post(client, png(1), {"X-Request-ID": "cycle-17"}, product="disc")
    b = post(client, png(2), {"X-Request-ID": "cycle-17"}, product="disc")
    assert a.status_code == b.status_code == 200
    a, b = a.json(), b.json()
    assert a["request_id"] == b["request_id"] == "cycle-17" and a["answer_id"] != b["answer_id"]
    kept = wait_for(lambda: (s := [p for p in (samples / "all").rglob("*.json")]) and len(s) >= 2 and s)
    assert sorted(json.loads(p.read_text())["answer_id"] for p in kept) == sorted([a["answer_id"], b["answer_id"]])
    refused = verdict(client, request_id="cycle-17", index=0, verdict="correct")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "ambiguous_request_id"
    assert verdict(client, answer_id=b["answer_id"], index=0, verdict="correct").status_code == 201
    return a, b


def test_two_parts_under_one_request_id_keep_two_samples_and_an_ambiguous_verdict_is_refused(demo_artifact,
                                                                                              tmp_path):
    with TestClient(create_app(settings_for(demo_artifact, tmp_path), configure_logs=False)) as client:
        same_request_id_two_parts(client, tmp_path / "samples")
        one = post(client, png(3), {"X-Request-ID": "cycle-18"}).json()
        ok = verdict(client, request_id="cycle-18", index=0, verdict="correct")  # one answer: still accepted
        assert ok.status_code == 201 and ok.json()["answer_id"] == one["answer_id"]
    assert len(load_folder(tmp_path / "samples" / "all")) == 3  # every kept sample loads


@pytest.fixture(scope="module")
def redis_server():
    if REDIS_SERVER is None:
        pytest.skip(REDIS_SKIP)
    server = Redis().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fleet(demo_artifact, redis_server, tmp_path_factory):
    """Two apps ("replicas") sharing one Redis and one feedback database."""
    tmp = tmp_path_factory.mktemp("fleet")
    s = settings_for(demo_artifact, tmp, state_url=redis_server.url, state_timeout_s=0.3, state_retry_s=0.2)
    with TestClient(create_app(s, configure_logs=False)) as a, TestClient(create_app(s, configure_logs=False)) as b:
        yield a, b, tmp


def test_a_verdict_reaches_any_replica(fleet):
    a, b, _ = fleet
    answers = [post(c, png(10 + i), product="disc").json() for i, c in enumerate([a, b] * 4)]
    for i, answer in enumerate(answers):
        other = [b, a][i % 2]  # the replica that did NOT answer
        r = verdict(other, answer_id=answer["answer_id"], index=0, verdict="correct")
        assert r.status_code == 201, r.text
        assert r.json()["request_id"] == answer["request_id"]


def test_ambiguous_request_id_is_refused_across_replicas(fleet):
    a, b, tmp = fleet
    one = post(a, png(20), {"X-Request-ID": "gw-cycle-3"}).json()
    two = post(b, png(21), {"X-Request-ID": "gw-cycle-3"}).json()
    assert one["answer_id"] != two["answer_id"]
    for client in (a, b):
        r = verdict(client, request_id="gw-cycle-3", index=0, verdict="correct")
        assert r.status_code == 409 and r.json()["error"]["code"] == "ambiguous_request_id"


def test_idempotent_retry_is_replayed_by_the_other_replica(fleet):
    a, b, _ = fleet
    first = post(a, png(30), {"Idempotency-Key": "part-30"})
    again = post(b, png(30), {"Idempotency-Key": "part-30"})
    assert first.status_code == again.status_code == 200
    assert again.headers.get("idempotent-replayed") == "true" and again.content == first.content
    conflict = post(b, png(31), {"Idempotency-Key": "part-30"})
    assert conflict.status_code == 422 and conflict.json()["error"]["code"] == "idempotency_conflict"


def test_concurrent_same_key_race_gives_one_answer(fleet):
    a, b, _ = fleet
    start = threading.Barrier(8)

    def call(i: int):
        start.wait()
        return post([a, b][i % 2], png(40), {"Idempotency-Key": "race-40"})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(call, range(8)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert len({r.json()["answer_id"] for r in responses}) == 1
    assert sum(r.headers.get("idempotent-replayed") != "true" for r in responses) == 1  # ran once


def test_redis_down_and_back_under_load(fleet, redis_server):
    a, b, tmp = fleet
    outages = metric(a, "dapo_state_outages_total")
    before = post(a, png(50)).json()
    stop = threading.Event()
    statuses: list[tuple[int, str | None]] = []

    def load():
        i = 0
        while not stop.is_set():
            r = post(b, png(60 + i % 5))
            statuses.append((r.status_code, None if r.status_code == 200 else r.json()["error"]["code"]))
            i += 1

    worker = threading.Thread(target=load)
    worker.start()
    try:
        redis_server.stop()
        plain = post(a, png(51))
        assert plain.status_code == 200  # no key: keeps serving
        keyed = post(a, png(52), {"Idempotency-Key": "during-outage"})
        assert keyed.status_code == 503 and keyed.json()["error"]["code"] == "state_unavailable"
        assert keyed.headers["retry-after"]
        fb = verdict(a, answer_id=before["answer_id"], index=0, verdict="correct")
        assert fb.status_code == 503 and fb.json()["error"]["code"] == "state_unavailable" and fb.headers["retry-after"]
        assert metric(a, "dapo_state_up") == 0 and metric(a, "dapo_state_outages_total") == outages + 1
        redis_server.start()
        # recovers by itself: the next probe after state_retry_s finds Redis back
        wait_for(lambda: post(a, png(53), {"Idempotency-Key": "after-outage"}).status_code == 200)
        # each replica probes on its own clock: wait for b's recovery too before asking b for a verdict
        wait_for(lambda: post(b, png(55), {"Idempotency-Key": "after-outage-b"}).status_code == 200)
        assert metric(a, "dapo_state_up") == 1 and metric(a, "dapo_state_outages_total") == outages + 1
        fresh = post(a, png(54)).json()
        assert verdict(b, answer_id=fresh["answer_id"], index=0, verdict="correct").status_code == 201
    finally:
        stop.set()
        worker.join()
    assert statuses and all(s == 200 for s, _ in statuses), statuses  # /detect without a key never failed
    assert len(load_folder(tmp / "samples" / "all")) >= len(statuses)  # no sample lost


def test_drift_window_is_the_fleets(wood_artifact, textures, redis_server, tmp_path):
    s = Settings(artifact=wood_artifact, state_url=redis_server.url, drift_window=40, drift_min_images=4,
                 log_level="WARNING")
    images = sorted((textures / "wood" / "good").glob("*.png"))[:6]
    with TestClient(create_app(s, configure_logs=False)) as a, TestClient(create_app(s, configure_logs=False)) as b:
        for i, image in enumerate(images):
            client = [a, b][i % 2]
            r = client.post("/detect", files={"image": (image.name, image.read_bytes(), "image/png")},
                            data={"product": "wood"})
            assert r.status_code == 200
        # each replica answered 3: its gauges describe all 6 (the window is shared)
        for client in (a, b):
            wait_for(lambda c=client: metric(c, "dapo_score_drift_window_images", product="wood") >= 5)
        assert metric(b, "dapo_score_drift_window_images", product="wood") == 6


@pytest.mark.skipif(PG_BIN is None, reason=PG_SKIP)
def test_postgres_one_verdict_per_image_across_replicas(demo_artifact, redis_server, tmp_path):
    pg = Postgres().start()
    try:
        s = settings_for(demo_artifact, tmp_path, state_url=redis_server.url).model_copy(
            update={"feedback_db": pg.url})
        with TestClient(create_app(s, configure_logs=False)) as a, \
                TestClient(create_app(s, configure_logs=False)) as b:
            answers = [post(c, png(70 + i)).json() for i, c in enumerate([a, b, a, b])]
            start = threading.Barrier(2)

            def race(client, answer):
                start.wait()
                return verdict(client, answer_id=answer["answer_id"], index=0, verdict="correct")

            for answer in answers:
                with ThreadPoolExecutor(2) as pool:
                    rs = list(pool.map(race, (a, b), (answer, answer)))
                assert sorted(r.status_code for r in rs) == [201, 409], [r.text for r in rs]
                assert [r.json()["error"]["code"] for r in rs if r.status_code == 409] == ["duplicate_feedback"]
            # PostgreSQL down: 503 with a code and Retry-After; back: accepted again, nothing lost
            late = post(a, png(80)).json()
            pg.stop()
            r = verdict(b, answer_id=late["answer_id"], index=0, verdict="correct")
            assert r.status_code == 503 and r.json()["error"]["code"] == "feedback_db_unavailable"
            assert r.headers["retry-after"]
            pg.start()
            assert verdict(b, answer_id=late["answer_id"], index=0, verdict="correct").status_code == 201
            answers.append(late)
        import sqlalchemy as sa

        engine = sa.create_engine(pg.url)
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT answer_id, image_index FROM feedback")).all()
            indexes = conn.execute(sa.text("SELECT indexdef FROM pg_indexes WHERE tablename = 'feedback'")).all()
        engine.dispose()
        assert sorted(r[0] for r in rows) == sorted(x["answer_id"] for x in answers)
        assert any("UNIQUE" in d and "answer_id" in d for (d,) in indexes)
    finally:
        pg.close()


def test_shared_recent_answers_are_bounded_and_evicted_answers_are_expired(redis_server):
    import asyncio

    from service.server.answers import Answer
    from service.server.fleet.link import StateLink
    from service.server.fleet.recent import RedisRecent, encode_answer
    from service.server.line.recent import Ambiguous, Expired, UnknownRequest
    from service.server.metrics import Metrics

    def answer(i: int, request_id: str) -> Answer:
        return Answer(request_id, {"name": "m"}, (("p.png", png(i)),), ({"anomaly_score": 0.1, "mask": None},),
                      {"product": "disc"}, answer_id=f"bound-{i}")

    answers = [answer(0, "bound-r0"), answer(1, "bound-r1"), answer(2, "bound-r1")]
    size = max(len(encode_answer(a)) for a in answers)

    async def run():
        link = StateLink(redis_server.url, 1.0, 0.2, Metrics(), prefix="boundtest:")
        recent = RedisRecent(link, window_s=60, max_bytes=2 * size + 10)  # room for two
        try:
            for a in answers:
                await recent.remember(a)
            with pytest.raises(Expired):  # evicted to stay within the bound: 410, not 404
                await recent.by_answer("bound-0")
            with pytest.raises(Expired):
                await recent.by_request("bound-r0")
            got = await recent.by_answer("bound-2")
            assert got.files == answers[2].files and got.results[0]["anomaly_score"] == 0.1
            with pytest.raises(Ambiguous):
                await recent.by_request("bound-r1")
            with pytest.raises(UnknownRequest):
                await recent.by_answer("never")
            assert int(await link.client.get("boundtest:ring:bytes")) <= 2 * size + 10
        finally:
            await link.close()

    asyncio.run(run())
