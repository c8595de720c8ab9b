"""What can a frozen random backbone tell apart at all? Linear-probe ceilings on `dapo synth` data.

DAPO learns only prompts and one linear adapter per tapped layer on top of a frozen CLIP, so
what it can reach is bounded by what is linearly readable from the frozen features. With real
CLIP weights that is a lot; with the random tiny backbones this workplace must use, it is
little, and this script measures how little, so the learning demo's figures can be read
against a ceiling instead of against hope:

- ``global``: logistic regression on the pooled, projected class token (the feature METHOD's
  image score reads), normal vs defective image;
- ``tap<i>``: logistic regression on one tapped layer's patch tokens (what its adapter sees),
  normal vs defective patch (a patch is defective when > 30 % of its pixels are).

Each probe is fitted on the training split and scored (AUROC) on it, on new images of the same
products (another seed) and on the held-out texture family.

    python bench/feature_probe.py --backbones dapo-tiny:112,dapo-tiny-wide:128 [--out runs/probe]
    python bench/feature_probe.py --backbones runs/dinov2/dinov2-vit-s14.json:112 \
        --pretrained runs/dinov2/dinov2-vit-s14.safetensors      # DINOv2 (dapo convert-dinov2)

Prints JSON. The probes are scikit-learn pipelines (standardise, then class-balanced logistic
regression with a fixed C).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from training.backbone import BackboneSpec
from training.data.common import AnomalyDataset
from training.model import DapoConfig, DapoModel
from training.synth import generate, load_split

DEFECTIVE_PATCH = 0.3  # fraction of a patch's pixels
CLEAN_PATCH = 0.05  # patches in between are left out of the fit (ambiguous edges)


@torch.no_grad()
def features(model: DapoModel, samples, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """Global features (N, D), tapped patch tokens (L, N, g*g, W), patch defect fractions
    (N, g*g) and image labels (N,) for a list of samples."""
    grid = model.geometry["grid"]
    taps: list[torch.Tensor] = []
    hooks = [a.register_forward_hook(lambda _m, inp, _o: taps.append(inp[0])) for a in model.visual_prompts.adapters]
    mean, std = model.normalisation
    ds = AnomalyDataset(samples, size=size, mean=mean, std=std)
    glob, patches, frac, labels = [], [], [], []
    try:
        for start in range(0, len(ds), 32):
            items = [ds[j] for j in range(start, min(start + 32, len(ds)))]
            pixels = torch.stack([it[0] for it in items])
            masks = torch.stack([torch.as_tensor(it[1]) for it in items])
            taps.clear()
            g, _ = model.encode_image(pixels)
            glob.append(g)
            patches.append(torch.stack(taps))
            defect = (masks > 0).float()[:, None]  # IGNORE_INDEX is negative
            frac.append(F.adaptive_avg_pool2d(defect, grid).flatten(1))
            labels += [int(it[2]) for it in items]
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(glob), torch.cat(patches, 1), torch.cat(frac), np.asarray(labels)


def _fit(x: np.ndarray, y: np.ndarray) -> Pipeline:
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, C=0.1, class_weight="balanced")).fit(x, y)


def probe(name: str, size: int, sets: dict[str, list], pretrained: str | None = None) -> dict:
    torch.manual_seed(0)
    spec = BackboneSpec(name=name, pretrained=pretrained, image_size=size, seed=0)
    model = DapoModel(DapoConfig(backbone=spec)).eval()
    data = {k: features(model, v, size) for k, v in sets.items()}
    g_tr, p_tr, f_tr, y_tr = data["train"]
    out: dict = {"backbone": name, "pretrained": pretrained, "image_size": size, "width": model.geometry["width"],
                 "grid": model.geometry["grid"], "taps": list(model.config.taps)}
    clf = _fit(g_tr.numpy(), y_tr)
    out["global"] = {k: round(float(roc_auc_score(d[3], clf.decision_function(d[0].numpy()))), 3) for k, d in data.items()}
    frac = f_tr.reshape(-1).numpy()
    keep = (frac < CLEAN_PATCH) | (frac > DEFECTIVE_PATCH)
    for i, tap in enumerate(model.config.taps):
        x = p_tr[i].reshape(-1, p_tr.shape[-1]).numpy()
        clf = _fit(x[keep], frac[keep] > DEFECTIVE_PATCH)
        out[f"tap{tap}"] = {
            k: round(float(roc_auc_score(d[2].reshape(-1).numpy() > DEFECTIVE_PATCH,
                                         clf.decision_function(d[1][i].reshape(-1, d[1].shape[-1]).numpy()))), 3)
            for k, d in data.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbones", default="dapo-tiny:112,dapo-tiny-wide:128", help="name:size,...")
    ap.add_argument("--out", default="runs/feature_probe", help="where the synthetic data is written")
    ap.add_argument("--pretrained", default="", help="weights file for every listed backbone ('' = random init)")
    ap.add_argument("--n-per-class", type=int, default=10)
    ap.add_argument("--holdout-texture", default="fabric", help="as in bench/learning_demo.py")
    args = ap.parse_args()
    out = Path(args.out)
    for sub, seed, n in (("synth_train", 0, args.n_per_class), ("synth_heldout", 1, 4)):
        generate(out / sub, seed=seed, n_per_class=n, overwrite=True, holdout_product=args.holdout_texture)
    sets = {"train": load_split(out / "synth_train", "train"),
            "heldout_images": load_split(out / "synth_heldout", "train"),
            "shift_texture": load_split(out / "synth_train", "test_shift")}
    results = []
    for spec in args.backbones.split(","):
        name, _, size = spec.partition(":")
        results.append(probe(name, int(size or 128), sets, args.pretrained or None))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
