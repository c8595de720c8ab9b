"""Checkpoints: safetensors round trip (the authors' .pth import: test_authors_import.py)."""
from __future__ import annotations

import pytest
import torch

from training.bake import demo_model
from training.checkpoint import BACKBONE, LEARNED, load_checkpoint, save_checkpoint


def _perturbed():
    model = demo_model()
    with torch.no_grad():  # make the learned state differ from a fresh init
        for p in model.learned_parameters().values():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def test_round_trip_restores_learned_state_and_backbone(tmp_path):
    model = _perturbed()
    folder = save_checkpoint(model, tmp_path / "ck", vocabulary=["scratch", "hole"], epoch=3)
    assert (folder / LEARNED).is_file() and (folder / BACKBONE).is_file()
    assert not list(folder.glob("*.pt*"))  # no pickles
    loaded, meta = load_checkpoint(folder)
    assert meta["vocabulary"] == ["scratch", "hole"] and meta["epoch"] == 3
    for name, p in model.learned_parameters().items():
        torch.testing.assert_close(loaded.learned_parameters()[name], p, rtol=0, atol=0)
    for (n, a), (_, b) in zip(model.clip.state_dict().items(), loaded.clip.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(loaded.text_features(["crack"]), model.text_features(["crack"]))


def test_shape_mismatch_is_explained(tmp_path):
    folder = save_checkpoint(_perturbed(), tmp_path / "ck", vocabulary=["scratch"])
    from safetensors.torch import load_file, save_file

    t = load_file(str(folder / LEARNED))
    t["visual_prompts.tokens"] = t["visual_prompts.tokens"][:, :2].contiguous()
    save_file(t, str(folder / LEARNED))
    with pytest.raises(ValueError, match="visual_prompts.tokens has shape"):
        load_checkpoint(folder)
