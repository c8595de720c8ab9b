"""Building a product's reference bank from good parts (`dapo calibrate --references K`).

Steps, per product (service.runtime.references says how the bank is served):
1. run the artifact's own encoder (the Detector, so features are what serving computes) over the
   product's good images, with the reference features;
2. keep the first K (sorted by path, so a rerun keeps the same ones) as references: all their
   patch features, subsampled by PatchCore's greedy coreset (k-centre on a random projection)
   when there are more than `coreset_limit`, and their global features;
3. score each reference against the bank *less its own patches* (leave-one-out: a reference
   never scores itself at zero), and every other good image against the whole bank; the
   branches' means and stds on those scores are what z-scores each branch;
4. the fused scores of the same good images give the thresholds (quantiles, as `dapo calibrate`
   always did) and the drift baseline.
With K = 1 there is no other reference: the horizontally flipped image stands in for one in step
3 only (it is never in the bank).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from service.runtime.artifact import BranchStats, References
from service.runtime.backends.base import EncoderOutputs
from service.runtime.detector import Detector
from service.runtime.references import (
    FUSIONS,
    Bank,
    Branches,
    ReferenceSet,
    bank_file,
    make_search,
)

# Most patch features kept per product before the greedy coreset subsamples (measured in
# docs/references.md: ViT-S/14 @336 has 576 patches per image, so 16 images give 9216; 2304 keeps
# the /detect overhead of the search within the 1.25x target on 2 AVX2 cores, with image AUROC
# unchanged against the full bank)
DEFAULT_CORESET_LIMIT = 2304
CORESET_PROJECTION = 128  # PatchCore's Johnson-Lindenstrauss projection for the k-centre search
STD_FLOOR = 1e-6
MIN_RELATIVE_STD = 0.02  # std >= 2 % of the mean
FEW_SAMPLES, FEW_SAMPLES_STD = 5, 0.25  # below 5 values: std >= 25 % of the mean


@dataclass(frozen=True)
class ReferenceOptions:
    images: int  # K: good images kept per product (all of them if fewer)
    coreset_limit: int = DEFAULT_CORESET_LIMIT
    fusion: str = "mean"  # measured against max in docs/references.md
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self):
        if self.images < 1:
            raise ValueError(f"references must be at least 1, got {self.images}")
        if self.coreset_limit < 1:
            raise ValueError(f"coreset limit must be at least 1, got {self.coreset_limit}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")


def encode(detector: Detector, images: list[Image.Image], batch_size: int = 8,
           progress: bool = False) -> list[EncoderOutputs]:
    """Each image's outputs with the reference features (leading axis 1)."""
    if not detector.backend.has_features:
        raise ValueError("this artifact's encoder has no reference features (baked before references): "
                         "re-bake it with this version (dapo bake), then add references")
    allowed_row = np.ones(len(detector.manifest.vocabulary), bool)
    out: list[EncoderOutputs] = []
    for start in tqdm(range(0, len(images), batch_size), desc="references", disable=not progress, leave=False):
        chunk = images[start:start + batch_size]
        pv = np.stack([detector.pixel_values(im) for im in chunk])
        res = detector.backend.run(pv, np.broadcast_to(allowed_row, (len(chunk), len(allowed_row))), features=True)
        out.extend(res.item(i) for i in range(len(chunk)))
    return out


def greedy_coreset(features: np.ndarray, n: int, seed: int = 0, projection: int = CORESET_PROJECTION) -> np.ndarray:
    """Indices of n rows chosen by greedy k-centre (each next row the farthest from those chosen),
    on a random projection of the features as PatchCore does; all rows if there are at most n."""
    import torch

    if len(features) <= n:
        return np.arange(len(features))
    x = torch.from_numpy(np.ascontiguousarray(features, np.float32))
    gen = torch.Generator().manual_seed(seed)
    if x.shape[1] > projection:
        x = x @ (torch.randn(x.shape[1], projection, generator=gen) / projection ** 0.5)
    chosen = [int(torch.randint(len(x), (1,), generator=gen))]
    nearest = ((x - x[chosen[0]]) ** 2).sum(1)
    for _ in range(n - 1):
        i = int(torch.argmax(nearest))
        chosen.append(i)
        nearest = torch.minimum(nearest, ((x - x[i]) ** 2).sum(1))
    return np.sort(np.array(chosen))


def stats_of(values: np.ndarray) -> BranchStats:
    """Mean and std of a branch on the good parts. The std has a floor relative to the mean: a few
    image-level values (K = 1 gives two: the image and its mirror) can agree by chance, and a
    near-zero std would then turn any difference into a huge z that swamps the other branches
    (measured: K = 1 fused image AUROC 0.51 without the few-sample floor, docs/references.md)."""
    values = np.asarray(values, np.float64).ravel()
    mean = float(values.mean())
    relative = FEW_SAMPLES_STD if len(values) < FEW_SAMPLES else MIN_RELATIVE_STD
    return BranchStats(mean=mean, std=max(float(values.std()), relative * abs(mean), STD_FLOOR))


def build_bank(refs: list[EncoderOutputs], options: ReferenceOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(patches (M, F), sources (M,), globals (K, E)) of the references, coreset-bounded."""
    patches = np.concatenate([r.patch_features[0] for r in refs])
    sources = np.concatenate([np.full(r.patch_features.shape[1], i, np.int32) for i, r in enumerate(refs)])
    keep = greedy_coreset(patches, options.coreset_limit, options.seed)
    return patches[keep], sources[keep], np.concatenate([r.global_feature for r in refs])


def placeholder_info(file: str, images: int, patches: int, options: ReferenceOptions) -> References:
    """The manifest entry before its statistics are known (they are measured with the bank)."""
    unit = BranchStats(mean=0.0, std=1.0)
    return References(file=file, images=images, patches=patches, coreset_limit=options.coreset_limit,
                      fusion=options.fusion, dapo_map=unit, nn_map=unit, dapo_image=unit, nn_global=unit,
                      nn_patch_max=unit)


@dataclass
class ProductReferences:
    """A product's bank, its statistics, and the leave-one-out branches of its good images."""

    bank: Bank
    branches: list[Branches]  # one per good image scored (references LOO, then the others)


def product_references(detector: Detector, search, good: list[Image.Image], options: ReferenceOptions,
                       file: str = "", image_score_mode: str | None = None, progress: bool = False,
                       encoded: list[EncoderOutputs] | None = None) -> ProductReferences:
    """The bank from the first K of `good`, with its statistics measured on all of `good`."""
    mode = image_score_mode or detector.manifest.image_score
    outs = encoded if encoded is not None else encode(detector, good, options.batch_size, progress)
    k = min(options.images, len(outs))
    refs, others = outs[:k], outs[k:]
    patches, sources, globals_ = build_bank(refs, options)
    bank = Bank(patches, sources, globals_, placeholder_info(file, k, len(patches), options))
    holder = ReferenceSet({}, search)
    branches: list[Branches] = []
    if k == 1:  # no other reference: the mirror image stands in for one, for the statistics only
        flipped = encode(detector, [ImageOps.mirror(good[0])], options.batch_size)[0]
        mirror = Bank(flipped.patch_features[0], np.zeros(flipped.patch_features.shape[1], np.int32),
                      flipped.global_feature, bank.info)
        branches.append(holder.branches(refs[0], mirror, mode))
        branches.append(holder.branches(flipped, bank, mode))
    else:
        branches.extend(holder.branches(r, bank.without(i), mode) for i, r in enumerate(refs))
    branches.extend(holder.branches(o, bank, mode) for o in others)
    info = bank.info.model_copy(update={
        "dapo_map": stats_of(np.stack([b.dapo_map for b in branches])),
        "nn_map": stats_of(np.stack([b.nn_map for b in branches])),
        "dapo_image": stats_of(np.array([b.dapo_image for b in branches])),
        "nn_global": stats_of(np.array([b.nn_global for b in branches])),
        "nn_patch_max": stats_of(np.array([b.nn_patch_max for b in branches]))})
    return ProductReferences(replace(bank, info=info), branches)


def search_for(detector: Detector):
    """The reference search on the detector's backend (what serving runs)."""
    m = detector.manifest
    return make_search(detector.backend, m.image_size // m.backbone.patch_size, m.image_size)


def load_images(paths: list[Path]) -> list[Image.Image]:
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(ImageOps.exif_transpose(im).convert("RGB"))
    return out


def bank_path(artifact: Path, product: str) -> tuple[str, Path]:
    name = bank_file(product)
    return name, Path(artifact) / name


def calibrate_references(artifact: str | Path, good: list, options: ReferenceOptions, image_quantile: float,
                         pixel_quantile: float, drift_bins: int, backend: str = "onnxruntime",
                         progress: bool = False) -> dict:
    """Banks for every product in `good` (Samples), written into the artifact with their sha256;
    thresholds and baselines from the fused leave-one-out scores. Products new to the manifest
    are added. Returns the per-product table `dapo calibrate` prints."""
    from collections import defaultdict

    from service.runtime.artifact import Product, file_entry, write_manifest
    from service.runtime.detector import RuntimeOptions
    from service.runtime.drift import baseline_from_scores

    artifact = Path(artifact)
    detector = Detector.load(artifact, RuntimeOptions(backend=backend))
    search = search_for(detector)
    manifest = detector.manifest.model_copy(deep=True)
    by_product: dict[str, list[Path]] = defaultdict(list)
    for s in good:
        by_product[s.product].append(Path(s.image))
    table = {}
    for product, paths in sorted(by_product.items()):
        images = load_images(sorted(paths))
        name, path = bank_path(artifact, product)
        built = product_references(detector, search, images, options, name, progress=progress)
        fused = [b.fused(built.bank.info) for b in built.branches]
        scores = np.array([f[0] for f in fused])
        pixels = np.concatenate([f[1].ravel() for f in fused])
        image_thr = float(np.quantile(scores, image_quantile, method="higher"))
        pixel_thr = float(np.quantile(pixels, pixel_quantile, method="higher"))
        from service.runtime.references import save_bank

        save_bank(path, built.bank.patches, built.bank.sources, built.bank.globals)
        path.chmod(0o644)
        manifest.files[name] = file_entry(path)
        entry = manifest.products.get(product, Product())
        manifest.products[product] = entry.model_copy(update={
            "image_threshold": min(image_thr, 1.0), "pixel_threshold": min(pixel_thr, 1.0),
            "baseline": baseline_from_scores(list(scores), drift_bins), "references": built.bank.info})
        table[product] = {"image_threshold": image_thr, "pixel_threshold": pixel_thr, "images": len(images),
                          "references": built.bank.info.images, "bank_patches": built.bank.info.patches,
                          "fusion": options.fusion, "score_mean": float(scores.mean()),
                          "score_std": float(scores.std())}
    manifest.provenance["calibration"] = {"image_quantile": image_quantile, "pixel_quantile": pixel_quantile,
                                          "drift_bins": drift_bins, "products": sorted(table),
                                          "references": options.images, "coreset_limit": options.coreset_limit,
                                          "fusion": options.fusion}
    write_manifest(artifact, type(manifest).model_validate(manifest.model_dump()))
    return table
