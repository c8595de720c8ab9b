"""The few-shot protocol (`dapo eval --references K[,K...]`): zero-shot DAPO vs K good references.

Per category: the references are its first K good images (sorted by path) of the reference set:
a separate split (`--reference-split train`) or, without one, the first max(K) good images of
the evaluated data, which are then left out of the test set so every K sees the same test
images. Each test image is encoded once (the artifact's Detector, ONNX Runtime by default, with
the reference features) and scored, per K, by each branch alone and fused:

    dapo        zero-shot: DAPO's image score and anomaly map (K = 0)
    nn_patch    image: max over patches of the nearest-neighbour distance; map: that distance
    nn_global   image: nearest-neighbour distance of the image descriptor (no map; `global_query`)
    fused_max   the z-scored branches fused by max
    fused_mean  ... by mean (what serving does by default)
Metrics: image AUROC, pixel AUROC, AUPRO (training.metrics), averaged over categories.

`tiling` (`dapo eval --references K --tile PX`) runs every image through the served tiled path
(the upload decode, tiles, stitching; references built from the pool's tiles, as
`dapo calibrate --tile PX --references K` builds them); maps and truth are then compared on one
`map_size` x `map_size` grid (default: the encoder's S), maps resized bilinearly.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from service.runtime.artifact import Tiling
from service.runtime.detector import Detector, Upload
from service.runtime.references import Branches, ReferenceSet, dapo_image_score
from service.runtime.scoring import Policy
from training.data import AnomalyDataset, Sample, Vocabulary, with_vocabulary
from training.detector_eval import resize_map, truth
from training.metrics import binary_metrics, mean_over
from training.references import (
    Encoded,
    ReferenceOptions,
    encode_good,
    encode_tiled,
    image_branches,
    product_references,
    reference_policy,
    search_for,
)

ROWS = ("dapo", "nn_patch", "nn_global", "fused_max", "fused_mean")
KEYS = ("image_auroc", "pixel_auroc", "aupro")


@dataclass
class TestSet:
    labels: list[int]
    masks: list[np.ndarray]  # (S, S) bool; tiled: (map_size, map_size)
    encoded: list[Encoded]  # per image, with features


def encode_test(detector: Detector, samples: list[Sample], batch_size: int, progress: bool) -> TestSet:
    m = detector.manifest
    samples = with_vocabulary(samples, Vocabulary(m.defect_names))
    loader = DataLoader(AnomalyDataset(samples, size=m.image_size, mean=m.mean, std=m.std), batch_size=batch_size)
    enc = TestSet([], [], [])
    allowed = np.ones(len(m.vocabulary), bool)
    for pixels, class_mask, labels, _ in tqdm(loader, desc="encode", disable=not progress, leave=False):
        out = detector.infer(pixels.numpy(), np.broadcast_to(allowed, (len(labels), len(allowed))), features=True)
        for i in range(len(labels)):
            enc.labels.append(int(labels[i]))
            enc.masks.append(class_mask[i].numpy() != 0)
            enc.encoded.append(Encoded(out.item(i)))
    return enc


def encode_test_tiled(detector: Detector, samples: list[Sample], tiling: Tiling, map_size: int, batch_size: int,
                      progress: bool) -> TestSet:
    """The test images through the served tiled path; truth drawn at map_size x map_size."""
    samples = with_vocabulary(samples, Vocabulary(detector.manifest.defect_names))
    encoded = encode_tiled(detector, [Upload(str(s.image), s.image.read_bytes()) for s in samples], tiling,
                           batch_size, progress)
    masks = []
    for s in samples:
        with Image.open(s.image) as im:
            stored = im.size  # the mask's grid is the stored file's (as training.detector_eval reads it)
        masks.append(truth(s, (map_size, map_size), stored)[0] != 0)
    return TestSet([int(s.label != 0) for s in samples], masks, encoded)


def zero_shot(detector: Detector, e: Encoded, policy: Policy) -> tuple[float, np.ndarray]:
    """DAPO alone (K = 0): its image score and map, tiled as served when the images are."""
    if e.tiles is None:
        return dapo_image_score(e.outputs, policy.image_score), e.outputs.anomaly_map[0]
    value, anomaly, _ = detector.tiled_dapo(e.outputs, policy, e.tiles)
    return value, anomaly


def row_scores(b: Branches, info, row: str) -> tuple[float, np.ndarray | None]:
    if row == "dapo":
        return b.dapo_image, b.dapo_map
    if row == "nn_patch":
        return b.nn_patch_max, b.nn_map
    if row == "nn_global":
        return b.nn_global, None
    score, amap = b.fused(info, row.removeprefix("fused_"))
    return score, amap


def split_references(samples: list[Sample], reference_samples: list[Sample] | None, n: int
                     ) -> tuple[dict[str, list[Sample]], list[Sample]]:
    """(per category: its reference pool, sorted), and the test samples."""
    pool_from = reference_samples if reference_samples is not None else samples
    pools: dict[str, list[Sample]] = defaultdict(list)
    for s in sorted(pool_from, key=lambda s: str(s.image)):
        if s.label == 0 and len(pools[s.product]) < n:
            pools[s.product].append(s)
    held = {str(s.image) for p in pools.values() for s in p} if reference_samples is None else set()
    return pools, [s for s in samples if str(s.image) not in held]


def few_shot(detector: Detector, samples: list[Sample], ks: list[int], reference_samples: list[Sample] | None = None,
             batch_size: int = 16, coreset_limit: int | None = None, progress: bool = False,
             tiling: Tiling | None = None, map_size: int | None = None) -> dict:
    """{"table": {K: {row: {metric: mean over categories}}}, "per_product": {...}, "references": {...}}."""
    from training.references import DEFAULT_CORESET_LIMIT

    pools, test = split_references(samples, reference_samples, max(ks))
    search = search_for(detector)
    holder = ReferenceSet({}, search)
    policy = reference_policy(detector, tiling)
    size = map_size or detector.manifest.image_size
    by_product: dict[str, list[Sample]] = defaultdict(list)
    for s in test:
        by_product[s.product].append(s)
    per_product: dict[int, dict[str, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    used: dict[str, int] = {}
    for product, items in sorted(by_product.items()):
        enc = (encode_test_tiled(detector, items, tiling, size, batch_size, progress) if tiling is not None
               else encode_test(detector, items, batch_size, progress))
        pool = pools.get(product, [])
        paths = [s.image for s in pool]
        pool_outs = encode_good(detector, paths, ReferenceOptions(1, tiling=tiling)) if paths else []
        used[product] = len(pool)
        for k in ks:
            if k == 0:
                per_product[0][product]["dapo"] = _metrics(enc, [zero_shot(detector, e, policy)
                                                                 for e in enc.encoded])
                continue
            if len(pool) < 1:
                continue
            opts = ReferenceOptions(min(k, len(pool)), coreset_limit or DEFAULT_CORESET_LIMIT, tiling=tiling)
            built = product_references(detector, search, paths[:opts.images], opts, encoded=pool_outs[:opts.images])
            branches = [image_branches(detector, holder, e, built.bank, policy) for e in enc.encoded]
            for row in ROWS:
                per_product[k][product][row] = _metrics(enc, [row_scores(b, built.bank.info, row) for b in branches])
    table = {k: {row: mean_over({p: r[row] for p, r in prods.items() if row in r}, list(KEYS))
                 for row in (("dapo",) if k == 0 else ROWS)} for k, prods in per_product.items()}
    return {"table": table, "per_product": {k: dict(v) for k, v in per_product.items()}, "references": used}


def _metrics(enc: TestSet, scored: list[tuple[float, np.ndarray | None]]) -> dict:
    labels = np.array(enc.labels)
    scores = np.array([s for s, _ in scored])
    shape = enc.masks[0].shape  # a tiled image's stitched map is resized to the truth's grid
    maps = None if scored[0][1] is None else np.stack([resize_map(m, shape[::-1]) for _, m in scored])
    res = binary_metrics(labels, scores, np.stack(enc.masks) if maps is not None else None, maps)
    return {k: float(res.get(k, math.nan)) for k in KEYS}


def format_few_shot(result: dict) -> str:
    lines = [f"{'K':>3} {'branch':<11}" + "".join(f"{k:>13}" for k in KEYS)]
    for k in sorted(result["table"]):
        for row, vals in result["table"][k].items():
            lines.append(f"{k:>3} {row:<11}" + "".join(
                f"{'n/a':>13}" if math.isnan(vals.get(m, math.nan)) else f"{vals[m]:>13.3f}" for m in KEYS))
    return "\n".join(lines)

