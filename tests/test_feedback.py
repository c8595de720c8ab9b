"""Operator feedback: /detect -> POST /v1/feedback -> labelled sample on disk -> `dapo calibrate
--feedback` moves the product's threshold to where the operators' good parts put it.

The expected threshold is computed here from the API's own scores (numpy's "higher" quantile of
the scores of the parts the operator called good); the database is read back with the stdlib
sqlite3 module, the samples with the offline tools' folder loader.
"""
from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from loop_util import detect, metric, png
from service import cli
from service.runtime.artifact import load_manifest
from service.server.answers import Answer
from service.server.app import create_app
from service.server.line.recent import Ambiguous, Expired, RecentAnswers, UnknownRequest
from service.server.settings import Settings
from training.data.folder import load_folder

API_KEY = "feedback-test-key"
KEY = {"X-API-Key": API_KEY}
N_GOOD = 7


@pytest.fixture(scope="module")
def artifact(demo_artifact, tmp_path_factory):
    """A copy: calibration rewrites the manifest."""
    return shutil.copytree(demo_artifact, tmp_path_factory.mktemp("fb-artifact") / "demo")


@pytest.fixture(scope="module")
def where(tmp_path_factory):
    root = tmp_path_factory.mktemp("feedback")
    return {"samples": root / "samples", "db": root / "db" / "feedback.sqlite3"}


@pytest.fixture(scope="module")
def app(artifact, where):
    settings = Settings(artifact=artifact, api_keys=API_KEY, feedback_db=str(where["db"]),
                        samples_dir=where["samples"], feedback_ring_mb=1.0)
    with TestClient(create_app(settings, configure_logs=False)) as client:
        yield client


def feedback(app, headers=KEY, **body):
    return app.post("/v1/feedback", json=body, headers=headers)


def test_round_trip_detect_feedback_sample_calibrate(app, artifact, where, capsys):
    images = [png(50 + i) for i in range(N_GOOD + 1)]
    probe = [detect(app, [im], params={"threshold": 0.999}, headers=KEY, product="disc")["results"][0]
             for im in images]
    split = float(np.median([r["anomaly_score"] for r in probe]))  # flags about half of the parts
    answers = [detect(app, [im], params={"threshold": split}, headers=KEY, product="disc") for im in images]
    results = [a["results"][0] for a in answers]

    # the operator: the first N_GOOD parts are good, the last one has a scratch
    verdicts = []
    for a, r in zip(answers[:N_GOOD], results):
        verdicts.append(("false_positive" if r["is_anomalous"] else "correct", None))
    last = results[-1]
    if last["is_anomalous"]:
        verdicts.append(("correct", None) if last["defect_types"][0]["name"] == "scratch" else ("wrong_type", "scratch"))
    else:
        verdicts.append(("false_negative", "scratch"))
    assert any(v == "false_positive" for v, _ in verdicts) and any(v == "correct" for v, _ in verdicts[:N_GOOD])
    outs = []
    for a, (verdict, dtype) in zip(answers, verdicts):
        r = feedback(app, request_id=a["request_id"], index=0, verdict=verdict, defect_type=dtype, note="line 3")
        assert r.status_code == 201, r.text
        outs.append(r.json())
    assert [o["label"] for o in outs] == ["good"] * N_GOOD + ["scratch"]

    # the samples: in the folder layout, the upload's own bytes, labelled by the operator
    loaded = {s.image.resolve(): s for s in load_folder(where["samples"] / "feedback")}
    assert set(loaded) == {Path(o["sample"]) for o in outs}
    for o, im in zip(outs, images):
        s = loaded[Path(o["sample"])]
        assert s.image.read_bytes() == im and s.product == "disc"
        assert (s.label, s.defect) == ((0, None) if o["label"] == "good" else (1, "scratch"))
        side = json.loads(s.image.with_suffix(".json").read_text())
        assert side["labelled_by"] == "operator" and side["feedback"]["verdict"] == o["verdict"]

    # the database, read with the stdlib
    with sqlite3.connect(where["db"]) as db:
        rows = db.execute("SELECT request_id, image_index, verdict, label, product, anomaly_score, sample_path, note "
                          "FROM feedback ORDER BY id").fetchall()
    assert [(r[0], r[1], r[2], r[3], r[4]) for r in rows] == [
        (a["request_id"], 0, v, o["label"], "disc") for a, (v, _), o in zip(answers, verdicts, outs)]
    assert [r[5] for r in rows] == [r["anomaly_score"] for r in results]
    assert [r[6] for r in rows] == [o["sample"] for o in outs] and {r[7] for r in rows} == {"line 3"}
    n_fp = sum(v == "false_positive" for v, _ in verdicts)
    assert metric(app, "dapo_feedback_total", product="disc", verdict="false_positive") == n_fp

    # calibrate: the confirmed good parts and the false positives are the good set
    before = load_manifest(artifact, verify=False)
    assert before.products["disc"].image_threshold is None and before.image_threshold == 0.5
    assert cli.main(["calibrate", "--artifact", str(artifact), "--feedback", str(where["db"])]) == 0
    report = json.loads(capsys.readouterr().out)
    good_scores = np.array([r["anomaly_score"] for r in results[:N_GOOD]])
    expected = float(np.quantile(good_scores, 0.99, method="higher"))
    after = load_manifest(artifact, verify=False).products["disc"].image_threshold
    assert after == pytest.approx(expected, abs=1e-5)
    disc = report["products"]["disc"]
    assert disc["image_threshold"] == {"before": 0.5, "after": after}
    assert disc["good_images"] == N_GOOD and disc["false_positives"] == n_fp and disc["defects"] == 1
    fp_scores = [r["anomaly_score"] for r, (v, _) in zip(results, verdicts) if v == "false_positive"]
    assert disc["false_positives_still_flagged"] == sum(s >= after - 1e-5 for s in fp_scores)
    assert disc["defects_missed"] == int(results[-1]["anomaly_score"] < after)
    print(json.dumps(disc))  # the seeded example's movement, for the record (pytest -s)


def test_unclear_or_impossible_feedback_gets_a_clear_4xx(app):
    one = detect(app, [png(70)], params={"threshold": 0.999}, headers=KEY, product="disc")  # answered OK
    rid = one["request_id"]

    def refused(status, code, headers=KEY, **body):
        r = feedback(app, headers, **body)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
        return r.json()["error"]["message"]

    refused(401, "unauthorized", {}, request_id=rid, index=0, verdict="correct")
    refused(404, "unknown_request", request_id="never-answered", index=0, verdict="correct")
    assert "out of range" in refused(422, "invalid_feedback", request_id=rid, index=1, verdict="correct")
    assert "not anomalous" in refused(422, "invalid_feedback", request_id=rid, index=0, verdict="false_positive")
    assert "needs defect_type" in refused(422, "invalid_feedback", request_id=rid, index=0, verdict="false_negative")
    assert "vocabulary" in refused(422, "invalid_feedback", request_id=rid, index=0, verdict="false_negative",
                                   defect_type="dent")
    assert "verdict" in refused(422, "invalid_parameter", request_id=rid, index=0, verdict="maybe")
    refused(422, "invalid_parameter", request_id=rid, index=0, verdict="correct", colour="red")
    r = app.post("/v1/feedback", content=b"{not json", headers={**KEY, "Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_parameter")
    r = app.post("/v1/feedback", content=b"verdict=correct", headers={**KEY, "Content-Type": "text/plain"})
    assert r.status_code == 415
    # nothing above was stored: the first real verdict goes through, the second is a duplicate
    assert feedback(app, request_id=rid, index=0, verdict="correct").status_code == 201
    refused(409, "duplicate_feedback", request_id=rid, index=0, verdict="false_negative", defect_type="hole")


def test_feedback_after_the_image_left_the_ring_is_gone(app):
    big = png(71, 720, 640)  # ~1.4 MB of noise: more than the 1 MB ring holds, evicted at once
    body = detect(app, [big], headers=KEY, product="disc")
    r = feedback(app, request_id=body["request_id"], index=0, verdict="correct")
    assert (r.status_code, r.json()["error"]["code"]) == (410, "feedback_expired")


def test_feedback_is_404_when_not_enabled(demo_artifact):
    with TestClient(create_app(Settings(artifact=demo_artifact), configure_logs=False)) as client:
        r = client.post("/v1/feedback", json={"request_id": "x", "index": 0, "verdict": "correct"})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "feedback_disabled")
    assert "DAPO_FEEDBACK_DB" in r.json()["error"]["message"]


def test_recent_answers_window_and_memory_bound():
    now = [0.0]
    ring = RecentAnswers(window_s=10.0, max_bytes=250, clock=lambda: now[0])

    def answer(rid: str, size: int) -> Answer:
        return Answer(rid, {}, (("f", b"x" * size),), ({},), {}, answer_id=f"id-{rid}")

    ring.put(answer("a", 100))
    ring.put(answer("b", 100))
    assert ring.get("id-a").request_id == "a" and ring.find("a").answer_id == "id-a" and ring.nbytes == 200
    ring.put(answer("c", 100))  # 300 > 250: the oldest goes
    with pytest.raises(Expired):
        ring.get("id-a")
    with pytest.raises(Expired):
        ring.find("a")
    now[0] = 10.5  # b and c are older than the window now
    with pytest.raises(Expired):
        ring.get("id-c")
    with pytest.raises(UnknownRequest):
        ring.get("never")
    assert len(ring) == 0 and ring.nbytes == 0


def test_recent_answers_refuse_a_request_id_two_answers_share():
    ring = RecentAnswers(window_s=10.0, max_bytes=10_000)
    for answer_id in ("one", "two"):
        ring.put(Answer("cycle-7", {}, (("f", b"x"),), ({},), {}, answer_id=answer_id))
    with pytest.raises(Ambiguous) as e:
        ring.find("cycle-7")
    assert sorted(e.value.answer_ids) == ["one", "two"]
    assert ring.get("one").answer_id == "one" and ring.get("two").answer_id == "two"
