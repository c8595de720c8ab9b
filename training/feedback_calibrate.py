"""`dapo calibrate --feedback DB`: per-product thresholds re-derived with what operators confirmed.

The rule is `calibrate`'s own (a quantile of the scores good parts get), applied to a good set
that now includes the operators' verdicts:

- good parts: images confirmed good (`correct` on an OK answer) and false positives (good parts
  the model flagged: the images the threshold must learn from), plus any `--data` good parts;
- confirmed defects (`correct` on a flagged answer, `false_negative`, `wrong_type`) do not set
  the threshold; they are scored to report what the new threshold would miss.

The images are the labelled samples the service wrote (`<samples_dir>/feedback/`), scored again
by the artifact, so the thresholds match the model being calibrated even if the feedback was
given on an older one. Feedback on requests without a product is reported and not used:
thresholds are per product.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.runtime.artifact import Manifest, load_manifest
from service.runtime.scoring import product_settings
from training.calibrate import calibrate
from training.data import Sample
from training.evaluate import run_artifact

GOOD = "good"


@dataclass(frozen=True)
class FeedbackImage:
    """One feedback row, as calibration needs it (the CLI maps database rows to these)."""

    path: Path | None  # the labelled sample on disk; None when it was not written
    product: str | None
    label: str  # "good" or the true defect type
    verdict: str


def thresholds(manifest: Manifest, product: str) -> tuple[float, float | None]:
    """(image, pixel) thresholds in force for a product (the artifact's defaults for one it
    does not list yet: calibration adds it)."""
    s = product_settings(manifest, product if product in manifest.products else None)
    return s.image_threshold, s.pixel_threshold


def usable(images: list[FeedbackImage]) -> tuple[list[FeedbackImage], Counter]:
    """The rows that can be used, and why the others cannot."""
    keep, skipped = [], Counter()
    for img in images:
        if img.product is None:
            skipped["no_product"] += 1
        elif img.path is None:
            skipped["no_sample_written"] += 1
        elif not Path(img.path).is_file():
            skipped["sample_file_missing"] += 1
        else:
            keep.append(img)
    return keep, skipped


def as_sample(img: FeedbackImage) -> Sample:
    if img.label == GOOD:
        return Sample(Path(img.path), None, img.product, None, 0, 0, "feedback")
    return Sample(Path(img.path), None, img.product, img.label, 1, 1, "feedback")  # re-numbered by run_artifact


def recalibrate(artifact: str | Path, images: list[FeedbackImage], extra_good: list[Sample] | None = None,
                image_quantile: float = 0.99, pixel_quantile: float = 0.999, backend: str = "onnxruntime",
                progress: bool = False) -> dict:
    """Update the manifest's per-product thresholds; report per product how they moved and what
    the new image threshold does to the feedback images (false positives still flagged,
    confirmed defects missed)."""
    keep, skipped = usable(images)
    good = [as_sample(i) for i in keep if i.label == GOOD]
    if not good and not extra_good:
        raise ValueError("no confirmed good parts or false positives with a product and a sample on disk "
                         f"(skipped: {dict(skipped)})")
    before = load_manifest(artifact, verify=False)
    table = calibrate(artifact, (extra_good or []) + good, image_quantile, pixel_quantile, backend=backend,
                      progress=progress)
    after = load_manifest(artifact, verify=False)
    scored = run_artifact(artifact, [as_sample(i) for i in keep], backend=backend, use_products=True,
                          progress=progress)
    verdicts: dict[str, Counter] = defaultdict(Counter)
    for img in keep:
        verdicts[img.product][img.verdict] += 1
    report = {}
    for product, entry in table.items():
        (img_before, pix_before), (img_after, pix_after) = thresholds(before, product), thresholds(after, product)
        report[product] = {
            "image_threshold": {"before": img_before, "after": img_after},
            "pixel_threshold": {"before": pix_before, "after": pix_after},
            "good_images": entry["images"], "feedback": dict(verdicts[product]),
            **_effect(scored.get(product), keep, product, img_after)}
    return {"products": report, "skipped": dict(skipped), "image_quantile": image_quantile}


def _effect(collected, keep: list[FeedbackImage], product: str, threshold: float) -> dict:
    """Among this product's feedback images (in run_artifact's order): false positives still at or
    above the new threshold, confirmed defects below it."""
    if collected is None:
        return {}
    mine = [i for i in keep if i.product == product]
    scores = np.asarray(collected.scores)
    fp = np.array([i.verdict == "false_positive" for i in mine])
    defect = np.array([i.label != GOOD for i in mine])
    return {"false_positives_still_flagged": int((scores[fp] >= threshold).sum()),
            "false_positives": int(fp.sum()),
            "defects_missed": int((scores[defect] < threshold).sum()), "defects": int(defect.sum())}
