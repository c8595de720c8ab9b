"""`dapo bake --checkpoint C --image-size S`: a checkpoint served at another size than trained."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from service.runtime.artifact import load_manifest
from service.runtime.detector import Detector
from training.bake import demo_model
from training.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = demo_model()  # tiny config, 112 px, patch 16 -> 7x7 grid
    with torch.no_grad():
        for p in model.learned_parameters().values():
            p.add_(torch.randn_like(p) * 0.1)
    return save_checkpoint(model, tmp_path_factory.mktemp("ck") / "ck", vocabulary=["scratch", "hole"]), model


def test_checkpoint_rebuilt_at_another_size_keeps_learned_state_and_resizes_positions(checkpoint):
    folder, trained = checkpoint
    big, _ = load_checkpoint(folder, image_size=160)
    assert big.geometry["image_size"] == 160 and big.geometry["grid"] == 10
    assert big.clip.visual.positional_embedding.shape[0] == 1 + 10 * 10
    for name, p in trained.learned_parameters().items():  # prompts and adapters have no grid axis
        torch.testing.assert_close(big.learned_parameters()[name], p, rtol=0, atol=0)
    # the class position is carried over as it is; the patch positions are interpolated
    torch.testing.assert_close(big.clip.visual.positional_embedding[0], trained.clip.visual.positional_embedding[0])


def test_bake_cli_bakes_at_the_asked_size_and_self_checks_there(checkpoint, tmp_path):
    folder, _ = checkpoint
    out = tmp_path / "art"
    run = subprocess.run([sys.executable, "-m", "service.cli", "bake", "--checkpoint", str(folder), "--image-size",
                          "160", "--out", str(out)], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    m = load_manifest(out)
    assert m.image_size == 160 and m.verification is not None and m.verification.passed
    assert report["parity_max_abs_diff"] <= m.verification.tolerance
    det = Detector.load(out)
    pv = np.zeros((1, 3, 160, 160), np.float32)
    outs = det.infer(pv, np.ones((1, len(m.vocabulary)), bool))
    assert outs.anomaly_map.shape == (1, 160, 160)


def test_bake_cli_refuses_a_size_the_patch_grid_cannot_take(checkpoint, tmp_path):
    folder, _ = checkpoint
    run = subprocess.run([sys.executable, "-m", "service.cli", "bake", "--checkpoint", str(folder), "--image-size",
                          "150", "--out", str(tmp_path / "art")], capture_output=True, text=True, check=False)
    assert run.returncode != 0
    assert "not a multiple of the patch size 16" in run.stderr and "use 144 or 160" in run.stderr
    assert not (tmp_path / "art").exists()
