"""What is kept survives a crash: `dapo serve` is killed with SIGKILL at a random moment under
load (clients posting /detect and a verdict on each answer; samples policy `all`), then
started again on the same folders and database, again and again.

After each restart: every verdict that was answered 201 is in the database, and the samples
folder holds only complete samples (every image decodes and has its sidecar, every sidecar
parses and lists files that exist, no temporary file is left): whatever the kill cut short was
swept at start. Runs with SQLite and with a real PostgreSQL. The number of kills per database
is DAPO_CRASH_RUNS: 3 by default, so the suite stays fast (each kill costs a restart of the
service, a few seconds); the issue's measurement, 20 per database, is DAPO_CRASH_RUNS=20
(docs/fleet.md, "Measured").
"""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import threading
from pathlib import Path

import httpx
import pytest
from PIL import Image

from loop_util import png
from state_util import PG_BIN, PG_SKIP, Postgres
from service.server.line.samples import TMP_PREFIX
from service.server.local_server import Server

RUNS = int(os.environ.get("DAPO_CRASH_RUNS", "3"))
CLIENTS = 4
KEY = {"X-API-Key": "crash-key"}


def load(url: str, stop: threading.Event, accepted: list[str], seed: int) -> None:
    """One client: /detect, then a verdict on that answer; the answer ids whose verdict got 201."""
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=10, headers=KEY) as client:
        while not stop.is_set():
            try:
                r = client.post("/detect", files={"image": ("p.png", png(rng.randrange(10_000)), "image/png")},
                                data={"product": "disc"})
                if r.status_code != 200:
                    continue
                answer = r.json()
                fb = client.post("/v1/feedback", json={"answer_id": answer["answer_id"], "index": 0,
                                                       "verdict": "correct"})
                if fb.status_code == 201:
                    accepted.append(answer["answer_id"])
            except httpx.HTTPError:
                return  # the server was killed


def stored_verdicts(db: str) -> set[str]:
    if db.startswith("postgresql"):
        import sqlalchemy as sa

        engine = sa.create_engine(db)
        try:
            with engine.connect() as conn:
                return {r[0] for r in conn.execute(sa.text("SELECT answer_id FROM feedback"))}
        finally:
            engine.dispose()
    with sqlite3.connect(db) as conn:
        return {r[0] for r in conn.execute("SELECT answer_id FROM feedback")}


def check_samples(samples: Path) -> int:
    """Every sample complete and readable; the number of images."""
    images = 0
    for path in samples.rglob("*"):
        if not path.is_file():
            continue
        assert not path.name.startswith(TMP_PREFIX), f"temporary file left: {path}"
        if path.suffix == ".json":
            doc = json.loads(path.read_text(encoding="utf-8"))  # parses
            root = path.parents[2]
            for f in doc["files"]:
                assert (root / f).exists(), f"{path} lists a missing file {f}"
        else:
            with Image.open(path) as im:
                im.load()  # decodes
            if path.parent.parent.name != "ground_truth":
                images += 1
                assert path.with_suffix(".json").exists(), f"image without its sidecar: {path}"
    return images


def crash_runs(demo_artifact: Path, tmp: Path, db: str, runs: int) -> None:
    env = {"DAPO_API_KEYS": "crash-key", "DAPO_FEEDBACK_DB": db, "DAPO_SAMPLES_DIR": str(tmp / "samples"),
           "DAPO_SAMPLES_POLICY": json.dumps({"*": [{"kind": "all"}]}), "DAPO_LOG_LEVEL": "WARNING",
           "DAPO_WARMUP": "false"}
    rng = random.Random(24)
    accepted: list[str] = []
    swept = 0
    for run in range(runs + 1):
        server = Server(demo_artifact, env, log_path=tmp / f"serve-{run}.log")
        server.wait_ready(180)  # a loaded CI machine can be slow to start a process
        # what the previous run left, after this start's sweep
        assert set(accepted) <= stored_verdicts(db), "a verdict answered 201 was lost"
        check_samples(tmp / "samples")
        swept += int(float(next((line.split()[-1] for line in httpx.get(f"{server.url}/metrics").text.splitlines()
                                 if line.startswith("dapo_samples_swept_total")), "0")))
        if run == runs:
            server.stop()
            break
        stop = threading.Event()
        clients = [threading.Thread(target=load, args=(server.url, stop, accepted, run * 100 + i))
                   for i in range(CLIENTS)]
        for c in clients:
            c.start()
        before = len(accepted)
        # at least one verdict in this run, then a random moment
        deadline_ok = threading.Event()
        for _ in range(500):
            if len(accepted) > before or deadline_ok.wait(0.01):
                break
        threading.Event().wait(rng.uniform(0.05, 0.8))
        os.kill(server.pid, signal.SIGKILL)
        server.proc.wait(10)
        stop.set()
        for c in clients:
            c.join(15)
        server.stop()
    assert len(accepted) >= runs  # every run had load when it was killed
    print(f"{runs} kills, {len(accepted)} verdicts answered 201, all stored; {swept} incomplete files swept")


def test_sigkill_under_load_with_sqlite(demo_artifact, tmp_path):
    crash_runs(demo_artifact, tmp_path, str(tmp_path / "feedback.sqlite3"), RUNS)


@pytest.mark.skipif(PG_BIN is None, reason=PG_SKIP)
def test_sigkill_under_load_with_postgres(demo_artifact, tmp_path):
    pg = Postgres().start()
    try:
        crash_runs(demo_artifact, tmp_path, pg.url, RUNS)
    finally:
        pg.close()


def test_sweep_removes_only_incomplete_samples_and_the_loader_skips_them(tmp_path):
    from service.server.answers import Answer
    from service.server.line.samples import GOOD, Label, sample_stem, sidecar_of, sweep_incomplete, write_sample
    from training.data.folder import IncompleteSampleWarning, load_folder

    samples = tmp_path / "samples"
    root = samples / "all"
    result = {"anomaly_score": 0.1, "threshold": 0.5, "is_anomalous": False}
    answers = [Answer("r", {}, (("a.png", png(i)),), (result,), {"product": "disc"}) for i in range(4)]
    kept = [write_sample(root, "disc", Label(GOOD), sample_stem(a, 0), a.files[0][1], sidecar_of(a, 0, "model"))
            for a in answers]
    good = root / "disc" / "good"
    kept[1][-1].unlink()  # a crash before the sidecar: an orphan image
    kept[2][-1].write_text('{"answer_id": "cut sho')  # a sidecar that does not parse (not ours: we rename)
    tmp_file = good / f"{TMP_PREFIX}abc-{kept[3][0].name}"
    tmp_file.write_bytes(b"\x89PNG half")  # a temporary file a crash left
    customer = good / "customer_photo.png"
    customer.write_bytes(png(9))  # not a name the service makes: never touched

    with pytest.warns(IncompleteSampleWarning):
        loaded = load_folder(root)
    assert sorted(s.image.name for s in loaded) == sorted([kept[0][0].name, kept[3][0].name])

    swept = sweep_incomplete(samples)
    assert sorted(swept) == sorted([kept[1][0], kept[2][0], kept[2][1], tmp_file])
    assert sorted(p.name for p in good.iterdir()) == sorted(
        [kept[0][0].name, kept[0][1].name, kept[3][0].name, kept[3][1].name, customer.name])
    customer.unlink()
    assert check_samples(root) == 2
