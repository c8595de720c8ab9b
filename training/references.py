"""Building a product's reference bank from good parts (`dapo calibrate --references K`).

Steps, per product (service.runtime.references says how the bank is served):
1. run the artifact's own encoder (the Detector, so features are what serving computes) over the
   product's good images, with the reference features;
2. keep the first K (sorted by path, so a rerun keeps the same ones) as references: all their
   patch features, subsampled by PatchCore's greedy coreset (k-centre on a random projection)
   when there are more than `coreset_limit`, and their image descriptors (`global_query`: the
   mean of each image's patch features by default);
3. score each reference against the bank *less its own patches* (leave-one-out: a reference
   never scores itself at zero), and every other good image against the whole bank; the
   branches' means and stds on those scores are what z-scores each branch;
4. the fused scores of the same good images give the thresholds (quantiles, as `dapo calibrate`
   always did) and the drift baseline.
With K = 1 there is no other reference: the horizontally flipped image stands in for one in step
3 only (it is never in the bank).

A tiled product (`ReferenceOptions.tiling`, `dapo calibrate --tile PX --references K`) is encoded
through the tiled path the service runs (`Detector.prepare(..., tiles=...)`: the whole image,
then its tiles): its bank holds the patch features of the references' *tiles* and the
descriptors of their whole-image passes, and its statistics come from the stitched, tiled branches
(`ReferenceSet.tiled_branches`), so what is calibrated is what is served.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from service.runtime import scoring
from service.runtime.artifact import BranchStats, References, Tiling
from service.runtime.backends.base import EncoderOutputs
from service.runtime.detector import Detector, ImageLimits, Upload
from service.runtime.tiling import TiledInput
from service.runtime.references import (
    FUSIONS,
    GLOBAL_FEATURES,
    SQUASHES,
    Bank,
    Branches,
    ReferenceSet,
    bank_file,
    global_query,
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
    fusion: str = FUSIONS[0]  # measured against max in docs/references.md
    seed: int = 0
    batch_size: int = 8
    tiling: Tiling | None = None  # a tiled product's bank is built from tiles (module docstring)
    global_feature: str = GLOBAL_FEATURES[0]  # the image descriptor (References.global_feature; measured)

    def __post_init__(self):
        if self.images < 1:
            raise ValueError(f"references must be at least 1, got {self.images}")
        if self.coreset_limit < 1:
            raise ValueError(f"coreset limit must be at least 1, got {self.coreset_limit}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.global_feature not in GLOBAL_FEATURES:
            raise ValueError(f"global feature must be one of {GLOBAL_FEATURES}, got {self.global_feature!r}")


TRUSTED_FILES = ImageLimits(max_pixels=1 << 40, max_side=1 << 20)  # local good parts, not uploads


@dataclass
class Encoded:
    """One image's encoder outputs with the reference features: leading axis 1 untiled; a tiled
    image's whole-image input, then its tiles (`tiles`)."""

    outputs: EncoderOutputs
    tiles: TiledInput | None = None

    def bank_patches(self) -> np.ndarray:
        """(P, F): the patches a bank keeps of this image (the whole image's, or every tile's)."""
        pf = self.outputs.patch_features[self.tiles.first_tile if self.tiles is not None else 0:]
        return pf.reshape(-1, pf.shape[-1])

    def global_feature(self, kind: str) -> np.ndarray:
        """(1, E): the whole image's descriptor of this kind (`global_query`)."""
        return global_query(self.outputs, kind, slice(0, 1))


def need_features(detector: Detector) -> None:
    if not detector.backend.has_features:
        raise ValueError("this artifact's encoder has no reference features (baked before references): "
                         "re-bake it with this version (dapo bake), then add references")


def encode(detector: Detector, images: list[Image.Image], batch_size: int = 8,
           progress: bool = False) -> list[Encoded]:
    """Each (untiled) image's outputs with the reference features (leading axis 1)."""
    need_features(detector)
    allowed_row = np.ones(len(detector.manifest.vocabulary), bool)
    out: list[Encoded] = []
    for start in tqdm(range(0, len(images), batch_size), desc="references", disable=not progress, leave=False):
        chunk = images[start:start + batch_size]
        pv = np.stack([detector.pixel_values(im) for im in chunk])
        res = detector.backend.run(pv, np.broadcast_to(allowed_row, (len(chunk), len(allowed_row))), features=True)
        out.extend(Encoded(res.item(i)) for i in range(len(chunk)))
    return out


def encode_tiled(detector: Detector, sources: list[Upload | Image.Image], tiles: Tiling, batch_size: int = 8,
                 progress: bool = False) -> list[Encoded]:
    """Each image through the served tiled path (decode at the tiles' scale, cut), with features."""
    need_features(detector)
    allowed_row = np.ones(len(detector.manifest.vocabulary), bool)
    out: list[Encoded] = []
    for i, src in enumerate(tqdm(sources, desc="encode (tiled)", disable=not progress, leave=False)):
        prepared = detector.prepare(src, TRUSTED_FILES, filename=f"image[{i}]", tiles=tiles)
        outputs = detector.infer_inputs(prepared.inputs(), allowed_row, batch_size=batch_size, features=True)
        out.append(Encoded(outputs, prepared.tiles))
    return out


def encode_good(detector: Detector, good: list[Image.Image] | list[Path], options: ReferenceOptions,
                progress: bool = False) -> list[Encoded]:
    """Good images, as PIL images or files, encoded as the options' references are: untiled in
    the references' own batches, tiled through the served tiled path (a file as its bytes, the
    upload the service decodes)."""
    if options.tiling is None:
        return encode(detector, [as_image(g) for g in good], options.batch_size, progress)
    sources = [g if isinstance(g, Image.Image) else Upload(str(g), Path(g).read_bytes()) for g in good]
    return encode_tiled(detector, sources, options.tiling, options.batch_size, progress)


def image_branches(detector: Detector, holder: ReferenceSet, enc: Encoded, bank: Bank,
                   policy: scoring.Policy) -> Branches:
    """One encoded image's branches against a bank, as serving computes them (tiled or not)."""
    if enc.tiles is None:
        return holder.branches(enc.outputs, bank, policy.image_score)
    value, anomaly, _ = detector.tiled_dapo(enc.outputs, policy, enc.tiles)
    return holder.tiled_branches(enc.outputs, bank, enc.tiles, anomaly, value, policy.gaussian_sigma)


def reference_policy(detector: Detector, tiling: Tiling | None, image_score_mode: str | None = None
                     ) -> scoring.Policy:
    """Every class allowed (references never depend on the product filter), the manifest's
    smoothing and image score, and the references' tiling."""
    base = scoring.policy(detector.manifest)
    return replace(base, tiling=tiling, image_score=image_score_mode or base.image_score)


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


def build_bank(refs: list[Encoded], options: ReferenceOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(patches (M, F), sources (M,), globals (K, E)) of the references, coreset-bounded."""
    per_image = [r.bank_patches() for r in refs]
    patches = np.concatenate(per_image)
    sources = np.concatenate([np.full(len(p), i, np.int32) for i, p in enumerate(per_image)])
    keep = greedy_coreset(patches, options.coreset_limit, options.seed)
    return patches[keep], sources[keep], np.concatenate([r.global_feature(options.global_feature) for r in refs])


def placeholder_info(file: str, images: int, patches: int, options: ReferenceOptions) -> References:
    """The manifest entry before its statistics are known (they are measured with the bank)."""
    unit = BranchStats(mean=0.0, std=1.0)
    return References(file=file, images=images, patches=patches, coreset_limit=options.coreset_limit,
                      fusion=options.fusion, dapo_map=unit, nn_map=unit, dapo_image=unit, nn_global=unit,
                      nn_patch_max=unit, tile=options.tiling.tile if options.tiling is not None else None,
                      global_feature=options.global_feature, squash=SQUASHES[0])


@dataclass
class ProductReferences:
    """A product's bank, its statistics, and the leave-one-out branches of its good images."""

    bank: Bank
    branches: list[Branches]  # one per good image scored (references LOO, then the others)


def product_references(detector: Detector, search, good: list[Image.Image] | list[Path], options: ReferenceOptions,
                       file: str = "", image_score_mode: str | None = None, progress: bool = False,
                       encoded: list[Encoded] | None = None) -> ProductReferences:
    """The bank from the first K good images (PIL images or files), with its statistics measured
    on all of them; `encoded`: the same images already run (`encode_good`). With K = 1 the first
    image is mirrored for the statistics."""
    policy = reference_policy(detector, options.tiling, image_score_mode)
    outs = encoded if encoded is not None else encode_good(detector, good, options, progress)
    k = min(options.images, len(outs))
    refs, others = outs[:k], outs[k:]
    patches, sources, globals_ = build_bank(refs, options)
    bank = Bank(patches, sources, globals_, placeholder_info(file, k, len(patches), options))
    holder = ReferenceSet({}, search)
    branches: list[Branches] = []
    if k == 1:  # no other reference: the mirror image stands in for one, for the statistics only
        flipped = encode_good(detector, [ImageOps.mirror(as_image(good[0]))], options)[0]
        mirror = Bank(flipped.bank_patches(), np.zeros(len(flipped.bank_patches()), np.int32),
                      flipped.global_feature(options.global_feature), bank.info)
        branches.append(image_branches(detector, holder, refs[0], mirror, policy))
        branches.append(image_branches(detector, holder, flipped, bank, policy))
    else:
        branches.extend(image_branches(detector, holder, r, bank.without(i), policy) for i, r in enumerate(refs))
    branches.extend(image_branches(detector, holder, o, bank, policy) for o in others)
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


def as_image(good: Image.Image | Path) -> Image.Image:
    """A good image given as a PIL image or a file, as an RGB image."""
    return good if isinstance(good, Image.Image) else load_images([good])[0]


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
    detector = Detector.load(artifact, RuntimeOptions(backend=backend), references=False)  # banks are rebuilt
    search = search_for(detector)
    manifest = detector.manifest.model_copy(deep=True)
    by_product: dict[str, list[Path]] = defaultdict(list)
    for s in good:
        by_product[s.product].append(Path(s.image))
    table = {}
    for product, paths in sorted(by_product.items()):
        paths = sorted(paths)
        known = manifest.products.get(product)
        opts = replace(options, tiling=options.tiling or (known.tiling if known is not None else None))
        name, path = bank_path(artifact, product)
        built = product_references(detector, search, paths, opts, name, progress=progress)
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
        if opts.tiling is not None:
            entry = entry.model_copy(update={"tiling": opts.tiling})
        manifest.products[product] = entry.model_copy(update={
            "image_threshold": min(image_thr, 1.0), "pixel_threshold": min(pixel_thr, 1.0),
            "baseline": baseline_from_scores(list(scores), drift_bins), "references": built.bank.info})
        table[product] = {"image_threshold": image_thr, "pixel_threshold": pixel_thr, "images": len(paths),
                          "references": built.bank.info.images, "bank_patches": built.bank.info.patches,
                          "fusion": opts.fusion, "tiling": opts.tiling.model_dump() if opts.tiling else None,
                          "score_mean": float(scores.mean()),
                          "score_std": float(scores.std())}
    manifest.provenance["calibration"] = {"image_quantile": image_quantile, "pixel_quantile": pixel_quantile,
                                          "drift_bins": drift_bins, "products": sorted(table),
                                          "references": options.images, "coreset_limit": options.coreset_limit,
                                          "fusion": options.fusion, "global_feature": options.global_feature,
                                          "tiling": options.tiling.model_dump() if options.tiling else None}
    write_manifest(artifact, type(manifest).model_validate(manifest.model_dump()))
    return table
