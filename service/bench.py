"""`dapo bench`: speed figures for an artifact, printed as JSON (benchmarks, never tests).

- ``encoder``: the bare backend (ONNX Runtime fp32 / fp16 / int8, OpenVINO fp32 / bf16 / int8,
  torch fp32 / fp16 / bf16, and `auto`) swept over batch sizes: images/s, per-batch latency
  p50/p95/p99, peak GPU memory where there is a GPU, and the ratio to ONNX Runtime fp32 at the
  same batch (`x_ort_fp32`); `--interleave ROUNDS` loads every configuration first and times
  them in turns (medians), which a shared CPU needs for precision ratios. ONNX Runtime fp16 runs encoder_fp16.onnx (`dapo bake --fp16`), int8
  encoder_int8_ort.onnx and OpenVINO int8 encoder_int8.xml (`dapo quantize`); a precision the
  artifact or the CPU lacks gives a row with `skipped` and the reason. The CPU's ISA is printed.
- ``e2e``: POST /detect on a real server process (uvicorn, default settings) against the bare
  ONNX encoder on the same images in the same run, one image at a time: the ratio is what the
  service costs on top of the model (decode, preprocess, batching, postprocess, JSON, HTTP).
- ``load``: images/s end to end with concurrent clients (what a GPU node should be judged by).
- ``cpu-path``: the service's CPU cost per image at 0.3, 5 and 20 MP per mask format, with and
  without heatmap + overlay, against a plain full decode + resize (see `service.bench_cpu_path`).

Absolute times on a shared CPU are noisy; ratios measured in one run are what to compare.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from service.runtime.artifact import ArtifactError, load_manifest, read_manifest
from service.runtime.backends.base import Backend
from service.runtime.detector import Detector, RuntimeOptions
from service.runtime.precision import cpu_isa
from service.server.local_server import Server


def percentiles(values_s: list[float]) -> dict[str, float]:
    a = np.asarray(values_s) * 1000.0
    return {f"p{q}_ms": round(float(np.percentile(a, q)), 2) for q in (50, 95, 99)}


def test_images(n: int, width: int, height: int, seed: int = 0, fmt: str = "PNG") -> list[bytes]:
    """Textured images with a drawn mark (deterministic): realistic entropy for decode/encode."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.integers(90, 160, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((width, height), Image.Resampling.BICUBIC)
        arr = np.asarray(img).copy()
        y, x = rng.integers(0, height - 20), rng.integers(0, width - 60)
        arr[y:y + 3, x:x + 60] = 20
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        out.append(buf.getvalue())
    return out


def _gpu_mem_mb() -> float | None:
    try:
        import torch

        if torch.cuda.is_available():
            return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    except ImportError:
        pass
    return None


def bench_encoder(artifact: Path, backends: list[str], precisions: list[str], batch_sizes: list[int],
                  seconds: float = 3.0, providers: list[str] | None = None, threads: int | None = None) -> list[dict]:
    """Throughput and latency per (backend, precision, batch); reduced precisions also report how
    far their outputs are from ONNX Runtime fp32 on the same input (when that ran first: list
    onnxruntime first in `backends`). ONNX Runtime runs fp32 and fp16 (the artifact's
    encoder_fp16.onnx; skipped with a note on stderr if it has none), never bf16."""
    manifest = load_manifest(artifact)
    s, c = manifest.image_size, len(manifest.vocabulary)
    reference: dict[int, object] = {}
    ort_fp32: dict[int, float] = {}
    rows: list[dict] = [{"cpu_isa": cpu_isa()}]
    for backend in backends:
        for precision in _precisions_for(backend, precisions, manifest):
            try:
                detector = Detector.load(artifact, RuntimeOptions(  # files verified once, above
                    backend=backend, providers=tuple(providers) if providers else None, precision=precision,
                    verify=False, threads=threads))
            except (ArtifactError, RuntimeError, ValueError, ImportError) as e:  # not baked / not on this CPU
                rows.append({"backend": backend, "precision": precision, "skipped": str(e)})
                continue
            picked = getattr(detector.backend, "precision_choice", None)
            for b in batch_sizes:
                x = np.random.default_rng(b).standard_normal((b, 3, s, s), dtype=np.float32)
                allowed = np.ones((b, c), bool)
                out = detector.infer(x, allowed)  # warm-up (graph optimisation, cuDNN/TensorRT autotune)
                if backend == "onnxruntime" and precision == "fp32":
                    reference.setdefault(b, out)
                times = []
                start = time.perf_counter()
                while time.perf_counter() - start < seconds or len(times) < 3:
                    t = time.perf_counter()
                    detector.infer(x, allowed)
                    times.append(time.perf_counter() - t)
                row = {"backend": backend, "provider": detector.backend.provider, "precision": precision, "batch": b,
                       "img_per_s": round(b * len(times) / sum(times), 2), **percentiles(times),
                       "gpu_mem_mb": _gpu_mem_mb()}
                if picked is not None:
                    row["auto_picked"] = picked.precision
                    row["auto_ms_per_image_batch1"] = picked.ms_per_image
                if backend == "onnxruntime" and precision == "fp32":
                    ort_fp32[b] = row["img_per_s"]
                if b in ort_fp32:
                    row["x_ort_fp32"] = round(row["img_per_s"] / ort_fp32[b], 3)
                ref = reference.get(b)
                if ref is not None and ref is not out:
                    row["max_abs_diff_vs_ort_fp32"] = {
                        n: float(f"{np.abs(getattr(ref, n) - getattr(out, n)).max():.3g}")
                        for n in ("anomaly_score", "type_scores", "anomaly_map")}
                    row["type_map_flips_vs_ort_fp32"] = float(f"{np.mean(ref.type_map != out.type_map):.3g}")
                rows.append(row)
    return rows


def bench_encoder_interleaved(artifact: Path, backends: list[str], precisions: list[str], batch_sizes: list[int],
                              rounds: int, providers: list[str] | None = None, threads: int | None = None
                              ) -> list[dict]:
    """Every (backend, precision) loaded first, then timed **in turns** per batch size (one call
    of each per round, `rounds` rounds, medians): a load that changes during the run (another
    process on a shared CPU) weighs on every configuration alike, where the sequential sweep
    lets it decide the ratios. Rows: ms per image, ratio to ONNX Runtime fp32, what auto picked."""
    from service.runtime.precision import interleaved_median_ms

    manifest = load_manifest(artifact)  # files verified once; the loads below skip it
    loaded: dict[str, Backend] = {}  # the bare encoders, as interleaved_median_ms calls them
    rows: list[dict] = [{"cpu_isa": cpu_isa(), "interleaved_rounds": rounds}]
    for backend in backends:
        for precision in _precisions_for(backend, precisions, manifest):
            try:
                loaded[f"{backend}:{precision}"] = Detector.load(artifact, RuntimeOptions(
                    backend=backend, providers=tuple(providers) if providers else None, precision=precision,
                    verify=False, threads=threads)).backend
            except (ArtifactError, RuntimeError, ValueError, ImportError) as e:
                rows.append({"backend": backend, "precision": precision, "skipped": str(e)})
    s, c = manifest.image_size, len(manifest.vocabulary)
    for b in batch_sizes:
        x = np.random.default_rng(b).standard_normal((b, 3, s, s), dtype=np.float32)
        ms = interleaved_median_ms(loaded, x, np.ones((b, c), bool), warm=1, runs=rounds) if loaded else {}
        base = ms.get("onnxruntime:fp32")
        for name, t in ms.items():
            backend, precision = name.split(":")
            row = {"backend": backend, "provider": loaded[name].provider, "precision": precision,
                   "batch": b, "ms_per_image": round(t / b, 2), "img_per_s": round(1000.0 * b / t, 2)}
            if base is not None:
                row["x_ort_fp32"] = round(base / t, 3)
            picked = getattr(loaded[name], "precision_choice", None)
            if picked is not None:
                row["auto_picked"] = picked.precision
                row["auto_ms_per_image_batch1"] = picked.ms_per_image
            rows.append(row)
    return rows


def _precisions_for(backend: str, precisions: list[str], manifest) -> list[str]:
    """What this backend runs of the requested precisions: torch and OpenVINO all of them (a row
    says why one is skipped); ONNX Runtime always fp32 (the reference the others are compared
    with), then fp16 if requested and baked, then int8 and auto if requested."""
    if backend != "onnxruntime":
        return list(precisions)
    extra = [p for p in ("int8", "auto") if p in precisions]
    if "fp16" not in precisions:
        return ["fp32", *extra]
    if manifest.onnx_file("fp16") is None:
        print("dapo bench: onnxruntime fp16 skipped: the artifact has no encoder_fp16.onnx (bake it with --fp16)",
              file=sys.stderr)
        return ["fp32", *extra]
    return ["fp32", "fp16", *extra]


def bench_e2e(artifact: Path, n_images: int = 16, width: int = 640, height: int = 480, rounds: int = 3,
              mask_format: str = "rle", fmt: str = "JPEG", server_env: dict[str, str] | None = None) -> dict:
    """Sequential single-image /detect vs the bare ONNX encoder at batch 1, interleaved per image."""
    import httpx

    images = test_images(n_images, width, height, fmt=fmt)
    mime = f"image/{fmt.lower()}"
    env = server_env or {}
    # the bare encoder is the same backend the server runs (DAPO_BACKEND / DAPO_PRECISION)
    detector = Detector.load(artifact, RuntimeOptions(backend=env.get("DAPO_BACKEND", "onnxruntime"),
                                                      precision=env.get("DAPO_PRECISION", "fp32")))
    manifest = detector.manifest
    pixels = [detector.prepare(Image.open(io.BytesIO(b))).pixel_values[None] for b in images]
    allowed = np.ones((1, len(manifest.vocabulary)), bool)
    detector.infer(pixels[0], allowed)
    enc_times: list[float] = []
    e2e_times: list[float] = []
    with Server(artifact, env) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        for data in images[:2]:  # warm the server's path
            client.post("/detect", files={"image": ("warm", data, mime)}).raise_for_status()
        for _ in range(rounds):  # each image: encoder then /detect, so drift hits both alike
            for x, data in zip(pixels, images):
                t = time.perf_counter()
                detector.infer(x, allowed)
                enc_times.append(time.perf_counter() - t)
                t = time.perf_counter()
                r = client.post("/detect", params={"mask_format": mask_format},
                                files={"image": ("part", data, mime)})
                e2e_times.append(time.perf_counter() - t)
                r.raise_for_status()
    enc, e2e = sum(enc_times), sum(e2e_times)
    return {"artifact": str(artifact), "image_size": manifest.image_size, "backbone": manifest.backbone.name,
            "upload": f"{width}x{height} {fmt}", "requests": len(e2e_times), "mask_format": mask_format,
            "encoder_ms_per_image": round(1000 * enc / len(enc_times), 2),
            "detect_ms_per_image": round(1000 * e2e / len(e2e_times), 2),
            "ratio_detect_over_encoder": round(e2e / enc, 3),
            "ratio_median_of_pairs": round(float(np.median(np.array(e2e_times) / np.array(enc_times))), 3),
            "encoder": percentiles(enc_times), "detect": percentiles(e2e_times)}


def bench_load(artifact: Path, concurrency: int = 16, requests: int = 200, width: int = 640,
               height: int = 480, server_env: dict[str, str] | None = None, product: str | None = None) -> dict:
    """Images/s end to end with concurrent single-image clients (micro-batching at work); with a
    tiled `product`, also the encoder inputs (tiles + the whole-image pass) per second."""
    import httpx

    images = test_images(8, width, height)
    with Server(artifact, server_env) as server, httpx.Client(base_url=server.url, timeout=300,
                                                  limits=httpx.Limits(max_connections=concurrency)) as client:
        def one(i: int) -> tuple[float, int]:
            t = time.perf_counter()
            r = client.post("/detect", files={"image": ("p.png", images[i % len(images)], "image/png")},
                            data={"product": product} if product else None)
            return time.perf_counter() - t, r.status_code

        one(0)
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(one, range(requests)))
        wall = time.perf_counter() - start
        metrics = client.get("/metrics").text
    ok = [t for t, code in results if code == 200]
    sizes = [line for line in metrics.splitlines() if line.startswith("dapo_batch_size_sum")
             or line.startswith("dapo_batch_size_count")]
    out = {"concurrency": concurrency, "requests": requests, "ok": len(ok), "img_per_s": round(len(ok) / wall, 2),
           **percentiles(ok), "batch_size_metric": sizes}
    manifest = read_manifest(artifact) if product else None
    tiling = manifest.products[product].tiling if manifest is not None and product in manifest.products else None
    if tiling is not None:
        from service.runtime.tiling import grid

        inputs = grid(width, height, tiling, manifest.image_size).inputs
        out.update({"product": product, "inputs_per_image": inputs, "inputs_per_s": round(inputs * len(ok) / wall, 2)})
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifact", required=True)
    p.add_argument("--mode", choices=["encoder", "e2e", "load", "cpu-path", "all"], default="all",
                   help="all = encoder, e2e and load (cpu-path runs on its own)")
    p.add_argument("--backends", default="onnxruntime,torch", help="comma list of onnxruntime, openvino, torch")
    p.add_argument("--precisions", default="fp32",
                   help="comma list of fp32,fp16,bf16,int8,auto; onnxruntime always runs fp32, and fp16 "
                        "(encoder_fp16.onnx, from `dapo bake --fp16`), int8 and auto when listed")
    p.add_argument("--threads", type=int, help="openvino inference threads (default: one per physical core)")
    p.add_argument("--batch-sizes", default="1,2,4,8")
    p.add_argument("--providers", help="ORT execution providers, comma list (default: best available)")
    p.add_argument("--seconds", type=float, default=3.0, help="time per encoder configuration")
    p.add_argument("--interleave", type=int, metavar="ROUNDS", help="encoder: load every configuration, then "
                   "time them in turns for ROUNDS rounds (medians; for shared CPUs and precision ratios)")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--size", default="640x480", help="uploaded image size WxH")
    p.add_argument("--format", default="JPEG", choices=["JPEG", "PNG", "BMP"], help="uploaded image format (e2e)")
    p.add_argument("--reps", type=int, default=7, help="cpu-path: repetitions per configuration (medians)")
    p.add_argument("--photos", type=Path, help="cpu-path: a folder of JPEG photos to use instead of synthetic ones")
    p.add_argument("--no-http", action="store_true", help="cpu-path: in-process stages only (no server)")
    p.add_argument("--tiles", type=int, default=4, help="cpu-path: N x N tiles of the 5 MP image vs untiled (0 = skip)")
    p.add_argument("--tiled-only", action="store_true", help="cpu-path: only the tiled vs untiled section")
    p.add_argument("--product", help="load: the product each request names (a tiled one: tiles per second too)")
    p.add_argument("--server-env", action="append", default=[], metavar="DAPO_KEY=VALUE",
                   help="settings of the served process for e2e/load (repeatable), e.g. DAPO_BACKEND=torch")


def run(args: argparse.Namespace) -> int:
    w, h = (int(v) for v in args.size.lower().split("x"))
    server_env = dict(item.split("=", 1) for item in args.server_env)
    artifact = Path(args.artifact)
    out: dict = {}
    if args.mode in ("encoder", "all"):
        sweep = (args.backends.split(","), args.precisions.split(","), [int(b) for b in args.batch_sizes.split(",")])
        providers = args.providers.split(",") if args.providers else None
        out["encoder"] = (bench_encoder_interleaved(artifact, *sweep, args.interleave, providers, args.threads)
                          if args.interleave else bench_encoder(artifact, *sweep, args.seconds, providers, args.threads))
    if args.mode in ("e2e", "all"):
        out["e2e"] = bench_e2e(artifact, args.images, w, h, args.rounds, fmt=args.format, server_env=server_env)
    if args.mode in ("load", "all"):
        out["load"] = bench_load(artifact, args.concurrency, args.requests, w, h, server_env=server_env,
                                 product=args.product)
    if args.mode == "cpu-path":
        from service.bench_cpu_path import CpuPathOptions, bench_cpu_path

        options = CpuPathOptions(reps=args.reps, http_reps=max(3, args.reps // 2), concurrency=min(args.concurrency, 8),
                                 photos=args.photos, http=not args.no_http, tiles=args.tiles,
                                 tiled_only=args.tiled_only)
        out["cpu_path"] = bench_cpu_path(artifact, options)
    print(json.dumps(out, indent=2))
    return 0
