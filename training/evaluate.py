"""`dapo eval`: the paper's metrics, measured on a baked artifact through the serving code.

Images go through the runtime's `Detector` (the artifact's backend, ONNX Runtime by default, and
the service's scoring policy: product filter, smoothing, image-score mode), so what is measured
is what is served. The data set's own loader reads images and ground-truth masks together; it
preprocesses with `service.runtime.imaging.preprocess` and the artifact's constants, as the
Detector does. Metrics are
computed per category (product) and averaged, as the paper reports them:
image AUROC / AP / max-F1, pixel AUROC, AUPRO (FPR <= 0.3), and multi-type pixel macro
AUROC / AP / F1 with per-defect-type values.
"""
from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader
from tqdm import tqdm

from service.runtime.detector import Detector, RuntimeOptions
from service.runtime.scoring import Policy
from training.data import AnomalyDataset, Sample, Vocabulary, with_vocabulary
from training.metrics import binary_metrics, mean_over, multitype_pixel_metrics

SUMMARY_KEYS = ("image_auroc", "image_ap", "image_max_f1", "pixel_auroc", "aupro", "mt_auroc", "mt_ap", "mt_f1")


class _Collector:
    """Per-product arrays at the model resolution (float16 class maps to bound memory)."""

    def __init__(self):
        self.labels, self.scores, self.masks, self.maps, self.gt, self.probs = [], [], [], [], [], []

    def add(self, label, score, has_mask, class_mask, amap, probs):
        self.labels.append(label)
        self.scores.append(score)
        if has_mask:
            self.masks.append(class_mask != 0)
            self.maps.append(amap.astype(np.float32))
            self.gt.append(class_mask)
            self.probs.append(probs.astype(np.float16))


def run_artifact(artifact: str | Path | Detector, samples: list[Sample], backend: str = "onnxruntime",
                 batch_size: int = 16, sigma: float | None = None, use_products: bool = True, progress: bool = True,
                 image_score: str | None = None, map_size: int | None = None) -> dict[str, _Collector]:
    """Per product, the scores and model-size maps of every sample (`sigma` and `image_score`
    override the manifest's; `use_products` False lets every vocabulary type compete).

    Tiled products (and every product when `map_size` is given: pixel metrics on one common
    map_size x map_size grid) go through the Detector's own stages (`training.detector_eval`),
    their maps at the stitched size; the rest through the batched data set loader."""
    detector = artifact if isinstance(artifact, Detector) else Detector.load(artifact, RuntimeOptions(backend=backend))
    manifest = detector.manifest
    samples = with_vocabulary(samples, Vocabulary(manifest.defect_names))  # unknown words raise, naming the image
    policies: dict[str, Policy] = {}

    def policy_for(product: str) -> Policy:
        if product not in policies:
            known = use_products and product in manifest.products
            policies[product] = detector.policy(product if known else None, gaussian_sigma=sigma,
                                                image_score=image_score)
        return policies[product]

    per_product: dict[str, _Collector] = defaultdict(_Collector)
    direct = [s for s in samples if map_size or policy_for(s.product).tiling is not None]
    if direct:
        from training.detector_eval import evaluate_samples

        for ev in tqdm(evaluate_samples(detector, direct, policy_for, map_size), total=len(direct), desc="eval tiled",
                       disable=not progress, leave=False):
            allowed = policy_for(ev.sample.product).allowed
            per_product[ev.sample.product].add(ev.sample.label, ev.scores.anomaly_score, ev.has_mask, ev.class_mask,
                                               ev.scores.anomaly_map, competing(ev.scores.class_probs, allowed))
        samples = [s for s in samples if not (map_size or policy_for(s.product).tiling is not None)]
        if not samples:
            return per_product
    dataset = AnomalyDataset(samples, size=manifest.image_size, mean=manifest.mean, std=manifest.std)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    index = 0
    for pixels, class_mask, labels, has_mask in tqdm(loader, desc="eval", disable=not progress, leave=False):
        batch = samples[index:index + len(labels)]
        index += len(labels)
        allowed = np.stack([policy_for(s.product).allowed for s in batch])
        out = detector.infer(pixels.numpy(), allowed, class_probs=True)
        for i, s in enumerate(batch):
            scores = detector.score(out.item(i), policy_for(s.product))
            per_product[s.product].add(int(labels[i]), scores.anomaly_score, bool(has_mask[i]),
                                       class_mask[i].numpy(), scores.anomaly_map,
                                       competing(scores.class_probs, allowed[i]))
    return per_product


def competing(class_probs: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Class maps (C, S, S) with the classes the product excludes set to -1, as the served type
    map's head masks them: the multi-type argmax (F1) then picks only among the classes that
    compete when serving, so the metric measures what is served."""
    return np.where(allowed[:, None, None], class_probs, np.float32(-1.0))


def metrics_for(c: _Collector, class_names: list[str]) -> dict:
    masks = np.stack(c.masks) if c.masks else None
    maps = np.stack(c.maps) if c.maps else None
    res = binary_metrics(np.array(c.labels), np.array(c.scores), masks, maps)
    if c.gt:
        mt = multitype_pixel_metrics(np.stack(c.gt), np.stack(c.probs).astype(np.float32), class_names=class_names)
        res |= {"mt_auroc": mt["auroc"], "mt_ap": mt["ap"], "mt_f1": mt["f1"], "per_type": mt["per_class"]}
        res["notes"] |= mt["notes"]
    res["images"] = len(c.labels)
    return res


def evaluate(artifact: str | Path, samples: list[Sample], **kwargs) -> dict:
    """{'per_product': {p: metrics}, 'mean': {metric: value}, 'per_type': {word: mean metrics}}."""
    detector = Detector.load(artifact, RuntimeOptions(backend=kwargs.pop("backend", "onnxruntime"),
                                                      precision=kwargs.pop("precision", "fp32")))
    class_names = detector.class_names
    collected = run_artifact(detector, samples, **kwargs)
    per_product = {p: metrics_for(c, class_names) for p, c in sorted(collected.items())}
    per_type: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for res in per_product.values():
        for word, vals in res.get("per_type", {}).items():
            for k in ("auroc", "ap", "f1"):
                per_type[word][k].append(vals[k])
    type_means = {w: {k: float(np.nanmean(v)) if not all(map(math.isnan, v)) else math.nan for k, v in d.items()}
                  for w, d in per_type.items()}
    return {"artifact": str(artifact), "per_product": per_product,
            "mean": mean_over(per_product, list(SUMMARY_KEYS)), "per_type": type_means}


def format_table(result: dict) -> str:
    """A per-category table (percentages), the mean last."""
    header = ["category", *SUMMARY_KEYS]
    rows = [[p, *(r.get(k, math.nan) for k in SUMMARY_KEYS)] for p, r in result["per_product"].items()]
    rows.append(["mean", *(result["mean"].get(k, math.nan) for k in SUMMARY_KEYS)])
    width = max(len(h) for h in header) + 1
    lines = ["".join(h.ljust(width) for h in header)]
    for r in rows:
        lines.append(str(r[0]).ljust(width) + "".join(
            ("  n/a" if math.isnan(v) else f"{100 * v:5.1f}").ljust(width) for v in r[1:]))
    return "\n".join(lines)


def write_reports(result: dict, json_path: str | Path | None, csv_path: str | Path | None) -> None:
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2, default=float, allow_nan=True))
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["category", *SUMMARY_KEYS])
            for p, r in [*result["per_product"].items(), ("mean", result["mean"])]:
                w.writerow([p, *(r.get(k, "") for k in SUMMARY_KEYS)])
