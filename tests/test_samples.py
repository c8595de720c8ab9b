"""Samples kept by policy, read back with the offline tools' own `folder` loader.

Shown here: each rule kind keeps what it should (near_threshold, anomalous, every_nth, all),
first matching rule only; what is written loads with training.data.folder.load_folder as the
label the model gave, with the upload's own bytes, the mask equal to the API's RLE masks and
the result JSON beside it; caps keep the newest, retention deletes the old; a write that fails
is counted by errno and the request is answered as if nothing happened.
"""
from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pycocotools import mask as mask_utils

from loop_util import detect, metric, png, wait_until, without_images
from service.server.answers import Answer
from service.server.app import create_app
from service.server.line.samples import UNLABELLED, image_payload, model_label, sidecar_of, write_sample
from service.server.line.samples_policy import SamplePolicy, SampleRule
from service.server.settings import Settings
from training.data.folder import load_folder

POLICY = {
    "disc": [{"kind": "near_threshold", "band": 0.02}, {"kind": "anomalous"}, {"kind": "every_nth", "n": 3}],
    "plate": [{"kind": "all", "cap": 2}],
    "*": [{"kind": "all", "retention": 1.0}],  # no product given; seconds (ISO 8601 "P30D" works too)
}


@pytest.fixture(scope="module")
def samples_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("samples")


@pytest.fixture(scope="module")
def app(demo_artifact, samples_dir):
    settings = Settings(artifact=demo_artifact, samples_dir=samples_dir, samples_policy=json.dumps(POLICY))
    with TestClient(create_app(settings, configure_logs=False)) as client:
        yield client


def written(app, rule: str) -> float:
    return metric(app, "dapo_samples_written_total", rule=rule)


def api_mask(result: dict) -> np.ndarray:
    """All defect pixels of an answer, decoded here from its RLE with pycocotools."""
    out = np.zeros((result["height"], result["width"]), bool)
    for rle in result["mask"]["rle"].values():
        out |= mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
    return out


def only(samples, stem_part: str):
    found = [s for s in samples if stem_part in s.image.name]
    assert len(found) == 1, [s.image for s in samples]
    return found[0]


def test_each_rule_keeps_its_images_in_the_folder_layout(app, samples_dir):
    image = png(7, 96, 72)
    probe = detect(app, [image], params={"threshold": 0.999}, product="disc")["results"][0]  # every_nth: 1
    score = probe["anomaly_score"]
    assert 0.05 < score < 0.97, score  # room for the thresholds below

    near = detect(app, [image], params={"threshold": score + 0.01}, product="disc")  # near: kept; every_nth: 2
    flagged = detect(app, [image], params={"threshold": score / 2}, product="disc")  # anomalous (nth 3: 1st rule wins)
    plain = [detect(app, [png(8 + i)], params={"threshold": 0.999}, product="disc") for i in range(3)]  # nth 4, 5, 6
    wait_until(lambda: written(app, "near_threshold") + written(app, "anomalous") + written(app, "every_nth") == 3)
    time.sleep(0.2)  # nothing else should be written
    assert (written(app, "near_threshold"), written(app, "anomalous"), written(app, "every_nth")) == (1, 1, 1)

    # near_threshold: the model said good -> <product>/good/, the upload's own bytes
    [s] = load_folder(samples_dir / "near_threshold")
    assert (s.product, s.label, s.defect) == ("disc", 0, None)
    assert s.image.read_bytes() == image and s.image.suffix == ".png"
    side = json.loads(s.image.with_suffix(".json").read_text())
    assert side["request_id"] == near["request_id"] and side["labelled_by"] == "model"
    assert side["result"] == without_images(near["results"][0])
    assert side["rule"]["kind"] == "near_threshold"

    # anomalous: the model's top type as the class folder, its mask as ground truth
    result = flagged["results"][0]
    assert result["is_anomalous"] and result["defect_types"]  # deterministic demo model: this image has pixels
    [s] = load_folder(samples_dir / "anomalous")
    top = result["defect_types"][0]["name"]
    assert (s.product, s.label, s.defect) == ("disc", 1, top)
    with Image.open(s.mask) as m:
        assert m.size == (result["width"], result["height"])
        assert np.array_equal(np.asarray(m) > 0, api_mask(result))

    # every_nth: the 6th disc image (the 3rd went to the anomalous rule: first match wins)
    [s] = load_folder(samples_dir / "every_nth")
    assert s.image.read_bytes() == png(10)
    assert json.loads(s.image.with_suffix(".json").read_text())["request_id"] == plain[2]["request_id"]


def test_cap_keeps_the_newest(app, samples_dir):
    bodies = [detect(app, [png(20 + i)], product="plate") for i in range(4)]
    wait_until(lambda: written(app, "all") >= 4 and metric(app, "dapo_samples_deleted_total", reason="cap") == 2)
    kept = load_folder(samples_dir / "all", products=["plate"])
    assert sorted(json.loads(s.image.with_suffix(".json").read_text())["request_id"] for s in kept) == \
        sorted(b["request_id"] for b in bodies[2:])


def test_retention_deletes_old_samples(app, samples_dir):
    before = metric(app, "dapo_samples_deleted_total", reason="retention")
    detect(app, [png(30)])  # no product: the "*" rules, folder _unspecified
    folder = samples_dir / "all" / "_unspecified"
    wait_until(lambda: any(folder.rglob("*.json")))
    wait_until(lambda: not any(folder.rglob("*.*")), timeout=5)  # gone after 1 s, by the writer's sweep
    assert metric(app, "dapo_samples_deleted_total", reason="retention") == before + 1


def test_a_failed_write_is_counted_and_the_request_answered(app, samples_dir):
    shutil.rmtree(samples_dir / "all" / "plate", ignore_errors=True)
    (samples_dir / "all" / "plate").write_text("a file where the product folder should be")
    errors_before = sum(metric(app, "dapo_samples_errors_total", reason=r) for r in ("ENOTDIR", "EEXIST"))
    for i in range(3):
        detect(app, [png(40 + i)], product="plate")
    wait_until(lambda: sum(metric(app, "dapo_samples_errors_total", reason=r)
                           for r in ("ENOTDIR", "EEXIST")) == errors_before + 3)
    assert (samples_dir / "all" / "plate").read_text().startswith("a file")  # nothing half-written


def test_flagged_without_defect_pixels_is_kept_for_review_only(tmp_path):
    """No type to file it under: `.unlabelled/`, which the folder loaders skip."""
    result = {"is_anomalous": True, "defect_types": [], "anomaly_score": 0.9, "threshold": 0.5,
              "width": 8, "height": 6, "mask": {"format": "rle", "label_map": {}, "rle": {}}}
    label = model_label(result)
    assert label.folder == UNLABELLED
    answer = Answer("r1", {"name": "m"}, (("a.png", png(1, 8, 6)),), (result,), {"product": "disc"})
    files = write_sample(tmp_path, "disc", label, "s1", answer.files[0][1], sidecar_of(answer, 0, "model"))
    assert [f.parent.name for f in files] == [UNLABELLED, UNLABELLED]
    (tmp_path / "disc" / "good").mkdir()
    (tmp_path / "disc" / "good" / "g.png").write_bytes(png(2, 8, 6))
    assert [s.image.name for s in load_folder(tmp_path)] == ["g.png"]


def test_policy_decisions():
    """The rule logic alone: first match wins, every_nth counts every image of its product."""
    policy = SamplePolicy({"*": [SampleRule(kind="anomalous"), SampleRule(kind="every_nth", n=2)],
                           "x": [SampleRule(kind="near_threshold", band=0.1)]})
    assert policy.choose("x", 0.55, 0.5, True).kind == "near_threshold"
    assert policy.choose("x", 0.75, 0.5, True) is None  # x has its own rules: "*" does not apply
    kinds = [getattr(policy.choose("y", s, 0.5, s >= 0.5), "kind", None) for s in (0.1, 0.9, 0.1, 0.2, 0.1)]
    assert kinds == [None, "anomalous", None, "every_nth", None]  # counts 1, 2 (anomalous wins), 3, 4, 5
    with pytest.raises(ValueError, match="twice"):
        SamplePolicy({"x": [SampleRule(kind="all"), SampleRule(kind="all")]})


def test_exif_rotated_upload_is_written_upright():
    """The answer's masks are in the oriented frame; the written image must be too."""
    import io

    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (200, 10, 10)).save(buf, "JPEG", exif=exif)
    data, ext = image_payload(buf.getvalue())
    with Image.open(io.BytesIO(data)) as img:
        assert (ext, img.format, img.size) == (".png", "PNG", (20, 40))
    buf = io.BytesIO()
    Image.new("RGB", (40, 20), (10, 200, 10)).save(buf, "PNG", exif=exif)  # PNG's eXIf chunk
    data, ext = image_payload(buf.getvalue())
    with Image.open(io.BytesIO(data)) as img:
        assert (ext, img.size) == (".png", (20, 40)) and data != buf.getvalue()
    plain = png(3)
    assert image_payload(plain) == (plain, ".png")  # no rotation: the upload's own bytes
