"""Hot-swap benchmark: swap time, request latency during swaps vs steady state, RSS over swaps.

    python bench/reload.py                                   # two demo artifacts, 10 swaps
    python bench/reload.py --backbone ViT-B-16 --image-size 224   # random-weight ViT-B/16 pair (~350 MB each)
    python bench/reload.py --artifact-a A --artifact-b B --json out.json

Starts `dapo serve` (a child process, loopback only) on artifact A with an admin key, keeps
`--concurrency` clients posting one image back to back, measures `--steady` seconds with no
swap, then swaps A -> B -> A ... `--swaps` times through POST /v1/model/reload. After each swap
it waits until the replaced model is released (dapo_models_loaded back to 1) and reads the
server's RSS (/proc/<pid>/status VmRSS), then lets `--gap` seconds of traffic pass.

Reported (JSON): the swap time (the reload answer's load + verify + warm-up seconds, and the
wall time of the POST), the release time (switch -> old model closed), the client latency of
the requests that overlapped a swap (from the POST until the old model was released) against
the steady state's p50/p99/max, every status seen (anything but 200 is a failure), and RSS
after warm-up, after each swap and its growth. Artifacts A and B, when not given, are baked into
a temporary folder from the same backbone with two seeds (needs the `train` extra).
`--control S` runs the same schedule and traffic with a pause of S seconds instead of each
reload: RSS growth there is what traffic alone does (allocator, caches), to compare against.
"""
from __future__ import annotations

import argparse
import io
import json
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.server.local_server import Server, rss_kib


def bake_pair(work: Path, backbone: str | None, image_size: int) -> tuple[Path, Path]:
    """Two artifacts of one architecture with different random weights (seeds 42 and 7)."""
    from training.bake import DEMO_VOCAB, BakeOptions, bake, bake_demo

    if backbone is None:
        return (bake_demo(work / "a", seed=42, version="0.1.0").folder,
                bake_demo(work / "b", seed=7, version="0.2.0").folder)
    from training.backbone import BackboneSpec
    from training.model import DapoConfig, DapoModel

    out = []
    for name, seed, version in (("a", 42, "0.1.0"), ("b", 7, "0.2.0")):
        spec = BackboneSpec(name=backbone, pretrained=None, image_size=image_size, seed=seed)
        model = DapoModel(DapoConfig(backbone=spec, seed=seed))
        out.append(bake(model, list(DEMO_VOCAB), work / name, BakeOptions(
            name=f"bench-{Path(backbone).stem}", version=version,
            provenance={"kind": "bench", "weights": "random", "seed": seed})).folder)
    return out[0], out[1]


def test_image() -> bytes:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


class Clients:
    """Closed-loop clients; each answer as (start, end, status, model version)."""

    def __init__(self, url: str, concurrency: int):
        self.url, self.image = url, test_image()
        self.answers: list[tuple[float, float, int, str | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(concurrency)]

    def _run(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    r = client.post(f"{self.url}/detect?mask_format=none",
                                    files={"image": ("cam.jpg", self.image, "image/jpeg")})
                    version = r.json()["model"]["version"] if r.status_code == 200 else None
                    self.answers.append((t0, time.monotonic(), r.status_code, version))
                except httpx.HTTPError:
                    self.answers.append((t0, time.monotonic(), 0, None))

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)


def models_loaded(url: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "dapo_models_loaded":
                return sample.value
    return float("nan")


def latency_ms(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ms = np.array(values) * 1000.0
    return {"n": len(values), "p50": round(float(np.percentile(ms, 50)), 1),
            "p99": round(float(np.percentile(ms, 99)), 1), "max": round(float(ms.max()), 1)}


def swap(url: str, key: str, artifact: Path) -> dict:
    """One reload; returns its timings once the replaced model is released."""
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/model/reload", json={"artifact": str(artifact)}, headers={"X-API-Key": key},
                   timeout=1800)
    switched = time.monotonic()
    if r.status_code != 200:
        raise RuntimeError(f"reload to {artifact} failed: {r.status_code} {r.text}")
    while models_loaded(url) != 1:
        time.sleep(0.02)
    return {"start": t0, "switched": switched, "released": time.monotonic(), "report": r.json()}


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="dapo-reload-") as tmp:
        a, b = (Path(args.artifact_a), Path(args.artifact_b)) if args.artifact_a else \
            bake_pair(Path(tmp), args.backbone, args.image_size)
        key = secrets.token_hex(16)
        env = {"DAPO_ADMIN_KEYS": key, "DAPO_LOG_LEVEL": "WARNING", "DAPO_MAX_BATCH_SIZE": str(args.max_batch_size)}
        with Server(a, env=env) as server:
            clients = Clients(server.url, args.concurrency)
            clients.start()
            time.sleep(args.warmup)
            rss_start = rss_kib(server.pid) / 1024
            steady_from = time.monotonic()
            time.sleep(args.steady)
            steady_to = time.monotonic()
            swaps, rss = [], [round(rss_start, 1)]
            for i in range(args.swaps):
                if args.control:  # same traffic and cadence, no reload: what RSS does without swaps
                    t0 = time.monotonic()
                    time.sleep(args.control)
                    swaps.append({"start": t0, "switched": time.monotonic(), "released": time.monotonic(),
                                  "report": {"seconds": 0.0}})
                else:
                    swaps.append(swap(server.url, key, b if i % 2 == 0 else a))
                rss.append(round(rss_kib(server.pid) / 1024, 1))
                time.sleep(args.gap)
            clients.stop()
        answers = clients.answers
    steady = [end - start for start, end, status, _ in answers if status == 200 and steady_from <= start and end <= steady_to]
    during = [end - start for start, end, status, _ in answers
              if status == 200 and any(start < s["released"] and end > s["start"] for s in swaps)]
    statuses: dict[str, int] = {}
    for *_, status, _ in answers:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {
        "mode": f"control (no reload, {args.control} s pauses)" if args.control else "swaps",
        "artifacts": [str(a), str(b)], "backbone": args.backbone or "demo (dapo-tiny)",
        "concurrency": args.concurrency, "requests": len(answers), "status_counts": statuses,
        "failed": sum(n for s, n in statuses.items() if s != "200"),
        "swap_s": {"load_verify_warmup": [s["report"]["seconds"] for s in swaps],
                   "post_wall": [round(s["switched"] - s["start"], 3) for s in swaps],
                   "switch_to_release": [round(s["released"] - s["switched"], 3) for s in swaps]},
        "latency_ms": {"steady": latency_ms(steady), "during_swaps": latency_ms(during)},
        "rss_mb": {"after_warmup": rss[0], "after_each_swap": rss[1:], "growth_after_all_swaps": round(rss[-1] - rss[0], 1),
                   "peak_after_swap": max(rss[1:]) if rss[1:] else None},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact-a")
    p.add_argument("--artifact-b")
    p.add_argument("--backbone", help="OpenCLIP name or config JSON for the baked pair (default: the demo)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--swaps", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-batch-size", type=int, default=4)
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of traffic before measuring")
    p.add_argument("--steady", type=float, default=10.0, help="seconds of traffic without swaps")
    p.add_argument("--gap", type=float, default=2.0, help="seconds of traffic between swaps")
    p.add_argument("--control", type=float, default=0.0, metavar="S",
                   help="control run: instead of each swap wait S seconds (about a swap's duration), same traffic")
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args(argv)
    if bool(args.artifact_a) != bool(args.artifact_b):
        p.error("give both --artifact-a and --artifact-b, or neither")
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if report["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
