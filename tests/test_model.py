"""The DAPO model on two different tiny OpenCLIP ViTs: shapes, taps, frozen backbone."""
from __future__ import annotations

import pytest
import torch

from training.backbone import TINY, TINY_B, TINY_WIDE, BackboneSpec, default_taps, resize_pos_embed
from training.model import DapoConfig, DapoModel
from training.visual import prompt_init_bound

WORDS = ["scratch", "hole", "crack"]


def build(name: str, size: int, **kw) -> DapoModel:
    return DapoModel(DapoConfig(backbone=BackboneSpec(name=name, pretrained=None, image_size=size), **kw))


@pytest.mark.parametrize("name,size,grid,width,layers,embed", [(TINY, 112, 7, 64, 4, 64), (TINY_B, 84, 6, 96, 6, 48),
                                                                    (TINY_WIDE, 128, 16, 256, 4, 64)])
def test_shapes_follow_the_backbone(name, size, grid, width, layers, embed):
    m = build(name, size)
    assert (m.geometry["grid"], m.geometry["width"], m.geometry["layers"]) == (grid, width, layers)
    assert m.config.taps == default_taps(layers)
    text = m.text_features(WORDS)
    assert text.shape == (1 + len(WORDS), embed)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(len(WORDS) + 1))
    g, patches = m.encode_image(torch.randn(3, 3, size, size))
    assert g.shape == (3, embed) and len(patches) == len(m.config.taps)
    assert all(p.shape == (3, grid * grid, embed) for p in patches)
    out = m(torch.randn(2, 3, size, size), text)
    assert out["image_logits"].shape == (2, 2)
    assert out["type_logits"].shape == (2, 4)
    assert out["patch_probs"].shape == (len(m.config.taps), 2, 4, grid, grid)
    torch.testing.assert_close(out["patch_probs"].sum(2), torch.ones(len(m.config.taps), 2, grid, grid))
    assert m.visual_prompts.tokens.shape == (layers, 4, width)
    assert m.text_prompts.deep.shape == (m.geometry["text_layers"], 4, m.geometry["text_width"])
    assert m.text_prompts.ctx_normal.shape == (10, 5, m.geometry["text_width"])


def test_default_taps_for_vit_l_are_6_12_18_24():
    assert default_taps(24) == [6, 12, 18, 24]
    assert default_taps(12) == [3, 6, 9, 12]
    assert default_taps(4) == [1, 2, 3, 4]


def test_custom_taps_and_bad_taps():
    m = build(TINY_B, 84, taps=[2, 6])
    assert len(m.visual_prompts.adapters) == 2
    with pytest.raises(ValueError, match="outside 1..4"):
        build(TINY, 112, taps=[5])


def test_visual_prompt_init_bound():
    m = build(TINY, 112)
    bound = prompt_init_bound(16, 64)
    assert abs(bound - (6 / (3 * 16 * 16 + 64)) ** 0.5) < 1e-12
    assert m.visual_prompts.tokens.abs().max() <= bound


def test_context_init_uses_token_table_statistics():
    m = build(TINY, 112)
    table = m.clip.token_embedding.weight
    ctx = m.text_prompts.ctx_normal.detach().reshape(-1, table.shape[1])
    # per-dimension mean of 50 draws of mean + std * N(0,1) is near the table's mean
    assert (ctx.mean(0) - table.mean(0)).abs().mean() < 3 * table.std(0).mean() / 50 ** 0.5


def test_only_learned_parts_get_gradients():
    m = build(TINY, 112)
    m.train()
    text = m.text_features(WORDS)
    out = m(torch.randn(2, 3, 112, 112), text)
    (out["image_logits"].sum() + out["patch_probs"][..., 1:, :, :].sum()).backward()
    learned = m.learned_parameters()
    assert set(learned) == {"text_prompts.ctx_normal", "text_prompts.ctx_abnormal", "text_prompts.deep",
                            "visual_prompts.tokens", *(f"visual_prompts.adapters.{i}.{k}" for i in range(4)
                                                      for k in ("weight", "bias"))}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learned.values())
    assert all(p.grad is None and not p.requires_grad for p in m.clip.parameters())
    assert not m.clip.training  # frozen backbone stays in eval mode when the model trains


def test_positional_embedding_resized_when_loading_weights_at_another_size(tmp_path):
    """The real loading path: a local weights file built at one size, loaded at another."""
    from safetensors.torch import save_file

    from training.backbone import create_clip

    src, _ = create_clip(BackboneSpec(name=TINY, pretrained=None, image_size=112))
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    big, _ = create_clip(BackboneSpec(name=TINY, pretrained=str(path), image_size=144))
    assert big.visual.grid_size == (9, 9)
    pos = big.visual.positional_embedding
    assert pos.shape == (82, 64)
    torch.testing.assert_close(pos, resize_pos_embed(src.visual.positional_embedding, 9))
    torch.testing.assert_close(big.visual.conv1.weight, src.visual.conv1.weight)  # other weights loaded as-is


def test_backbone_from_config_json_and_errors(tmp_path):
    import json

    from training.backbone import CONFIG_DIR, create_clip

    cfg = json.loads((CONFIG_DIR / "dapo-tiny-b.json").read_text())
    cfg["vision_cfg"]["layers"] = 2
    path = tmp_path / "my-custom-clip.json"
    path.write_text(json.dumps(cfg))
    clip, _ = create_clip(BackboneSpec(name=str(path), pretrained=None, image_size=84))
    assert clip.visual.transformer.layers == 2
    with pytest.raises(ValueError, match="unknown OpenCLIP model"):
        create_clip(BackboneSpec(name="no-such-model", pretrained=None))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        create_clip(BackboneSpec(name=TINY, pretrained=str(tmp_path / "missing.safetensors")))


def test_real_backbone_name_is_known_to_open_clip():
    import open_clip

    assert "ViT-L-14-336-quickgelu" in open_clip.list_models()
    assert ("ViT-L-14-336-quickgelu", "openai") in open_clip.list_pretrained() or \
        ("ViT-L-14-336", "openai") in open_clip.list_pretrained()


def test_the_real_architecture_at_518_has_the_papers_geometry(monkeypatch):
    """ViT-L/14@336 (random init here: no weights can be downloaded) resized to 518 -> 37x37.
    Only shapes are checked, so the random fills are skipped (430 M values: 5 of the 5.5 s)."""
    for name in ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "xavier_uniform_"):
        monkeypatch.setattr(torch.nn.init, name, lambda tensor, *a, **k: tensor)
    for name in ("normal_", "uniform_"):
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, **k: self)
    m = build("ViT-L-14-336-quickgelu", 518)
    g = m.geometry
    assert (g["width"], g["layers"], g["embed_dim"], g["text_width"], g["text_layers"]) == (1024, 24, 768, 768, 12)
    assert g["grid"] == 37 and g["act"] == "quick_gelu"
    assert m.clip.visual.positional_embedding.shape == (37 * 37 + 1, 1024)
    assert m.config.taps == [6, 12, 18, 24]
    assert m.visual_prompts.tokens.shape == (24, 4, 1024)
    assert [tuple(a.weight.shape) for a in m.visual_prompts.adapters] == [(768, 1024)] * 4
    assert m.text_prompts.deep.shape == (12, 4, 768) and m.text_prompts.ctx_abnormal.shape == (10, 5, 768)
