"""Encoder ms per image for every CPU backend and precision an artifact carries, timed **in
turns** (one call of each configuration per round, `precision.interleaved_median_ms`), so a load
from other processes on a shared CPU weighs on every configuration alike; prints the CPU's ISA,
medians and ratios to ONNX Runtime fp32, per batch size, and what `DAPO_PRECISION=auto` picked
for each backend (auto's own measurement at load, and its speed in the same rounds).

    python bench/cpu_precision_speed.py --artifact A --rounds 12 --batch-sizes 1,8 [--json OUT]

The artifact should carry both INT8 encoders (`dapo quantize ... --keep-ort always`); a precision
the artifact or the CPU lacks is listed with the reason instead of a time."""
from __future__ import annotations

import argparse
import json

import numpy as np

from service.runtime.detector import Detector, RuntimeOptions
from service.runtime.precision import cpu_isa, interleaved_median_ms

CONFIGS = [("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("openvino", "fp32"), ("openvino", "bf16"),
           ("openvino", "int8"), ("onnxruntime", "auto"), ("openvino", "auto")]


class Encoder:
    """A loaded configuration as `interleaved_median_ms` calls it."""

    def __init__(self, detector: Detector):
        self.detector = detector

    def run(self, x: np.ndarray, allowed: np.ndarray):
        return self.detector.infer(x, allowed)


def load(artifact: str, threads: int) -> tuple[dict, dict]:
    """({name: Encoder}, {name: why it is not there})."""
    loaded, refused = {}, {}
    for backend, precision in CONFIGS:
        name = f"{backend} {precision}"
        try:
            loaded[name] = Encoder(Detector.load(artifact, RuntimeOptions(backend=backend, precision=precision,
                                                                          threads=threads)))
        except Exception as e:  # noqa: BLE001 - reported in the table, the others still run
            refused[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return loaded, refused


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
    loaded, refused = load(args.artifact, args.threads)
    manifest = next(iter(loaded.values())).detector.manifest
    s, c = manifest.image_size, len(manifest.vocabulary)
    result = {"isa": cpu_isa(), "artifact": args.artifact, "rounds": args.rounds, "refused": refused, "auto": {},
              "batches": {}}
    for name, enc in loaded.items():
        if name.endswith("auto"):
            choice = getattr(enc.detector.backend, "precision_choice", None)
            result["auto"][name] = choice.to_dict() if choice is not None else None
    for b in [int(v) for v in args.batch_sizes.split(",")]:
        x = np.random.default_rng(1).standard_normal((b, 3, s, s), dtype=np.float32)
        ms = interleaved_median_ms(loaded, x, np.ones((b, c), bool), warm=1, runs=args.rounds)
        base = ms["onnxruntime fp32"]
        result["batches"][b] = {n: {"ms_per_image": round(v / b, 2), "x_ort_fp32": round(base / v, 3)}
                                for n, v in ms.items()}
    print(f"ISA: {result['isa']}")
    for name, choice in result["auto"].items():
        print(f"{name}: picked {choice and choice.get('precision')} (measured at load: {choice and choice.get('ms_per_image')})")
    print("| configuration | " + " | ".join(f"batch {b}: ms/img | x ORT fp32" for b in result["batches"]) + " |")
    for name in [f"{b} {p}" for b, p in CONFIGS]:
        cells = (" | ".join(f"{r[name]['ms_per_image']} | {r[name]['x_ort_fp32']}" for r in result["batches"].values())
                 if name in loaded else f"n/a: {refused.get(name)}")
        print(f"| {name} | {cells} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
