"""The reference search alone, per provider: ms per image for a bank of a given size.

    python bench/references_search.py --grid 37 --dim 2048 --bank 2304 --providers TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider

Runs `service.runtime.references.OrtSearch` (the second ONNX graph, on each requested ONNX
Runtime provider that this build has) and `TorchSearch` (on cuda when available, else cpu) on
random unit features of the artifact's geometry (ViT-L/14 @518: grid 37, two taps of width 1024
-> dim 2048). Prints JSON; bench/gpu_check.sh runs it on the GPU node.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def unit(rng, *shape) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def per_call_ms(fn, args, seconds: float) -> float:
    fn(*args)  # warm (engine build, allocations)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(*args)
        n += 1
    return (time.perf_counter() - t0) / n * 1000


def main() -> None:
    import onnxruntime as ort
    import torch

    from service.runtime.backends.torch_backend import TorchSearch
    from service.runtime.references import OrtSearch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", type=int, default=37)
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--global-dim", type=int, default=768)
    ap.add_argument("--bank", type=int, default=2304)
    ap.add_argument("--images", type=int, default=16, help="global features in the bank")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--providers", default="CUDAExecutionProvider,CPUExecutionProvider")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    size = args.grid * args.patch
    feeds = (unit(rng, args.batch, args.grid ** 2, args.dim), unit(rng, args.bank, args.dim),
             unit(rng, args.batch, args.global_dim), unit(rng, args.images, args.global_dim))
    out = {"grid": args.grid, "dim": args.dim, "bank": args.bank, "batch": args.batch, "ms_per_call": {}}
    for provider in [p for p in args.providers.split(",") if p in ort.get_available_providers()]:
        search = OrtSearch(list(dict.fromkeys([provider, "CPUExecutionProvider"])), args.grid, size)
        out["ms_per_call"][f"onnxruntime:{search.provider}"] = round(per_call_ms(search, feeds, args.seconds), 3)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out["ms_per_call"][f"torch:{device}"] = round(per_call_ms(TorchSearch(device, args.grid, size), feeds,
                                                              args.seconds), 3)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
