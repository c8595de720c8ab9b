"""Checkpoints: learned parameters as safetensors + config JSON; never pickle.

A checkpoint folder holds
    learned.safetensors   the prompts and adapters (DapoModel.learned_parameters)
    config.json           DapoConfig, the training vocabulary, epoch and free-form metadata
    backbone.safetensors  only for randomly initialised backbones (demo/tests): the frozen
                          weights themselves, so bake rebuilds exactly the CLIP that was trained

`import_authors` maps a `.pth` written by the authors' training script (state dicts of the
prompt learner, the visual prompt and the adapter) onto our names. It loads with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.
"""
from __future__ import annotations

import json
import re
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


def load_checkpoint(folder: str | Path, strict: bool = True) -> tuple[DapoModel, dict]:
    """Rebuild the model (backbone from its spec) and load the learned parameters."""
    folder = Path(folder)
    meta = read_config(folder)
    config = DapoConfig.from_dict(meta["model"])
    if config.backbone.pretrained == BACKBONE:
        config.backbone.pretrained = str(folder / BACKBONE)
    model = DapoModel(config)
    load_learned(model, load_file(str(folder / LEARNED)), strict=strict, source=str(folder / LEARNED))
    return model, meta


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


# The authors' format as we read it from the paper and its description: three state dicts.
# Each rule maps (section, key regex) onto (our name, how to index/reshape). Layer indices are
# 0-based in both. Adjust this table, not the code, if a release names things differently.
AUTHOR_RULES: list[tuple[str, str, str]] = [
    ("prompt_learner", r"^ctx_(?:pos|normal)$", "text_prompts.ctx_normal"),
    ("prompt_learner", r"^ctx_(?:neg|abnormal)$", "text_prompts.ctx_abnormal"),
    ("prompt_learner", r"^(?:compound_prompts_text|deep_text)\.(\d+)$", "text_prompts.deep[{0}]"),
    ("visual_prompt", r"^(?:prompt_embeddings|deep_prompts|prompts)\.(\d+)$", "visual_prompts.tokens[{0}]"),
    ("adapter", r"^(?:adapters?\.)?(\d+)\.(weight|bias)$", "visual_prompts.adapters.{0}.{1}"),
]


def _authors_tensors(raw: dict) -> dict[str, torch.Tensor]:
    """Flatten the authors' three state dicts into our names (per-layer rows still separate)."""
    out: dict[str, torch.Tensor] = {}
    for section in ("prompt_learner", "visual_prompt", "adapter"):
        if section not in raw:
            raise ValueError(f"authors' checkpoint lacks the {section!r} state dict; has {sorted(raw)}")
        for key, value in raw[section].items():
            for sec, pattern, target in AUTHOR_RULES:
                m = re.match(pattern, key) if sec == section else None
                if m:
                    out[target.format(*m.groups())] = value
                    break
            else:
                raise ValueError(f"authors' checkpoint: no mapping for {section}.{key}")
    return out


def import_authors(path: str | Path, config: DapoConfig) -> DapoModel:
    """Build a DapoModel (text_mode 'reference' by default) from the authors' .pth file."""
    raw = torch.load(str(path), map_location="cpu", weights_only=True)
    flat = _authors_tensors(raw)
    model = DapoModel(config)
    tensors: dict[str, torch.Tensor] = {}
    stacked: dict[str, dict[int, torch.Tensor]] = {}
    for name, value in flat.items():
        m = re.match(r"^(.*)\[(\d+)\]$", name)
        if m:
            stacked.setdefault(m.group(1), {})[int(m.group(2))] = value
        else:
            tensors[name] = value
    params = model.learned_parameters()
    for name, rows in stacked.items():
        depth = params[name].shape[0]
        if sorted(rows) != list(range(depth)):
            raise ValueError(f"{path}: {name} has layers {sorted(rows)}, model has {depth}")
        tensors[name] = torch.stack([rows[i] for i in range(depth)])
    for name in ("text_prompts.ctx_normal", "text_prompts.ctx_abnormal"):
        if name in tensors:  # (E, 1, n, w) in some exports -> (E, n, w)
            tensors[name] = tensors[name].reshape(params[name].shape) \
                if tensors[name].numel() == params[name].numel() else tensors[name]
    load_learned(model, tensors, strict=True, source=str(path))
    return model
