"""Training speed: optimizer steps per second (forward + loss + backward + Adam) on random batches.

    python bench/train_speed.py [--configs dapo-tiny:112,ViT-B-16:224] [--batch 8] [--steps 5]

Random-weight backbones (no downloads); the same code path as `dapo train`. Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from training.backbone import BackboneSpec
from training.losses import dapo_loss
from training.model import DapoConfig, DapoModel, upsample_probs

WORDS = ["scratch", "hole", "crack", "contamination", "bent", "discoloration"]


def measure(name: str, size: int, batch: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = DapoModel(DapoConfig(backbone=BackboneSpec(name=name, pretrained=None, image_size=size)))
    model.train()
    opt = torch.optim.Adam(list(model.learned_parameters().values()), lr=1e-3, betas=(0.5, 0.999))
    pixels = torch.randn(batch, 3, size, size)
    masks = torch.randint(0, len(WORDS) + 1, (batch, size, size))
    labels = torch.randint(0, 2, (batch,))
    has_mask = torch.ones(batch, dtype=torch.bool)

    def step():
        out = model(pixels, model.text_features(WORDS))
        loss = dapo_loss(out["image_logits"], labels, upsample_probs(out["patch_probs"], size), masks, has_mask)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        step()
    dt = time.perf_counter() - t
    return {"backbone": name, "image_size": size, "batch": batch, "steps": steps,
            "steps_per_s": round(steps / dt, 3), "images_per_s": round(steps * batch / dt, 2),
            "learned_params": sum(p.numel() for p in model.learned_parameters().values()),
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="dapo-tiny:112,ViT-B-16:224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    rows = []
    for spec in args.configs.split(","):
        name, size = spec.rsplit(":", 1)
        rows.append(measure(name, int(size), args.batch, args.steps))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
