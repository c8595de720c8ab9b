"""Checkpoints: safetensors round trip, and import of the authors' .pth layout."""
from __future__ import annotations

import pytest
import torch

from training.bake import demo_model
from training.checkpoint import BACKBONE, LEARNED, import_authors, load_checkpoint, save_checkpoint
from training.model import DapoConfig


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


def _authors_file(model, path):
    """A .pth laid out as the authors' training script writes it: three state dicts."""
    lp = model.learned_parameters()
    e, n, w = lp["text_prompts.ctx_normal"].shape
    raw = {
        "prompt_learner": {
            "ctx_pos": lp["text_prompts.ctx_normal"].detach().reshape(e, 1, n, w).clone(),
            "ctx_neg": lp["text_prompts.ctx_abnormal"].detach().reshape(e, 1, n, w).clone(),
            **{f"compound_prompts_text.{i}": t.detach().clone() for i, t in enumerate(lp["text_prompts.deep"])},
        },
        "visual_prompt": {f"prompt_embeddings.{i}": t.detach().clone() for i, t in enumerate(lp["visual_prompts.tokens"])},
        "adapter": {f"{j}.{k}": lp[f"visual_prompts.adapters.{j}.{k}"].detach().clone()
                    for j in range(4) for k in ("weight", "bias")},
    }
    torch.save(raw, path)
    return raw


def test_import_of_the_authors_format(tmp_path):
    src = _perturbed()
    path = tmp_path / "epoch_5.pth"
    _authors_file(src, path)
    config = DapoConfig.from_dict(src.config.to_dict())
    config.text_mode = "reference"
    imported = import_authors(path, config)
    assert imported.config.text_mode == "reference"
    for name, p in src.learned_parameters().items():
        torch.testing.assert_close(imported.learned_parameters()[name], p, rtol=0, atol=0, msg=name)
    # ... and it round-trips through our own format
    back, _ = load_checkpoint(save_checkpoint(imported, tmp_path / "ours", vocabulary=["hole"]))
    assert back.config.text_mode == "reference"
    with torch.no_grad():
        torch.testing.assert_close(back.text_features(["hole"]), imported.text_features(["hole"]))


def test_import_names_what_it_cannot_map(tmp_path):
    src = _perturbed()
    raw = _authors_file(src, tmp_path / "a.pth")
    raw["adapter"]["mystery.weight"] = torch.zeros(1)
    torch.save(raw, tmp_path / "b.pth")
    with pytest.raises(ValueError, match="no mapping for adapter.mystery.weight"):
        import_authors(tmp_path / "b.pth", DapoConfig.from_dict(src.config.to_dict()))
    del raw["adapter"]
    torch.save(raw, tmp_path / "c.pth")
    with pytest.raises(ValueError, match="lacks the 'adapter' state dict"):
        import_authors(tmp_path / "c.pth", DapoConfig.from_dict(src.config.to_dict()))


def test_import_refuses_pickled_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"prompt_learner": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        import_authors(tmp_path / "evil.pth", DapoConfig.from_dict(demo_model().config.to_dict()))
