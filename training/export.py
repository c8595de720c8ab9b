"""Export the image side of a DapoModel (+ baked text features + scoring head).

Two forms of one computation, both honouring `service.backends.base`'s contract:
- `encoder.onnx` for ONNX Runtime (dynamic batch), traced from the training model itself;
- `encoder.safetensors` for the service's plain-PyTorch encoder (no pickle, no OpenCLIP).
Bake then runs all three (training model, ORT, service torch) on the same inputs.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from service.backends.base import GRAPH_OUTPUTS, INPUT_NAMES
from service.backends.torch_model import ScoringHead, state_dict_for_export
from training.model import DapoModel

OPSET = 18


class ExportModule(nn.Module):
    """pixel_values, allowed -> the contract outputs, via the training model's own forward."""

    def __init__(self, model: DapoModel, text_features: torch.Tensor, abnormal: torch.Tensor):
        super().__init__()
        self.model = model
        geo = model.geometry
        self.head = ScoringHead(text_features, abnormal, geo["grid"], geo["image_size"], model.config.temperature)

    def forward(self, pixel_values: torch.Tensor, allowed: torch.Tensor):
        global_feat, patches = self.model.encode_image(pixel_values)
        return self.head(global_feat, patches, allowed)


def export_onnx(module: ExportModule, path: Path, image_size: int, n_classes: int) -> Path:
    """Trace to ONNX with a dynamic batch axis on every input and output."""
    module.eval()
    example = (torch.randn(2, 3, image_size, image_size), torch.ones(2, n_classes, dtype=torch.bool))
    dynamic = {name: {0: "batch"} for name in (*INPUT_NAMES, *GRAPH_OUTPUTS)}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel has no ONNX symbolic
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, example, str(path), input_names=list(INPUT_NAMES),
                              output_names=list(GRAPH_OUTPUTS), dynamic_axes=dynamic, opset_version=OPSET,
                              dynamo=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return path


def export_safetensors(model: DapoModel, text_features: torch.Tensor, abnormal: torch.Tensor, path: Path) -> Path:
    """Weights for `service.backends.torch_model.DapoImageEncoder`, names already mapped."""
    sd = state_dict_for_export(model.clip.visual, model.visual_prompts.tokens, model.visual_prompts.adapters)
    sd["head.text"] = text_features.detach().float().contiguous()
    sd["head.abnormal"] = abnormal.detach().float().contiguous()
    save_file(sd, str(path), metadata={"format": "dapo-encoder", "version": "1"})
    return path


def encoder_config(model: DapoModel) -> dict:
    """The geometry the service needs to rebuild the encoder; stored in the manifest."""
    g = model.geometry
    return {
        "width": g["width"], "layers": g["layers"], "heads": g["heads"], "patch_size": g["patch_size"],
        "image_size": g["image_size"], "embed_dim": g["embed_dim"], "taps": list(model.config.taps),
        "prompt_tokens": model.config.visual_deep_tokens, "alpha": model.config.alpha, "act": g["act"],
        "temperature": model.config.temperature,
    }


def torch_export_supported(model: DapoModel) -> str | None:
    """Why the plain-PyTorch encoder cannot represent this backbone, or None if it can."""
    visual = model.clip.visual
    block = visual.transformer.resblocks[0]
    if type(block).__name__ != "ResidualAttentionBlock":
        return f"block type {type(block).__name__} (custom attention) is not in the torch encoder"
    if not isinstance(block.ls_1, nn.Identity):
        return "LayerScale blocks are not in the torch encoder"
    if visual.pool_type != "tok" or visual.final_ln_after_pool:
        return f"pool type {visual.pool_type!r} is not in the torch encoder"
    if not isinstance(visual.ln_pre, nn.LayerNorm):
        return "towers without ln_pre are not in the torch encoder"
    return None
