"""The dashboard's quality series during a synthetic shift, drawn from recorded /metrics scrapes.

Calibrates a copy of an artifact (default: the demo artifact, baked here) on good parts of one
`dapo synth` texture, serves it with the real entry point (`dapo serve`, loopback), and streams
good parts under that product in phases: the calibrated texture, another texture (a new
supplier's material), a third one, then the calibrated texture again. After every request it
scrapes /metrics, as Prometheus would, and keeps the samples the Grafana dashboard plots
(deploy/grafana/dashboards/dapo-line-quality.json): reject rate, the anomaly-score histogram,
the drift PSI and the mean shift. Writes the recorded series (JSON) and their plot (PNG).

    pip install matplotlib   # plotting only; not a dependency of the package
    python bench/quality_drift.py --out runs/quality_drift --png docs/quality_drift.png

The demo backbone has random weights: its scores mean nothing about defects, but their
distribution differs between textures, which is what drift is about.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from service.server.local_server import Server


@dataclass(frozen=True)
class Plan:
    calibrated: str  # the texture calibration sees, and the product name every request uses
    phases: tuple[str, ...]  # the texture streamed in each phase
    per_phase: int  # images per phase
    calibration_images: int
    window: int  # DAPO_DRIFT_WINDOW
    min_images: int  # DAPO_DRIFT_MIN_IMAGES
    batch: int  # images per /detect request (= one scrape)
    size: int  # synth image side


def dapo(*args: str) -> str:
    """Run a `dapo` subcommand of this checkout (what an operator types), return its stdout."""
    proc = subprocess.run([sys.executable, "-m", "service.cli", *args], check=True, capture_output=True, text=True)
    return proc.stdout


def synth(out: Path, products: list[str], n_good: int, seed: int, size: int) -> Path:
    dapo("synth", "--out", str(out), "--products", ",".join(products), "--defects", "scratch", "--n-per-class", "1",
         "--n-good", str(n_good), "--size", str(size), "--seed", str(seed), "--holdout-product", "none",
         "--holdout-defect", "none", "--overwrite")
    return out


def prepare(args: argparse.Namespace, plan: Plan, out: Path) -> Path:
    """The calibrated artifact copy: `dapo calibrate` on good parts of the calibrated texture only."""
    source = Path(args.artifact) if args.artifact else None
    if source is None:
        from training.bake import bake_demo

        source = bake_demo(out / "demo").folder
    artifact = out / "artifact"
    shutil.rmtree(artifact, ignore_errors=True)
    shutil.copytree(source, artifact)
    calib = synth(out / "calibration", [plan.calibrated], plan.calibration_images, seed=0, size=plan.size)
    print(dapo("calibrate", "--artifact", str(artifact), "--data", str(calib), "--layout", "synth", "--split", "train"),
          file=sys.stderr)
    return artifact


def scrape(client: httpx.Client, product: str) -> dict:
    """The dashboard's samples for one product from one /metrics scrape."""
    row: dict = {"inspections": {}, "score_buckets": {}}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.labels.get("product") != product:
                continue
            if s.name == "dapo_inspections_total":
                row["inspections"][s.labels["verdict"]] = s.value
            elif s.name == "dapo_anomaly_score_bucket":
                row["score_buckets"][s.labels["le"]] = s.value
            elif s.name == "dapo_score_drift_psi":
                row["psi"] = s.value
            elif s.name == "dapo_score_mean_shift":
                row["mean_shift"] = s.value
            elif s.name == "dapo_score_drift_window_images":
                row["window_images"] = s.value
    return row


def stream(url: str, plan: Plan, data: Path) -> list[dict]:
    rows = []
    sent = 0
    with httpx.Client(base_url=url, timeout=60) as client:
        for phase, texture in enumerate(plan.phases):
            # the calibrated texture's second visit takes the next images, never the same ones
            offset = plan.per_phase * sum(1 for t in plan.phases[:phase] if t == texture)
            images = sorted((data / texture / "good").glob("*.png"))[offset:offset + plan.per_phase]
            assert len(images) == plan.per_phase, f"{texture}: not enough images"
            for i in range(0, len(images), plan.batch):
                files = [("image", (p.name, p.read_bytes(), "image/png")) for p in images[i:i + plan.batch]]
                r = client.post("/detect", files=files, data={"product": plan.calibrated})
                r.raise_for_status()
                sent += len(files)
                rows.append({"images": sent, "phase": phase, "texture": texture, **scrape(client, plan.calibrated)})
    return rows


def record(args: argparse.Namespace, plan: Plan) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    artifact = prepare(args, plan, out)
    textures = sorted(set(plan.phases))
    visits = max(plan.phases.count(t) for t in textures)
    data = synth(out / "stream", textures, plan.per_phase * visits, seed=1, size=plan.size)
    env = {"DAPO_DRIFT_WINDOW": str(plan.window), "DAPO_DRIFT_MIN_IMAGES": str(plan.min_images),
           "DAPO_LOG_LEVEL": "WARNING"}
    server = Server(artifact, env=env, log_path=out / "server.log")
    t0 = time.perf_counter()
    try:
        server.wait_ready()
        rows = stream(server.url, plan, data)
    finally:
        server.stop()
    manifest = json.loads((artifact / "manifest.json").read_text())
    return {"plan": plan.__dict__, "baseline": manifest["products"][plan.calibrated]["baseline"],
            "stream_s": round(time.perf_counter() - t0, 1), "scrapes": rows}


# --- what Grafana computes from the scrapes -------------------------------------------------
def increase(rows: list[dict], i: int, lookback: int, key) -> float:
    j = max(0, i - lookback)
    return key(rows[i]) - (key(rows[j]) if j != i else 0.0)


def reject_rate(rows: list[dict], lookback: int) -> np.ndarray:
    """anomalous / all over the last `lookback` scrapes (the dashboard's ratio of rates)."""
    out = []
    for i in range(len(rows)):
        bad = increase(rows, i, lookback, lambda r: r["inspections"].get("anomalous", 0.0))
        total = bad + increase(rows, i, lookback, lambda r: r["inspections"].get("normal", 0.0))
        out.append(bad / total if total else np.nan)
    return np.array(out)


def bucket_increases(rows: list[dict], lookback: int) -> tuple[np.ndarray, np.ndarray]:
    """(upper bounds, per-scrape counts per bucket over the last `lookback` scrapes), +Inf left out."""
    keys = sorted((k for k in rows[-1]["score_buckets"] if k != "+Inf"), key=float)
    bounds = [float(k) for k in keys]
    cumulative = np.array([[increase(rows, i, lookback, lambda r, k=k: r["score_buckets"].get(k, 0.0)) for k in keys]
                           for i in range(len(rows))])
    per_bucket = np.diff(np.c_[np.zeros(len(rows)), cumulative], axis=1)
    return np.array(bounds), per_bucket


def plot(recorded: dict, png: Path, lookback: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, plan = recorded["scrapes"], recorded["plan"]
    x = np.array([r["images"] for r in rows])
    psi = np.array([r.get("psi", np.nan) for r in rows])
    shift = np.array([r.get("mean_shift", np.nan) for r in rows])
    bounds, per_bucket = bucket_increases(rows, lookback)
    fig, axes = plt.subplots(4, 1, figsize=(8.5, 8.2), sharex=True, gridspec_kw={"height_ratios": [1, 1.4, 1.2, 1]})
    edges = np.r_[0.0, x]
    names = [f"{t}" + (" (calibrated)" if t == plan["calibrated"] else "") for t in plan["phases"]]
    for ax in axes:
        for phase in range(1, len(plan["phases"])):
            ax.axvline(phase * plan["per_phase"], color="0.5", lw=0.8, ls="--")
    for phase, name in enumerate(names):
        axes[0].text((phase + 0.5) * plan["per_phase"], 1.04, name, ha="center", va="bottom", fontsize=9,
                     transform=axes[0].get_xaxis_transform())
    axes[0].plot(x, reject_rate(rows, lookback), color="tab:red", lw=1.3)
    axes[0].set_ylabel("reject rate")
    axes[0].set_ylim(-0.03, 1.03)
    lo, hi = 0, len(bounds)
    used = np.nonzero(per_bucket.sum(axis=0))[0]
    if used.size:
        lo, hi = max(0, used[0] - 1), min(len(bounds), used[-1] + 2)
    y_edges = np.r_[0.0, bounds][lo:hi + 1]
    axes[1].pcolormesh(edges, y_edges, per_bucket[:, lo:hi].T, cmap="Oranges", shading="flat")
    axes[1].axhline(recorded["baseline"]["mean"], color="tab:blue", lw=1, label="calibration mean")
    axes[1].set_ylabel("anomaly score\n(histogram buckets)")
    axes[1].legend(loc="upper left", fontsize=8)
    axes[2].plot(x, psi, color="k", lw=1.3)
    for level, color, text in ((0.1, "goldenrod", "0.1 moderate"), (0.25, "tab:red", "0.25 significant")):
        axes[2].axhline(level, color=color, lw=1, ls=":")
        axes[2].text(2, level, text, color=color, fontsize=7, ha="left", va="bottom")
    axes[2].set_ylabel("drift PSI (log)")
    axes[2].set_yscale("log")
    axes[2].set_ylim(0.02, max(1.0, float(np.nanmax(psi)) * 1.5) if np.isfinite(psi).any() else 1.0)
    axes[3].plot(x, shift, color="tab:purple", lw=1.3)
    axes[3].axhline(0, color="0.5", lw=0.8)
    axes[3].set_ylabel("mean shift\n(calibration std)")
    axes[3].set_xlabel(f"images streamed as product '{plan['calibrated']}' (one /metrics scrape per "
                       f"{plan['batch']} images; drift window {plan['window']})")
    fig.suptitle("dapo-inspect quality series from recorded /metrics scrapes (demo artifact, synthetic shift)",
                 fontsize=10, y=0.995)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80)


def summary(recorded: dict) -> dict:
    """Per phase: the drift gauges at the phase's end, and their range over its second half."""
    rows, plan = recorded["scrapes"], recorded["plan"]
    out = []
    for phase, texture in enumerate(plan["phases"]):
        mine = [r for r in rows if r["phase"] == phase and "psi" in r]
        late = mine[len(mine) // 2:]
        out.append({"phase": phase, "texture": texture, "psi_end": round(mine[-1]["psi"], 3),
                    "psi_range_second_half": [round(min(r["psi"] for r in late), 3),
                                              round(max(r["psi"] for r in late), 3)],
                    "mean_shift_end": round(mine[-1]["mean_shift"], 2)})
    return {"phases": out, "baseline": {k: recorded["baseline"][k] for k in ("mean", "std", "images")},
            "stream_s": recorded["stream_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/quality_drift")
    ap.add_argument("--artifact", help="artifact to copy and calibrate (default: bake the demo artifact)")
    ap.add_argument("--calibrated", default="wood")
    ap.add_argument("--phases", default="wood,fabric,carpet,wood")
    ap.add_argument("--per-phase", type=int, default=240)
    ap.add_argument("--calibration-images", type=int, default=400)
    ap.add_argument("--window", type=int, default=200)
    ap.add_argument("--min-images", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--lookback", type=int, default=5, help="scrapes per rate window in the plot")
    ap.add_argument("--json", help="write the recorded scrapes here (default: <out>/scrapes.json)")
    ap.add_argument("--png", help="plot here (needs matplotlib)")
    ap.add_argument("--from-json", help="plot a recording instead of streaming again")
    args = ap.parse_args()
    if args.from_json:
        recorded = json.loads(Path(args.from_json).read_text())
    else:
        plan = Plan(args.calibrated, tuple(args.phases.split(",")), args.per_phase, args.calibration_images,
                    args.window, args.min_images, args.batch, args.size)
        recorded = record(args, plan)
        path = Path(args.json or Path(args.out) / "scrapes.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(recorded, separators=(",", ":")) + "\n")
    if args.png:
        plot(recorded, Path(args.png), args.lookback)
    print(json.dumps(summary(recorded), indent=2))


if __name__ == "__main__":
    main()
