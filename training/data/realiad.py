"""Real-IAD layout: one JSON list per category.

    <json_dir>/<category>.json   {"meta": {"prefix": "", "normal_class": "OK", ...},
                                  "train": [{"category", "anomaly_class", "image_path",
                                             "mask_path"}, ...],
                                  "test":  [...]}
    <image_root>/<prefix><image_path>, <image_root>/<prefix><mask_path>

``anomaly_class`` is "OK" for good images, otherwise a two-letter code (AK pit, BX deformation,
CH abrasion, HS scratch, PS damage, QS missing parts, YW foreign objects, ZW contamination).
Defaults: ``json_dir`` = the first of <root>/realiad_jsons/realiad_jsons, <root>/realiad_jsons,
<root> that holds *.json; ``image_root`` = <root>/realiad_1024 if present, else <root>.
Masks are read as "non-zero = defect".
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .common import DataLayoutError, Sample, UNKNOWN_DEFECT, read_json, require_dir
from .vocab import REALIAD, Vocabulary


def _default_json_dir(root: Path) -> Path:
    for cand in (root / "realiad_jsons" / "realiad_jsons", root / "realiad_jsons", root):
        if cand.is_dir() and any(cand.glob("*.json")):
            return cand
    raise DataLayoutError(root, "no Real-IAD JSON lists found (looked in realiad_jsons/realiad_jsons, realiad_jsons, and the root)")


def load_realiad(
    root: str | Path,
    *,
    split: str = "test",
    json_dir: str | Path | None = None,
    image_root: str | Path | None = None,
    categories: Iterable[str] | None = None,
    vocab: Vocabulary | None = None,
    require_masks: bool = False,
    check_files: bool = True,
) -> list[Sample]:
    """Real-IAD samples of ``split`` ('train' | 'test' | 'all') from the per-category JSONs."""
    root = require_dir(Path(root), "Real-IAD root")
    jdir = require_dir(Path(json_dir), "Real-IAD JSON folder") if json_dir else _default_json_dir(root)
    if image_root is None:
        iroot = root / "realiad_1024" if (root / "realiad_1024").is_dir() else root
    else:
        iroot = require_dir(Path(image_root), "Real-IAD image root")
    vocab = vocab or REALIAD.vocabulary()
    if categories is None:
        files = sorted(jdir.glob("*.json"))
    else:
        files = [jdir / f"{c}.json" for c in categories]
    splits = ("train", "test") if split == "all" else (split,)
    samples: list[Sample] = []
    for jf in files:
        data = read_json(jf, "category JSON")
        meta = data.get("meta", {}) or {}
        prefix = meta.get("prefix", "") or ""
        normal = str(meta.get("normal_class", "OK")).lower()
        for sp in splits:
            if sp not in data:
                raise DataLayoutError(jf, f"no {sp!r} list (has {sorted(k for k in data if k != 'meta')})")
            for k, item in enumerate(data[sp]):
                try:
                    img_rel, cls = item["image_path"], str(item["anomaly_class"])
                except (KeyError, TypeError):
                    raise DataLayoutError(jf, f"{sp}[{k}] lacks image_path/anomaly_class") from None
                product = item.get("category") or jf.stem
                image = iroot / f"{prefix}{img_rel}"
                if check_files and not image.is_file():
                    raise DataLayoutError(image, f"image listed in {jf} ({sp}[{k}]) does not exist")
                if cls.lower() in (normal, "ok", "good", "normal"):
                    samples.append(Sample(image, None, product, None, 0, 0, cls, mask_nonzero=True))
                    continue
                word = REALIAD.map(product, cls, where=image)
                mrel = item.get("mask_path")
                mask = iroot / f"{prefix}{mrel}" if mrel else None
                if mask is not None and check_files and not mask.is_file():
                    raise DataLayoutError(mask, f"mask listed in {jf} ({sp}[{k}]) does not exist")
                if mask is None and require_masks:
                    raise DataLayoutError(image, f"defective image without mask_path in {jf}")
                cid = vocab.class_id(word, where=image) if word else UNKNOWN_DEFECT
                samples.append(Sample(image, mask, product, word, 1, cid, cls, mask_nonzero=True))
    return samples
