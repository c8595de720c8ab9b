"""Does a CPU precision change what the line sees? Paper metrics and map differences per
(backend, precision) against ONNX Runtime fp32, on the held-out splits of a `dapo synth` set.

    python bench/cpu_precision_accuracy.py --artifact A --data SYNTH [--splits test_shift,test_zeroshot]

For each configuration the artifact can run (ORT fp32, OpenVINO fp32, OpenVINO int8, ORT int8
where it was kept, OpenVINO bf16 where the CPU has it): image AUROC and pixel AUROC (mean over
products, `dapo eval`'s numbers) and their difference from ORT fp32 (the bar: 0.005), and over
every image of the splits the anomaly map's max abs difference and the fraction of type-map
pixels that flip. Prints JSON.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
from PIL import Image

from service.runtime.detector import Detector, RuntimeOptions
from service.runtime.precision import cpu_isa
from training.evaluate import evaluate
from training.synth import load_split

CONFIGS = [("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8"),
           ("onnxruntime", "int8")]
AUROC_BAR = 0.005


def map_outputs(detector: Detector, samples) -> tuple[np.ndarray, np.ndarray]:
    """(anomaly maps, type maps) of every sample, each product's defect list applied."""
    maps, types = [], []
    for s in samples:
        x = detector.prepare(Image.open(s.image)).pixel_values[None]
        policy = detector.policy(s.product if s.product in detector.manifest.products else None)
        out = detector.infer(x, policy.allowed[None])
        maps.append(out.anomaly_map[0])
        types.append(out.type_map[0])
    return np.stack(maps), np.stack(types)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--artifact", required=True)
    p.add_argument("--data", required=True, help="a `dapo synth` folder")
    p.add_argument("--splits", default="test_shift,test_zeroshot")
    args = p.parse_args()
    samples = [s for split in args.splits.split(",") for s in load_split(args.data, split)]
    rows, ref = [], None
    for backend, precision in CONFIGS:
        try:
            detector = Detector.load(args.artifact, RuntimeOptions(backend=backend, precision=precision))
        except Exception as e:  # noqa: BLE001 - not in the artifact / not on this CPU: say why
            rows.append({"backend": backend, "precision": precision, "skipped": str(e)[:200]})
            continue
        metrics = evaluate(args.artifact, samples, backend=backend, precision=precision, progress=False)["mean"]
        maps, types = map_outputs(detector, samples)
        row = {"backend": backend, "precision": precision, "image_auroc": round(metrics["image_auroc"], 4),
               "pixel_auroc": round(metrics["pixel_auroc"], 4)}
        if ref is None:
            ref = (row, maps, types)
        else:
            r, rmaps, rtypes = ref
            row |= {"d_image_auroc": round(row["image_auroc"] - r["image_auroc"], 4),
                    "d_pixel_auroc": round(row["pixel_auroc"] - r["pixel_auroc"], 4),
                    "anomaly_map_max_abs_diff": float(f"{np.abs(maps - rmaps).max():.3g}"),
                    "type_map_flip_fraction": float(f"{np.mean(types != rtypes):.3g}")}
            row["within_bar"] = abs(row["d_image_auroc"]) <= AUROC_BAR and abs(row["d_pixel_auroc"]) <= AUROC_BAR
        rows.append(row)
    print(json.dumps({"isa": cpu_isa(), "artifact": args.artifact, "images": len(samples), "splits": args.splits,
                      "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
