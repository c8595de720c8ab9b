"""A seeded example of operator feedback moving a product's threshold (a script, not a test).

The story: product `disc` was given a threshold that is too low (`--start-threshold`), so the
line sees false alarms. Seeded synthetic parts (training/synth.py: good discs and discs with a
scratch, hole or crack) go through /detect on a real in-process server with feedback on; an
"operator" answers from the known truth (false_positive / correct / false_negative with the
type / wrong_type); `dapo calibrate --feedback DB` re-derives the threshold; the same parts are
inspected again on the recalibrated artifact. Printed: how the threshold moved, and false alarms
and caught defects before and after.

With the demo artifact (random weights) the scores carry no defect signal, so what this shows
is the mechanics, not detection quality.

    python bench/feedback_calibration.py [--artifact DIR] [--good 24] [--defective 8] [--seed 0]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

import httpx
from PIL import Image

from service import cli
from service.runtime.artifact import load_manifest, write_manifest
from service.server.app import create_app
from service.server.local_server import serve_in_thread
from service.server.settings import Settings
from training.synth import render

PRODUCT = "disc"
DEFECTS = ("scratch", "hole", "crack")


def parts(good: int, defective: int, seed: int) -> list[tuple[bytes, str | None]]:
    """(PNG bytes, true defect or None), seeded."""
    out = []
    for i in range(good + defective):
        defect = None if i < good else DEFECTS[i % len(DEFECTS)]
        img, _ = render(PRODUCT, defect, seed, i, size=128)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")
        out.append((buf.getvalue(), defect))
    return out


def inspect(artifact: Path, items, feedback_db: Path | None = None, samples: Path | None = None) -> list[dict]:
    settings = Settings(artifact=artifact, feedback_db=str(feedback_db) if feedback_db else None, samples_dir=samples)
    with serve_in_thread(create_app(settings, configure_logs=False)) as base, httpx.Client(base_url=base) as client:
        answers = []
        for data, _ in items:
            r = client.post("/detect", files={"image": ("part.png", data, "image/png")}, data={"product": PRODUCT})
            r.raise_for_status()
            answers.append(r.json())
        if feedback_db is not None:
            for answer, (_, truth) in zip(answers, items):
                body = {"request_id": answer["request_id"], "index": 0, **operator(answer["results"][0], truth)}
                client.post("/v1/feedback", json=body).raise_for_status()
    return [a["results"][0] for a in answers]


def operator(result: dict, truth: str | None) -> dict:
    """The verdict a person who knows the truth gives."""
    flagged = result["is_anomalous"]
    if truth is None:
        return {"verdict": "false_positive" if flagged else "correct"}
    if not flagged:
        return {"verdict": "false_negative", "defect_type": truth}
    top = (result["defect_types"] or [{}])[0].get("name")
    return {"verdict": "correct"} if top == truth else {"verdict": "wrong_type", "defect_type": truth}


def tally(results: list[dict], items) -> dict:
    return {"false_alarms": sum(r["is_anomalous"] for r, (_, t) in zip(results, items) if t is None),
            "good": sum(t is None for _, t in items),
            "defects_caught": sum(r["is_anomalous"] for r, (_, t) in zip(results, items) if t is not None),
            "defective": sum(t is not None for _, t in items)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifact", help="artifact to copy (default: bake the demo)")
    p.add_argument("--good", type=int, default=24)
    p.add_argument("--defective", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-threshold", type=float, default=0.09,
                   help="the too-low threshold disc starts with (below most demo good scores, 0.09-0.11)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dapo-feedback-example-"))
    artifact = work / "artifact"
    if args.artifact:
        shutil.copytree(args.artifact, artifact)
    else:
        from training.bake import bake_demo

        bake_demo(artifact)
    m = load_manifest(artifact, verify=False)
    m.products[PRODUCT] = m.products[PRODUCT].model_copy(update={"image_threshold": args.start_threshold})
    write_manifest(artifact, type(m).model_validate(m.model_dump()))

    items = parts(args.good, args.defective, args.seed)
    db = work / "feedback.sqlite3"
    before = inspect(artifact, items, db, work / "samples")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.main(["calibrate", "--artifact", str(artifact), "--feedback", str(db)])
    report = json.loads(out.getvalue())
    after = inspect(artifact, items)
    scores = sorted(round(r["anomaly_score"], 4) for r, (_, t) in zip(before, items) if t is None)
    print(json.dumps({"seed": args.seed, "parts": {"good": args.good, "defective": args.defective},
                      "calibrate": report["products"][PRODUCT], "good_part_scores": scores,
                      "before": tally(before, items), "after": tally(after, items)}, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
