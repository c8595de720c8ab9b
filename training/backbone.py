"""Creating the frozen OpenCLIP backbone: by model name or config JSON, with or without weights.

The product runs on OpenAI CLIP ViT-L/14@336 (`--backbone ViT-L-14-336-quickgelu --pretrained
openai`) at 518x518. Nothing here hard-codes that: widths, depths, patch grid and tapped layers
are read off whichever OpenCLIP ViT is built, so the tiny randomly initialised configs in
`training/configs/` (used by tests and the demo, since no weights can be downloaded here) go
down exactly the same code path.

Positional embeddings: `open_clip.create_model(..., force_image_size=S)` builds the tower at S
and its checkpoint loader resizes the pretrained grid (bicubic) to match; `resize_pos_embed`
below does the same for a model already built.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

CONFIG_DIR = Path(__file__).parent / "configs"
TINY = "dapo-tiny"
TINY_B = "dapo-tiny-b"
# the learning demo's backbone: random features are only as separable as they are wide, and a
# 16x16 grid at 128 px keeps defects to patch size about where ViT-L/14@518 has them
# (bench/feature_probe.py measures the linear-probe ceilings that chose it)
TINY_WIDE = "dapo-tiny-wide"
DEFAULT_BACKBONE = "ViT-L-14-336-quickgelu"
DEFAULT_PRETRAINED = "openai"
DEFAULT_IMAGE_SIZE = 518

open_clip.add_model_config(CONFIG_DIR)  # registers dapo-tiny, dapo-tiny-b by file stem


@dataclass
class BackboneSpec:
    """How to rebuild the frozen CLIP: recorded in checkpoints and manifests."""

    name: str = DEFAULT_BACKBONE  # OpenCLIP model name, or path of a model-config JSON
    pretrained: str | None = DEFAULT_PRETRAINED  # OpenCLIP tag, local weights file, or None (random)
    image_size: int = DEFAULT_IMAGE_SIZE
    seed: int = 0  # only matters when pretrained is None

    def to_dict(self) -> dict:
        return asdict(self)


def _model_name(name: str) -> str:
    """Accept an OpenCLIP name or a config JSON path (registered under its file stem)."""
    path = Path(name)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"backbone config {path} does not exist")
        cfg = json.loads(path.read_text())
        missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(cfg)
        if missing:
            raise ValueError(f"backbone config {path} lacks {sorted(missing)}")
        open_clip.add_model_config(path)
        return path.stem
    if name not in open_clip.list_models():
        raise ValueError(f"unknown OpenCLIP model {name!r}; pass a known name or a config JSON path")
    return name


def create_clip(spec: BackboneSpec) -> tuple[nn.Module, object]:
    """Build the CLIP model (frozen, eval mode) and its tokenizer."""
    name = _model_name(spec.name)
    pretrained = spec.pretrained
    if pretrained and Path(pretrained).suffix in {".pt", ".pth", ".bin", ".safetensors"} \
            and not Path(pretrained).is_file():
        raise FileNotFoundError(f"weights file {pretrained} does not exist")
    torch.manual_seed(spec.seed)
    model = open_clip.create_model(name, pretrained=pretrained or None, force_image_size=spec.image_size)
    check_supported(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, open_clip.get_tokenizer(name)


def check_supported(model: nn.Module) -> None:
    """DAPO needs a plain token-pooled ViT with an OpenAI-style text tower."""
    visual = getattr(model, "visual", None)
    if visual is None or not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
        raise ValueError("DAPO needs an OpenCLIP VisionTransformer image tower (not ResNet/timm)")
    if getattr(visual, "attn_pool", None) is not None:
        raise ValueError("attentional-pool vision towers (CoCa) are not supported")
    if not hasattr(model, "token_embedding"):
        raise ValueError("DAPO needs the built-in OpenCLIP text tower (not an HF text model)")


def default_taps(depth: int) -> list[int]:
    """1-based block indices at the quarters of the depth: 24 -> [6, 12, 18, 24]."""
    return sorted({max(1, round(depth * q / 4)) for q in (1, 2, 3, 4)})


def describe(model: nn.Module) -> dict:
    """The geometry every other module reads instead of hard-coding ViT-L numbers."""
    v = model.visual
    block = v.transformer.resblocks[0]
    act = "quick_gelu" if type(block.mlp.gelu).__name__ == "QuickGELU" else "gelu"
    return {
        "width": v.transformer.width,
        "layers": v.transformer.layers,
        "heads": block.attn.num_heads,
        "patch_size": v.patch_size[0],
        "image_size": v.image_size[0],
        "grid": v.grid_size[0],
        "embed_dim": v.output_dim,
        "text_width": model.transformer.width,
        "text_layers": model.transformer.layers,
        "act": act,
        # OpenCLIP options beyond plain CLIP (DINOv2 has the first three); see training/export.py
        # for which of them the service's torch encoder reproduces
        "layer_scale": not isinstance(block.ls_1, nn.Identity),
        "ln_pre": not isinstance(v.ln_pre, nn.Identity),
        "norm_eps": float(block.ln_1.eps),
        "mlp_width": block.mlp.c_fc.out_features,
    }


def image_normalisation(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the pixel normalisation the backbone was trained with.

    Read from OpenCLIP's own preprocessing config of the built model (set from the pretrained
    tag's statistics, e.g. OpenAI's for `openai`, (0.5, 0.5, 0.5) for SigLIP tags; OpenAI's by
    default). The one source for training's data pipeline and the artifact's manifest."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    if "mean" not in cfg or "std" not in cfg:
        raise ValueError(f"the OpenCLIP model has no image mean/std in its preprocess config: {cfg}")
    return tuple(float(m) for m in cfg["mean"]), tuple(float(s) for s in cfg["std"])


def resize_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize a (1 + g*g, W) ViT positional embedding to (1 + grid*grid, W), bicubic."""
    cls, img = pos[:1], pos[1:]
    old = int(round(img.shape[0] ** 0.5))
    if old * old != img.shape[0]:
        raise ValueError(f"positional embedding of {img.shape[0]} patches is not a square grid")
    if old == grid:
        return pos
    img = img.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    return torch.cat([cls, img.permute(0, 2, 3, 1).reshape(grid * grid, -1)], 0)
