"""A diagnostic beside bench/texture_check.py: the references issue's own recipe on the *frozen*
DINOv2 tower (no DAPO prompts), on the same crops, so the served figures can be read against it.

    python bench/frozen_recipe.py --dinov2 runs/pretrained_demo/dinov2 --work runs/texture_check

Per texture: patches of blocks 6 and 9 (each L2-normalised, concatenated, normalised) from the
2 x 2 tiles of each crop, each tile resized to 224; the whole crop's class token (after ln_post)
at 224; nearest-neighbour distances to the 16 references' features; each branch z-scored on the
references leave-one-out; fused by max. Image AUROC per branch and fused, good vs local and good
vs global. Preprocessing is the artifact's (the model config's mean and std). Not a product path.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score

from training.backbone import BackboneSpec, create_clip
from training.visual import embed_patches

SIZE = 224
BLOCKS = (6, 9)


def tensor(img: Image.Image, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    a = np.asarray(img.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC), np.float32) / 255
    return (torch.from_numpy(a).permute(2, 0, 1)[None] - mean) / std


@torch.no_grad()
def features(visual, img: Image.Image, mean, std) -> tuple[np.ndarray, np.ndarray]:
    """(class token of the whole image, patches of its 2 x 2 tiles)."""
    w, h = img.size
    t = w // 2
    tiles = [img.crop((x, y, x + t, y + t)) for y in (0, h - t) for x in (0, w - t)]
    x = torch.cat([tensor(img, mean, std)] + [tensor(c, mean, std) for c in tiles])
    z = embed_patches(visual, x)
    taps = {}
    for i, block in enumerate(visual.transformer.resblocks, 1):
        z = block(z)
        if i in BLOCKS:
            taps[i] = F.normalize(z[:, 1:], dim=-1)
    cls = F.normalize(visual.ln_post(z[:, 0]), dim=-1)[0]
    patches = F.normalize(torch.cat([taps[b] for b in BLOCKS], -1), dim=-1)[1:]
    return cls.numpy(), patches.reshape(-1, patches.shape[-1]).numpy()


def nearest(q: np.ndarray, bank: np.ndarray) -> np.ndarray:
    d2 = (q ** 2).sum(1)[:, None] - 2 * q @ bank.T + (bank ** 2).sum(1)[None]
    return np.sqrt(np.maximum(d2, 0)).min(1)


def branches(f, refs, leave_out: int | None = None) -> tuple[float, float]:
    bank = [r for i, r in enumerate(refs) if i != leave_out]
    g = float(nearest(f[0][None], np.stack([r[0] for r in bank]))[0])
    p = float(nearest(f[1], np.concatenate([r[1] for r in bank])).max())
    return g, p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dinov2", required=True, type=Path, help="dapo convert-dinov2's folder (json + safetensors)")
    ap.add_argument("--work", default="runs/texture_check", type=Path, help="bench/texture_check.py's --work")
    args = ap.parse_args()
    clip, _ = create_clip(BackboneSpec(name=str(args.dinov2 / "dinov2-vit-s14.json"),
                                       pretrained=str(args.dinov2 / "dinov2-vit-s14.safetensors"), image_size=SIZE))
    visual = clip.visual
    mean = torch.tensor(visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    crops = args.work / "crops"
    out = {}
    for texture in sorted(p.name for p in (crops / "test").iterdir()):
        refs = [features(visual, Image.open(p), mean, std) for p in sorted((crops / "good" / texture / "good").glob("*.png"))]
        loo = np.array([branches(r, refs, i) for i, r in enumerate(refs)])
        mu, sd = loo.mean(0), loo.std(0) + 1e-9
        scored = {k: np.array([branches(features(visual, Image.open(p), mean, std), refs)
                               for p in sorted((crops / "test" / texture / k).glob("*.png"))])
                  for k in ("good", "local", "global")}
        out[texture] = {}
        for kind in ("local", "global"):
            y = [0] * len(scored["good"]) + [1] * len(scored[kind])
            a = np.concatenate([scored["good"], scored[kind]])
            out[texture][kind] = {"class_token": round(roc_auc_score(y, a[:, 0]), 3),
                                  "patch_max": round(roc_auc_score(y, a[:, 1]), 3),
                                  "fused_max": round(roc_auc_score(y, ((a - mu) / sd).max(1)), 3)}
        print(texture, json.dumps(out[texture]), flush=True)
    mean_of = {kind: {b: round(float(np.mean([out[t][kind][b] for t in out])), 3) for b in out[next(iter(out))][kind]}
               for kind in ("local", "global")}
    print(json.dumps({"mean": mean_of}))


if __name__ == "__main__":
    main()
