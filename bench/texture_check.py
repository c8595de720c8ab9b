"""A stand-in for the independent texture checks of the references and tiling issues, on photos
no one here made: scikit-image's bundled textures (brick, grass, gravel; 512 x 512 grayscale,
in the package's data folder, no download; `pip install scikit-image`: a bench-only need, not a
project dependency).

    python bench/texture_check.py --artifact runs/dinov2-224 --work runs/texture_check

Part 1 (references issue): per texture, 250 x 250 crops at seeded random offsets (random
horizontal flips). 16 crops are the product's good parts (`<texture>/good/`); the test set holds
N fresh good crops, N with a **local** defect of a few pixels (a dark or bright spot of radius
2-4 px, or a 1-2 px scratch 12-24 px long), and N with a **global** texture change (a blur,
a 1.4x zoom, or contrast halved; one per image). Each configuration copies the artifact, runs
`dapo calibrate --references 16 [--tile PX] [--fusion F]` on the good folder as a user would,
then scores the test images through `Detector.predict` (the stages `/detect` runs) with the
product, and with `references=false`. Image AUROC of `anomaly_score`, good vs local and good vs
global, averaged over the textures. The defect recipes were fixed before any run.

Part 2 (tiling issue): mosaics of 4 x 4 crops of 125 px (500 px) of one texture; a defective
mosaic has one local defect in one crop. Whole vs 4 x 4 tiles of 125 px, DAPO alone and with
16 good mosaics as references.

Figures: docs/references.md and docs/tiling.md ("independent texture check").
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from sklearn.metrics import roc_auc_score

from service.runtime.detector import Detector, ImageLimits, Upload

TEXTURES = ("brick", "grass", "gravel")
CROP = 250
REFERENCES = 16
LIMITS = ImageLimits(max_pixels=1 << 26, max_side=1 << 14)


def photo(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def crop(img: Image.Image, rng: np.random.Generator, side: int) -> Image.Image:
    x, y = (int(rng.integers(0, s - side + 1)) for s in img.size)
    out = img.crop((x, y, x + side, y + side))
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else out


def local_defect(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A few pixels: a spot (radius 2-4 px) or a scratch (1-2 px wide, 12-24 px long), dark or bright."""
    out = img.copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    tone = (20, 20, 20) if rng.random() < 0.5 else (235, 235, 235)
    cx, cy = int(rng.integers(12, w - 12)), int(rng.integers(12, h - 12))
    if rng.random() < 0.5:
        r = int(rng.integers(2, 5))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tone)
    else:
        length, angle = float(rng.integers(12, 25)), float(rng.uniform(0, np.pi))
        dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
        draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=tone, width=int(rng.integers(1, 3)))
    return out


def global_defect(img: Image.Image, rng: np.random.Generator, kind: int) -> Image.Image:
    """The whole crop's texture changes: blur, a 1.4x zoom, or contrast halved."""
    if kind == 0:
        return img.filter(ImageFilter.GaussianBlur(1.5))
    if kind == 1:
        side = round(img.width / 1.4)
        x, y = (int(rng.integers(0, img.width - side + 1)) for _ in range(2))
        return img.crop((x, y, x + side, y + side)).resize(img.size, Image.Resampling.BICUBIC)
    arr = np.asarray(img, np.float32)
    return Image.fromarray(np.clip((arr - arr.mean()) * 0.5 + arr.mean(), 0, 255).astype(np.uint8))


def mosaic(src: Image.Image, rng: np.random.Generator, grid: int, cell: int, defect: bool) -> Image.Image:
    out = Image.new("RGB", (grid * cell, grid * cell))
    bad = int(rng.integers(0, grid * grid)) if defect else -1
    for i in range(grid * grid):
        piece = crop(src, rng, cell)
        out.paste(local_defect(piece, rng) if i == bad else piece, ((i % grid) * cell, (i // grid) * cell))
    return out


def test_image(part: str, kind: str, src: Image.Image, rng: np.random.Generator, index: int) -> Image.Image:
    """One image of a part's set: a crop or a mosaic, good or with its kind of defect."""
    if part == "mosaics":
        return mosaic(src, rng, 4, CROP // 2, kind == "local")
    img = crop(src, rng, CROP)
    if kind == "local":
        return local_defect(img, rng)
    return global_defect(img, rng, index % 3) if kind == "global" else img


def write_sets(work: Path, n: int, seed: int) -> None:
    """good/ folders (references) and test sets of both parts, once per --work."""
    if (work / "done").exists():
        return
    for t, name in enumerate(TEXTURES):
        src = photo(name)
        rng = np.random.default_rng(seed + t)
        for part, kinds in (("crops", ("good", "local", "global")), ("mosaics", ("good", "local"))):
            good = work / part / "good" / name / "good"
            good.mkdir(parents=True, exist_ok=True)
            for i in range(REFERENCES):
                test_image(part, "good", src, rng, i).save(good / f"{i:03d}.png")
            for kind in kinds:
                folder = work / part / "test" / name / kind
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    test_image(part, kind, src, rng, i).save(folder / f"{i:03d}.png")
    (work / "done").write_text("ok")


def calibrated(artifact: Path, good: Path, dest: Path, tile: int | None, fusion: str) -> Path:
    """A copy of the artifact with references, by `dapo calibrate` as a user runs it."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(artifact, dest)
    cmd = [sys.executable, "-m", "service.cli", "calibrate", "--artifact", str(dest), "--data", str(good),
           "--layout", "folder", "--references", str(REFERENCES), "--fusion", fusion]
    if tile:
        cmd += ["--tile", str(tile)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return dest


def scores(det: Detector, folder: Path, product: str, references: bool) -> list[float]:
    items = [Upload(p.name, p.read_bytes()) for p in sorted(folder.glob("*.png"))]
    return [r.scores.anomaly_score for r in det.predict(items, det.policy(product, references=references),
                                                         limits=LIMITS, batch_size=8)]


def aurocs(det: Detector, test: Path, kinds: tuple[str, ...], references: bool) -> dict[str, float]:
    """{kind: mean over textures of image AUROC good vs kind}."""
    out: dict[str, list[float]] = {k: [] for k in kinds}
    for name in TEXTURES:
        good = scores(det, test / name / "good", name, references)
        for k in kinds:
            bad = scores(det, test / name / k, name, references)
            out[k].append(float(roc_auc_score([0] * len(good) + [1] * len(bad), good + bad)))
    return {k: round(float(np.mean(v)), 3) for k, v in out.items()} | {
        f"{k}_per_texture": [round(x, 3) for x in v] for k, v in out.items()}


def branch_values(det: Detector, folder: Path, bank, opts, policy) -> dict[str, list[float]]:
    """Each image's branches against the bank, as serving computes them."""
    from training.references import encode_good, image_branches

    encoded = encode_good(det, sorted(folder.glob("*.png")), opts)
    bs = [image_branches(det, det.references, e, bank, policy) for e in encoded]
    return {"dapo": [b.dapo_image for b in bs], "nn_global": [b.nn_global for b in bs],
            "nn_patch_max": [b.nn_patch_max for b in bs],
            "fused_mean": [b.fused(bank.info, "mean")[0] for b in bs],
            "fused_max": [b.fused(bank.info, "max")[0] for b in bs]}


def branch_aurocs(det: Detector, test: Path, kinds: tuple[str, ...], tile: int | None) -> dict:
    """{kind: {branch: mean AUROC}}: each image branch of the served bank alone (its raw value;
    z-scoring is monotone), and both fusion rules on the same branches, to measure the rule."""
    from service.runtime.artifact import Tiling
    from training.references import ReferenceOptions, reference_policy

    opts = ReferenceOptions(1, tiling=Tiling(tile=tile) if tile else None)
    policy = reference_policy(det, opts.tiling)
    rows: dict[str, dict[str, list[float]]] = {k: {} for k in kinds}
    for name in TEXTURES:
        bank = det.references.banks[name]
        good = branch_values(det, test / name / "good", bank, opts, policy)
        for kind in kinds:
            bad = branch_values(det, test / name / kind, bank, opts, policy)
            for branch, g in good.items():
                y = [0] * len(g) + [1] * len(bad[branch])
                rows[kind].setdefault(branch, []).append(float(roc_auc_score(y, g + bad[branch])))
    return {k: {b: round(float(np.mean(v)), 3) for b, v in r.items()} for k, r in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", required=True, type=Path)
    ap.add_argument("--work", default="runs/texture_check", type=Path)
    ap.add_argument("--n", type=int, default=24, help="test images per texture and kind")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--crop-tiles", default="0,125", help="tile sides for part 1 (0 = whole)")
    ap.add_argument("--fusions", default="mean,max")
    ap.add_argument("--parts", default="1,2")
    ap.add_argument("--branches", action="store_true", help="also each image branch alone, and both fusions")
    args = ap.parse_args()
    write_sets(args.work, args.n, args.seed)
    rows = []
    parts = set(args.parts.split(","))
    if "1" in parts:
        for tile in [int(t) for t in args.crop_tiles.split(",")]:
            for fusion in args.fusions.split(","):
                det = Detector.load(calibrated(args.artifact, args.work / "crops" / "good",
                                               args.work / "art" / f"crops-{tile}-{fusion}", tile or None, fusion))
                test = args.work / "crops" / "test"
                if fusion == args.fusions.split(",")[0]:
                    rows.append({"part": "crops", "tile": tile, "references": False,
                                 **aurocs(det, test, ("local", "global"), False)})
                    print(json.dumps(rows[-1]), flush=True)
                rows.append({"part": "crops", "tile": tile, "references": True, "fusion": fusion,
                             **aurocs(det, test, ("local", "global"), True)})
                print(json.dumps(rows[-1]), flush=True)
                if args.branches and fusion == args.fusions.split(",")[0]:
                    rows.append({"part": "crops", "tile": tile, "branches": branch_aurocs(det, test, ("local", "global"),
                                                                                          tile or None)})
                    print(json.dumps(rows[-1]), flush=True)
    if "2" in parts:
        for tile in (0, CROP // 2):
            fusion = args.fusions.split(",")[0]
            det = Detector.load(calibrated(args.artifact, args.work / "mosaics" / "good",
                                           args.work / "art" / f"mosaics-{tile}", tile or None, fusion))
            test = args.work / "mosaics" / "test"
            for references in (False, True):
                rows.append({"part": "mosaics", "tile": tile, "references": references, "fusion": fusion,
                             **aurocs(det, test, ("local",), references)})
                print(json.dumps(rows[-1]), flush=True)
    (args.work / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
