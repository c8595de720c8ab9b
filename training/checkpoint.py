"""Checkpoints: learned parameters as safetensors + config JSON; never pickle.

A checkpoint folder holds
    learned.safetensors   the prompts and adapters (DapoModel.learned_parameters)
    config.json           DapoConfig, the training vocabulary, epoch and free-form metadata
    backbone.safetensors  only for randomly initialised backbones (demo/tests): the frozen
                          weights themselves, so bake rebuilds exactly the CLIP that was trained

A `.pth` written by the authors' training script becomes such a folder through
`training.authors` (`dapo import-authors`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from training.model import DapoConfig, DapoModel

LEARNED = "learned.safetensors"
CONFIG = "config.json"
BACKBONE = "backbone.safetensors"


def save_checkpoint(model: DapoModel, folder: str | Path, vocabulary: list[str], **meta) -> Path:
    """Write the learned state; a random backbone's weights are written beside it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = DapoConfig.from_dict(model.config.to_dict())
    if config.backbone.pretrained is None:
        save_file({k: v.contiguous() for k, v in model.clip.state_dict().items()}, str(folder / BACKBONE))
        config.backbone.pretrained = BACKBONE
    tensors = {n: p.detach().float().contiguous() for n, p in model.learned_parameters().items()}
    save_file(tensors, str(folder / LEARNED))
    (folder / CONFIG).write_text(json.dumps({"model": config.to_dict(), "vocabulary": vocabulary, **meta}, indent=2))
    return folder


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint config missing")
    return json.loads(path.read_text())


def load_checkpoint(folder: str | Path, strict: bool = True, image_size: int | None = None) -> tuple[DapoModel, dict]:
    """Rebuild the model (backbone from its spec) and load the learned parameters.

    `image_size` rebuilds the tower at another input size than the one trained at (`dapo bake
    --image-size`): OpenCLIP resizes the positional table when it loads the backbone weights;
    the learned prompts and adapters have one entry per block and per tap, never per patch, so
    they load unchanged. A size the patch grid cannot take is refused before anything is built."""
    folder = Path(folder)
    meta = read_config(folder)
    config = DapoConfig.from_dict(meta["model"])
    if image_size is not None:
        check_image_size(config.backbone.name, image_size)
        config.backbone.image_size = image_size
    if config.backbone.pretrained == BACKBONE:
        config.backbone.pretrained = str(folder / BACKBONE)
    model = DapoModel(config)
    load_learned(model, load_file(str(folder / LEARNED)), strict=strict, source=str(folder / LEARNED))
    return model, meta


def check_image_size(backbone: str, image_size: int) -> None:
    """Refuse a size that is not a whole number of patches (the patch embedding would silently
    drop the remainder, and the positional table would not fit the grid)."""
    import open_clip

    from training.backbone import _model_name

    cfg = open_clip.get_model_config(_model_name(backbone)) or {}
    patch = cfg.get("vision_cfg", {}).get("patch_size")
    if image_size <= 0:
        raise ValueError(f"image size must be positive, got {image_size}")
    if isinstance(patch, int) and image_size % patch:
        lower, upper = image_size - image_size % patch, image_size - image_size % patch + patch
        raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch} of {backbone}: "
                         f"the patch grid cannot take it; use {max(lower, patch)} or {upper}")


def load_learned(model: DapoModel, tensors: dict[str, torch.Tensor], strict: bool = True, source: str = "") -> None:
    """Copy tensors into the learned parameters, checking names and shapes."""
    params = model.learned_parameters()
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if strict and (missing or unexpected):
        raise ValueError(f"{source}: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, value in tensors.items():
            if name not in params:
                continue
            if params[name].shape != value.shape:
                raise ValueError(f"{source}: {name} has shape {tuple(value.shape)}, model expects "
                                 f"{tuple(params[name].shape)} (different backbone or prompt settings?)")
            params[name].copy_(value)
