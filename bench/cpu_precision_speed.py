"""Encoder ms per image at batch 1 for ORT fp32 / int8 and OpenVINO fp32 / int8, interleaved
(round robin, one run of each in turn), so load from other processes on a shared CPU hits every
configuration alike; prints medians and ratios to ORT fp32.

    python bench/cpu_precision_speed.py ARTIFACT ROUNDS

The artifact must carry both INT8 encoders (`dapo quantize ... --keep-ort always`)."""
import json
import statistics
import sys
import time

import numpy as np

from service.runtime.detector import Detector, RuntimeOptions

art = sys.argv[1]; rounds = int(sys.argv[2])
cfg = [("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("openvino", "fp32"), ("openvino", "int8")]
dets = {c: Detector.load(art, RuntimeOptions(backend=c[0], precision=c[1], verify=False, threads=2)) for c in cfg}
m = next(iter(dets.values())).manifest
x = np.random.default_rng(1).standard_normal((1, 3, m.image_size, m.image_size), dtype=np.float32)
al = np.ones((1, len(m.vocabulary)), bool)
for d in dets.values(): d.infer(x, al)
t = {c: [] for c in cfg}
for _ in range(rounds):
    for c, d in dets.items():
        s = time.perf_counter(); d.infer(x, al); t[c].append(time.perf_counter() - s)
med = {c: statistics.median(v) * 1000 for c, v in t.items()}
base = med[("onnxruntime", "fp32")]
print(json.dumps({f"{b} {p}": {"median_ms": round(v, 1), "x_ort_fp32": round(base / v, 3)} for (b, p), v in med.items()}, indent=1))
