"""OpenCLIP ViT options beyond plain CLIP in the service's torch encoder, and bake's refusals.

The DINOv2 tower (issue #14) has LayerScale, no LayerNorm before the blocks and LayerNorm eps
1e-6; the torch encoder (service/runtime/backends/torch_model.py) re-implements the ViT, so it is
checked here against OpenCLIP's own forward on tiny random towers with those options. Options
it does not reproduce must keep bake from writing encoder.safetensors, never be served wrong.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from service.runtime.artifact import load_manifest
from service.runtime.backends import create_backend
from service.runtime.backends.torch_model import load_encoder, state_dict_for_export
from training.backbone import BackboneSpec
from training.bake import BakeOptions, bake
from training.export import ExportModule, encoder_geometry, torch_export_supported
from training.model import DapoConfig, DapoModel

TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
# eps 1e-2 rather than DINOv2's 1e-6: large enough that an encoder ignoring it fails at 1e-5
DINO_LIKE = {"image_size": 32, "layers": 3, "width": 48, "head_width": 16, "patch_size": 8, "mlp_ratio": 3.0,
             "ls_init_value": 0.5, "no_ln_pre": True, "norm_kwargs": {"eps": 1e-2}}


def _config(tmp_path, name: str, vision: dict, quick_gelu: bool = False) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"embed_dim": 40, "quick_gelu": quick_gelu, "vision_cfg": vision, "text_cfg": TEXT}))
    return str(path)


def _model(cfg: str, prompt_tokens: int = 4) -> DapoModel:
    model = DapoModel(DapoConfig(backbone=BackboneSpec(name=cfg, pretrained=None, image_size=32, seed=3),
                                 visual_deep_tokens=prompt_tokens, taps=[1, 3], n_sets=2))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # make LayerScale gains and norm affines matter (init is constant)
        for name, p in model.clip.visual.named_parameters():
            if name.endswith(("gamma", "ln_1.weight", "ln_2.weight", "ln_post.weight")):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith(("ln_1.bias", "ln_2.bias", "ln_post.bias")):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _encoder(model: DapoModel, text: torch.Tensor, tmp_path, **overrides):
    from safetensors.torch import save_file

    from training.prompts import abnormal_feature

    sd = state_dict_for_export(model.clip.visual, model.visual_prompts.tokens, model.visual_prompts.adapters)
    sd |= {"head.text": text.contiguous(), "head.abnormal": abnormal_feature(text).contiguous()}
    path = tmp_path / "encoder.safetensors"
    save_file(sd, str(path))
    geometry = encoder_geometry(model).model_copy(update=overrides)
    return load_encoder(str(path), geometry)


def _head_inputs(encoder, pixels, allowed):
    """The global feature and tapped patch features the encoder hands its scoring head."""
    seen = {}
    hook = encoder.head.register_forward_hook(lambda _m, args, _o: seen.update(g=args[0], p=args[1]))
    with torch.no_grad():
        encoder(pixels, allowed)
    hook.remove()
    return seen["g"], seen["p"]


def test_torch_encoder_matches_openclip_forward_with_dinov2_options(tmp_path):
    model = _model(_config(tmp_path, "dino-like", DINO_LIKE), prompt_tokens=0)
    g = model.geometry
    assert (g["layer_scale"], g["ln_pre"], g["norm_eps"], g["mlp_width"], g["act"]) == (True, False, 1e-2, 144, "gelu")
    assert torch_export_supported(model) is None
    text = F.normalize(torch.randn(3, 40), dim=-1)
    encoder = _encoder(model, text, tmp_path)
    pixels = torch.randn(2, 3, 32, 32)
    glob, patches = _head_inputs(encoder, pixels, torch.ones(2, 3, dtype=torch.bool))
    visual = model.clip.visual
    with torch.no_grad():  # OpenCLIP's own code: the pooled feature and the block outputs
        ref_glob = F.normalize(visual(pixels), dim=-1)
        blocks = visual.forward_intermediates(pixels, indices=[0, 2], output_fmt="NLC",
                                              intermediates_only=True)["image_intermediates"]
        ref_patches = [F.normalize(a(b), dim=-1) for a, b in zip(model.visual_prompts.adapters, blocks)]
    assert (glob - ref_glob).abs().max() < 1e-5
    for ours, ref in zip(patches, ref_patches):
        assert (ours - ref).abs().max() < 1e-5
    # the options matter: the encoder built as plain CLIP is far off (so the check above can fail)
    for wrong in ({"norm_eps": 1e-5}, {"act": "quick_gelu"}):
        plain = _encoder(model, text, tmp_path, **wrong)
        assert (_head_inputs(plain, pixels, torch.ones(2, 3, dtype=torch.bool))[0] - ref_glob).abs().max() > 1e-4


def test_bake_exports_and_verifies_a_layerscale_tower_for_both_backends(tmp_path):
    model = _model(_config(tmp_path, "dino-like", DINO_LIKE))
    art = bake(model, ["scratch", "hole"], tmp_path / "art", BakeOptions(name="dino-like")).folder
    m = load_manifest(art)
    assert "encoder.safetensors" in m.files and "torch_backend" not in m.provenance
    b = m.backbone
    assert (b.layer_scale, b.ln_pre, b.norm_eps, b.mlp_width) == (True, False, 1e-2, 144)
    assert m.verification.passed and max(m.verification.max_abs_diff.values()) < 1e-5
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    allowed = np.ones((2, 3), bool)
    ref = ExportModule(model, *_text(model)).eval()
    with torch.no_grad():
        ref_map = ref(torch.from_numpy(pixels), torch.from_numpy(allowed))[2].numpy()
    for backend in ("onnxruntime", "torch"):
        out = create_backend(art, m, backend=backend).run(pixels, allowed)
        assert np.abs(out.anomaly_map - ref_map).max() < 1e-5, backend


def _text(model):
    from training.prompts import abnormal_feature

    with torch.no_grad():
        text = model.text_features(["scratch", "hole"])
    return text, abnormal_feature(text)


UNSUPPORTED = {
    "tanh GELU": ({"act_kwargs": {"approximate": "tanh"}}, "activation"),
    "average pooling": ({"pool_type": "avg"}, "pool type"),
    "final LayerNorm after pooling": ({"final_ln_after_pool": True}, "pool type"),
    "qk-norm attention": ({"qk_norm": True}, "custom attention"),
}


@pytest.mark.parametrize("option", sorted(UNSUPPORTED))
def test_options_the_torch_encoder_lacks_are_named(tmp_path, option):
    extra, words = UNSUPPORTED[option]
    model = _model(_config(tmp_path, "odd", DINO_LIKE | extra))
    problem = torch_export_supported(model)
    assert problem is not None and words in problem


def test_bake_refuses_the_torch_encoder_for_such_a_tower_and_the_torch_backend_says_why(tmp_path):
    model = _model(_config(tmp_path, "tanh", DINO_LIKE | {"act_kwargs": {"approximate": "tanh"}}))
    art = bake(model, ["scratch"], tmp_path / "art", BakeOptions(name="tanh")).folder
    m = load_manifest(art)
    assert "encoder.safetensors" not in m.files and not (art / "encoder.safetensors").exists()
    assert "activation" in m.provenance["torch_backend"]
    assert m.verification.passed  # ONNX Runtime still serves it, checked against the training model
    with pytest.raises(FileNotFoundError, match="onnxruntime"):
        create_backend(art, m, backend="torch")
