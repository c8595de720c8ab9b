"""What a product's reference bank costs per /detect: ViT-S/14 @336 with a 16-image bank.

    python bench/references_speed.py [--requests 15] [--work runs/references_speed]

Bakes a ViT-S/14-sized artifact (DINOv2-S's OpenCLIP geometry, random weights: speed does not
depend on the weights) at 336 px (24 x 24 patches), adds a 16-image bank for one product with
`dapo calibrate --references 16`'s function (default coreset limit), then times /detect through
the real app (in process), alternating per request: with references, the same request with
`references=false`, and the same artifact without any bank. Prints medians and ratios (the
issue's target: references / references=false <= 1.25). A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import time
from pathlib import Path

from fastapi.testclient import TestClient
from PIL import Image

VIT_S14 = {  # DINOv2 ViT-S/14 as an OpenCLIP config (training.convert_dinov2 writes the same)
    "embed_dim": 384, "quick_gelu": False,
    "vision_cfg": {"image_size": 336, "layers": 12, "width": 384, "head_width": 64, "mlp_ratio": 4.0,
                   "patch_size": 14, "ls_init_value": 1.0, "no_ln_pre": True, "norm_kwargs": {"eps": 1e-6}},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 384, "heads": 6, "layers": 2},
}


def build(work: Path, refs: int) -> tuple[Path, Path, Path]:
    import shutil

    from training.backbone import BackboneSpec
    from training.bake import DEMO_VOCAB, BakeOptions, bake
    from training.data import load_dataset
    from training.model import DapoConfig, DapoModel
    from training.references import ReferenceOptions, calibrate_references
    from training.synth import generate

    plain, banked = work / "plain", work / "banked"
    if not (plain / "manifest.json").is_file():
        cfg = work / "vit-s14-bench.json"
        work.mkdir(parents=True, exist_ok=True)
        cfg.write_text(json.dumps(VIT_S14))
        model = DapoModel(DapoConfig(backbone=BackboneSpec(name=str(cfg), pretrained=None, image_size=336)))
        bake(model, list(DEMO_VOCAB), plain, BakeOptions(name="vit-s14-bench", prompts="handcrafted", overwrite=True))
    data = work / "data"
    if not data.is_dir():
        generate(data, products=["wood"], defects=["scratch"], n_per_class=2, n_good=refs + 4, size=256,
                 holdout_product=None, holdout_defect=None)
    if banked.exists():
        shutil.rmtree(banked)
    shutil.copytree(plain, banked)
    good = [s for s in load_dataset("folder", str(data)) if s.label == 0]
    calibrate_references(banked, good, ReferenceOptions(refs), 0.99, 0.999, 4)
    return plain, banked, data / "wood" / "scratch"


def timed(client: TestClient, query: str, image: bytes, product: str | None) -> float:
    t0 = time.perf_counter()
    r = client.post(f"/detect?{query}", files=[("image", ("x.png", image, "image/png"))],
                    data={"product": product} if product else {})
    elapsed = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="runs/references_speed")
    ap.add_argument("--requests", type=int, default=15)
    ap.add_argument("--references", type=int, default=16)
    args = ap.parse_args()
    from service.server.app import create_app
    from service.server.settings import Settings

    plain, banked, defects = build(Path(args.work), args.references)
    buf = io.BytesIO()
    Image.open(min(defects.glob("*.png"))).convert("RGB").save(buf, "PNG")
    image = buf.getvalue()
    times: dict[str, list[float]] = {"references": [], "references=false": [], "no bank": []}
    common = {"max_batch_size": 1, "max_queue_delay_ms": 0, "log_level": "WARNING"}
    with TestClient(create_app(Settings(artifact=banked, **common), configure_logs=False)) as on, \
            TestClient(create_app(Settings(artifact=plain, **common), configure_logs=False)) as off:
        for client, q, p in ((on, "", "wood"), (on, "references=false", "wood"), (off, "", None)):
            timed(client, f"mask_format=rle&{q}", image, p)  # warm
        for _ in range(args.requests):  # interleaved, so drift in the machine's load hits all three alike
            times["references"].append(timed(on, "mask_format=rle", image, "wood"))
            times["references=false"].append(timed(on, "mask_format=rle&references=false", image, "wood"))
            times["no bank"].append(timed(off, "mask_format=rle", image, None))
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    info = json.loads((banked / "manifest.json").read_text())["products"]["wood"]["references"]
    print(json.dumps({
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "requests": args.requests,
        "bank": {"images": info["images"], "patches": info["patches"], "coreset_limit": info["coreset_limit"]},
        "median_ms": {k: round(v, 1) for k, v in med.items()},
        "ratio_references_vs_references_false": round(med["references"] / med["references=false"], 3),
        "ratio_references_vs_no_bank": round(med["references"] / med["no bank"], 3),
    }, indent=2))


if __name__ == "__main__":
    main()
