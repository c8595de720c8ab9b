"""Does training learn? Tiny random-weight backbone, synthetic defects, a few CPU minutes.

The default backbone is `dapo-tiny-wide` (random OpenCLIP ViT, width 256, patch 8, 128 px);
`bench/feature_probe.py` shows why: what a frozen random backbone makes linearly readable grows
with its width, and the narrow test config leaves DAPO's per-layer linear adapters little.

Trains DAPO prompts/adapters on `dapo synth` data, bakes the untrained (epoch 0) and the
trained model with the same frozen backbone, and evaluates both through the serving code on
three held-out sets: new images of the training textures/defects (another seed), the held-out
texture family (distribution shift) and the held-out defect word (zero-shot: it is added to
the vocabulary at bake time only).

    python bench/learning_demo.py --out runs/learning_demo [--epochs 3] [--image-size 128]

Prints one JSON object with every figure. The default backbone is random: absolute numbers say
nothing about CLIP; the point is trained vs untrained on the same backbone.

On pretrained features (DINOv2 ViT-S/14 converted by `dapo convert-dinov2`, issue #14):

    python bench/learning_demo.py --out runs/ld_dinov2 --backbone runs/dinov2/dinov2-vit-s14.json \
        --pretrained runs/dinov2/dinov2-vit-s14.safetensors --image-size 112 --epochs 3

`--eval-only` re-evaluates the checkpoints a previous run left under --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from training.backbone import TINY_WIDE, BackboneSpec
from training.bake import BakeOptions, bake
from training.checkpoint import load_checkpoint, save_checkpoint
from training.data import Vocabulary, with_vocabulary
from training.evaluate import evaluate
from training.model import DapoConfig, DapoModel
from training.synth import generate, load_split
from training.train import TrainConfig, train

KEYS = ("image_auroc", "image_ap", "pixel_auroc", "aupro", "mt_auroc")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/learning_demo")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--n-per-class", type=int, default=10)
    ap.add_argument("--backbone", default=TINY_WIDE, help="OpenCLIP config name or config JSON path")
    ap.add_argument("--pretrained", default="", help="weights file or OpenCLIP tag ('' = random init)")
    ap.add_argument("--eval-only", action="store_true", help="reuse the checkpoints of a previous run under --out")
    ap.add_argument("--holdout-texture", default="fabric",
                    help="texture family kept out of training (the distribution-shift set)")
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.perf_counter()
    info = generate(out / "synth_train", seed=0, n_per_class=args.n_per_class, overwrite=True,
                    holdout_product=args.holdout_texture)
    generate(out / "synth_heldout", seed=1, n_per_class=4, overwrite=True, holdout_product=args.holdout_texture)
    all_words = info["defects"]  # includes the held-out word (crack)
    train_samples = load_split(out / "synth_train", "train")
    train_words = sorted({s.defect for s in train_samples if s.defect})
    vocab = Vocabulary(train_words)
    spec = BackboneSpec(name=args.backbone, pretrained=args.pretrained or None, image_size=args.image_size, seed=0)
    model_cfg = DapoConfig(backbone=spec)
    cfg = TrainConfig(out=str(out / "run"), epochs=args.epochs, model=model_cfg)

    if args.eval_only:
        untrained, last = out / "untrained", out / "run" / "last"
        train_s = sum(h["seconds"] for h in json.loads((last / "config.json").read_text())["history"])
    else:
        untrained = save_checkpoint(DapoModel(DapoConfig.from_dict(model_cfg.to_dict())), out / "untrained",
                                    vocabulary=train_words)
        t1 = time.perf_counter()
        last = train(with_vocabulary(train_samples, vocab), vocab, cfg, progress=False)
        train_s = time.perf_counter() - t1

    sets = {
        "heldout_images": [s for s in load_split(out / "synth_heldout", "train")],
        "shift_texture": load_split(out / "synth_train", "test_shift"),
        "zeroshot_word": load_split(out / "synth_train", "test_zeroshot"),
    }
    report = {"train_images": len(train_samples), "train_words": train_words, "heldout_word": info["holdout_defect"],
              "heldout_texture": info["holdout_product"], "epochs": args.epochs, "image_size": args.image_size, "backbone": args.backbone,
              "pretrained": args.pretrained or None,
              "train_seconds": round(train_s, 1), "steps_per_second": None, "results": {}}
    meta = json.loads((Path(last) / "config.json").read_text())
    steps = sum(1 for _ in range(0, len(train_samples), cfg.batch_size)) * args.epochs
    report["steps_per_second"] = round(steps / train_s, 2)
    report["loss_by_epoch"] = [round(h["loss"], 3) for h in meta["history"]]
    for name, ckpt in (("untrained", untrained), ("trained", last)):
        model, _ = load_checkpoint(ckpt)
        art = bake(model, all_words, out / f"artifact_{name}", BakeOptions(name=name, overwrite=True)).folder
        for set_name, samples in sets.items():
            res = evaluate(art, samples, progress=False, use_products=False)
            fused = evaluate(art, samples, progress=False, use_products=False, image_score="global_max")
            report["results"].setdefault(set_name, {})[name] = {k: round(res["mean"][k], 4) for k in KEYS} | {
                "image_auroc_global_max": round(fused["mean"]["image_auroc"], 4)}
            if set_name == "heldout_images":  # where a random backbone is blind shows per product
                report["results"][set_name][name]["pixel_auroc_per_product"] = {
                    p: round(m["pixel_auroc"], 3) for p, m in res["per_product"].items()}
            if set_name == "zeroshot_word":
                report["results"][set_name][name]["crack_pixel_ap"] = round(res["per_type"].get("crack", {}).get("ap", float("nan")), 4)
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
