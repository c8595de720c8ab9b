"""Whole image vs tiled: image AUROC, pixel AUROC and AUPRO on one data set, through `dapo eval`'s
own code (`training.evaluate.run_artifact`, i.e. the Detector's tiled path as served).

    python bench/tiling_eval.py --artifact ARTIFACT --data DIR [--layout synth --split train]
        [--grids 1,2,4] [--overlap 0] [--rules max,whole,tiles,mean] [--map-size 448]

Every product of the data is evaluated untiled (grid 1) and as an n x n tiled product (tile =
ceil(longest side / n) original px, `--overlap` px between tiles), for each image-score rule of
`service.runtime.tiling`. Pixel metrics are on one common `--map-size` grid for every row (maps
resized bilinearly, truth drawn at that size), so whole and tiled are scored on the same pixels.
Writes one JSON object (rows: grid, rule, per-product and mean metrics) to stdout.
"""
from __future__ import annotations

import argparse
import json
import math
import time

from PIL import Image

from service.runtime.artifact import Tiling
from service.runtime.detector import Detector
from training.calibrate import with_tiling
from training.commands import load_samples
from training.evaluate import metrics_for, run_artifact

KEYS = ("image_auroc", "pixel_auroc", "aupro")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifact", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--layout", default="synth")
    p.add_argument("--split", default="train")
    p.add_argument("--grids", default="1,2,4")
    p.add_argument("--overlap", type=int, default=0)
    p.add_argument("--rules", default="max,whole,tiles,mean")
    p.add_argument("--map-size", type=int, default=448)
    args = p.parse_args()

    samples = load_samples(args.layout, args.data, args.split)
    with Image.open(samples[0].image) as im:
        side = max(im.size)
    base = Detector.load(args.artifact)
    products = sorted({s.product for s in samples})
    rows = []
    for n in (int(v) for v in args.grids.split(",")):
        for rule in args.rules.split(",") if n > 1 else ["-"]:
            detector = base if n == 1 else with_tiling(
                base, products, Tiling(tile=math.ceil(side / n) + (args.overlap if n > 1 else 0),
                                       overlap=args.overlap, image_score=rule))
            t0 = time.perf_counter()
            collected = run_artifact(detector, samples, map_size=args.map_size, progress=False)
            per = {prod: metrics_for(c, detector.class_names) for prod, c in sorted(collected.items())}
            mean = {k: round(sum(r[k] for r in per.values()) / len(per), 4) for k in KEYS}
            rows.append({"grid": f"{n}x{n}", "rule": rule, "mean": mean, "seconds": round(time.perf_counter() - t0, 1),
                         "per_product": {prod: {k: round(r[k], 4) for k in KEYS} for prod, r in per.items()}})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"artifact": args.artifact, "data": args.data, "images": len(samples), "side": side,
                      "map_size": args.map_size, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
