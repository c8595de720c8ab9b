"""Training: loss goes down, a checkpoint per epoch, exact resume, eval and calibration."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training.backbone import TINY, BackboneSpec
from training.checkpoint import load_checkpoint
from training.data import Vocabulary, with_vocabulary
from training.model import DapoConfig
from training.synth import generate, load_split
from training.train import TrainConfig, train

WORDS = ["scratch", "hole"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, seed=0, n_per_class=2, size=64, products=["wood", "disc"], defects=["scratch", "hole", "crack"],
             holdout_product=None, holdout_defect="crack")
    return root


def _cfg(out, epochs, **kw):
    return TrainConfig(out=str(out), epochs=epochs, batch_size=4, workers=0,
                       model=DapoConfig(backbone=BackboneSpec(name=TINY, pretrained=None, image_size=64, seed=0)), **kw)


def _samples(root):
    samples = load_split(root, "train")
    vocab = Vocabulary(WORDS)
    return with_vocabulary(samples, vocab), vocab


def test_checkpoint_each_epoch_and_exact_resume(synth, tmp_path):
    samples, vocab = _samples(synth)
    straight = train(samples, vocab, _cfg(tmp_path / "a", 2), progress=False)
    assert (tmp_path / "a" / "epoch_1" / "learned.safetensors").is_file()
    assert (tmp_path / "a" / "epoch_2" / "optimizer.safetensors").is_file()
    meta = json.loads((straight / "config.json").read_text())
    assert meta["epoch"] == 2 and len(meta["history"]) == 2 and meta["vocabulary"] == WORDS

    train(samples, vocab, _cfg(tmp_path / "b", 1), progress=False)
    resumed = train(samples, vocab, _cfg(tmp_path / "b", 2), resume=True, progress=False)
    a, _ = load_checkpoint(straight)
    b, _ = load_checkpoint(resumed)
    for name, p in a.learned_parameters().items():
        torch.testing.assert_close(b.learned_parameters()[name], p, rtol=1e-5, atol=1e-6, msg=name)


def test_training_changes_only_learned_parts_and_lowers_the_loss(synth, tmp_path):
    samples, vocab = _samples(synth)
    last = train(samples, vocab, _cfg(tmp_path / "run", 4, lr=3e-3), progress=False)
    history = json.loads((last / "config.json").read_text())["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    trained, _ = load_checkpoint(last)
    fresh, _ = load_checkpoint(tmp_path / "run" / "epoch_1")
    for (n, p), (_, q) in zip(trained.clip.state_dict().items(), fresh.clip.state_dict().items()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)  # the backbone never moves


def test_resume_refuses_another_vocabulary(synth, tmp_path):
    samples, vocab = _samples(synth)
    train(samples, vocab, _cfg(tmp_path / "r", 1, max_steps=1), progress=False)
    other = Vocabulary(["hole", "scratch"])
    with pytest.raises(ValueError, match="trained on vocabulary"):
        train(with_vocabulary(samples, other), other, _cfg(tmp_path / "r", 2), resume=True, progress=False)


def test_eval_and_calibrate_through_the_artifact(synth, tmp_path, capsys):
    from service.runtime.artifact import load_manifest
    from service.cli import main
    from training.evaluate import evaluate

    samples, vocab = _samples(synth)
    last = train(samples, vocab, _cfg(tmp_path / "run", 1), progress=False)
    art = tmp_path / "art"
    assert main(["bake", "--checkpoint", str(last), "--add-defect", "crack", "--out", str(art)]) == 0
    capsys.readouterr()
    test = load_split(synth, "test_zeroshot")
    res = evaluate(art, test, progress=False)
    assert set(res["per_product"]) == {"wood", "disc"}
    for r in res["per_product"].values():
        assert 0 <= r["image_auroc"] <= 1 and 0 <= r["pixel_auroc"] <= 1 and 0 <= r["aupro"] <= 1
        assert set(r["per_type"]) == {"normal", "crack"}
    assert main(["eval", "--artifact", str(art), "--data", str(synth), "--layout", "synth", "--split",
                 "test_zeroshot", "--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv"),
                 "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "image_auroc" in table and "mean" in table
    assert json.loads((tmp_path / "r.json").read_text())["mean"]["image_auroc"] == pytest.approx(
        res["mean"]["image_auroc"])
    assert (tmp_path / "r.csv").read_text().splitlines()[0].startswith("category,image_auroc")

    assert main(["calibrate", "--artifact", str(art), "--data", str(synth), "--layout", "synth", "--split",
                 "train", "--image-quantile", "0.9"]) == 0
    table = json.loads(capsys.readouterr().out)
    m = load_manifest(art)  # still verifies: only manifest.json changed
    for product, entry in table.items():
        assert m.products[product].image_threshold == pytest.approx(entry["image_threshold"])
        assert m.products[product].pixel_threshold is not None
    assert m.provenance["calibration"]["image_quantile"] == 0.9
    from training.evaluate import run_artifact

    goods = [s for s in load_split(synth, "train") if s.label == 0]
    for product, c in run_artifact(art, goods, progress=False).items():  # at most 10% of good parts alarm
        assert np.mean(np.array(c.scores) > m.products[product].image_threshold) <= 0.1 + 1e-9


def test_calibrate_refuses_defective_parts(synth, demo_artifact):
    from training.calibrate import calibrate

    bad = [s for s in load_split(synth, "train") if s.label == 1][:1]
    with pytest.raises(ValueError, match="good parts only"):
        calibrate(demo_artifact, bad)
