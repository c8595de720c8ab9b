"""VisA layout, as described by its split CSVs:

    <root>/split_csv/1cls.csv        header: object,split,label,image,mask
                                     label: normal | anomaly; paths relative to <root>
    <root>/<object>/image_anno.csv   (optional) header: image,label,mask; 'label' is the free-text
                                     defect description ("small scratches", "burnt", ...)
    <root>/<object>/Data/Images/{Normal,Anomaly}/*.JPG, <root>/<object>/Data/Masks/Anomaly/*.png

The split CSV carries no defect type; it comes from ``image_anno.csv`` when present and is mapped
onto the 18 VisA words. Without it a defective sample has ``defect=None`` (class id
UNKNOWN_DEFECT: fine for binary metrics, ignored by the multi-class loss). VisA masks mark
defects with small non-zero values, so they are read as "non-zero = defect".
"""
from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath
from typing import Iterable

from .common import DataLayoutError, Sample, UNKNOWN_DEFECT, require_dir
from .vocab import VISA, Vocabulary

NORMAL_LABELS = {"normal", "good", "ok", "0"}
ANOMALY_LABELS = {"anomaly", "abnormal", "bad", "defect", "ng", "1"}


def _rel(p: str) -> str:
    return str(PurePosixPath(p.strip().replace("\\", "/"))).lstrip("/").lower()


def _read_csv(path: Path, required: Iterable[str]) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [h.strip().lower() for h in (reader.fieldnames or [])]
            missing = [c for c in required if c not in fields]
            if missing:
                raise DataLayoutError(path, f"CSV lacks column(s) {missing}; has {fields}")
            return [
                {k.strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
                for row in reader
            ]
    except FileNotFoundError:
        raise DataLayoutError(path, "missing file") from None


def read_image_anno(root: Path, obj: str) -> dict[str, str] | None:
    """{relative image path (lower case): description} and {file name: description} from
    ``<root>/<obj>/image_anno.csv``; None when the file is absent."""
    path = root / obj / "image_anno.csv"
    if not path.is_file():
        return None
    table: dict[str, str] = {}
    for row in _read_csv(path, ("image", "label")):
        rel = _rel(row["image"])
        table[rel] = row["label"]
        table.setdefault("name:" + PurePosixPath(rel).name, row["label"])
    return table


def load_visa(
    root: str | Path,
    *,
    split: str = "test",
    csv_path: str | Path | None = None,
    objects: Iterable[str] | None = None,
    vocab: Vocabulary | None = None,
    types: str = "auto",
) -> list[Sample]:
    """VisA samples of ``split`` ('train' | 'test' | 'all') from the 1cls split CSV.

    ``types``: 'auto' (use image_anno.csv where present), 'require' (missing annotations raise),
    'ignore' (every defect of unknown type).
    """
    root = require_dir(Path(root), "VisA root")
    if types not in ("auto", "require", "ignore"):
        raise ValueError(f"types must be auto|require|ignore, got {types!r}")
    csv_file = Path(csv_path) if csv_path is not None else root / "split_csv" / "1cls.csv"
    if not csv_file.is_file():
        raise DataLayoutError(csv_file, "missing split CSV (expected split_csv/1cls.csv)")
    vocab = vocab or VISA.vocabulary()
    want = {o for o in objects} if objects is not None else None
    rows = _read_csv(csv_file, ("object", "split", "label", "image", "mask"))
    annos: dict[str, dict[str, str] | None] = {}
    samples: list[Sample] = []
    for i, row in enumerate(rows, start=2):
        obj = row["object"]
        if want is not None and obj not in want:
            continue
        if split != "all" and row["split"].lower() != split:
            continue
        label_txt = row["label"].lower()
        if label_txt in NORMAL_LABELS:
            label = 0
        elif label_txt in ANOMALY_LABELS:
            label = 1
        else:
            raise DataLayoutError(csv_file, f"line {i}: unknown label {row['label']!r} (normal|anomaly)")
        image = root / row["image"]
        if not image.is_file():
            raise DataLayoutError(image, f"image listed in {csv_file} (line {i}) does not exist")
        mask = root / row["mask"] if row["mask"] else None
        if mask is not None and not mask.is_file():
            raise DataLayoutError(mask, f"mask listed in {csv_file} (line {i}) does not exist")
        if label == 0:
            samples.append(Sample(image, None, obj, None, 0, 0, "normal", mask_nonzero=True))
            continue
        word, raw = None, ""
        if types != "ignore":
            if obj not in annos:
                annos[obj] = read_image_anno(root, obj)
            anno = annos[obj]
            if anno is None and types == "require":
                raise DataLayoutError(root / obj / "image_anno.csv", "missing defect annotations")
            if anno is not None:
                rel = _rel(row["image"])
                raw = anno.get(rel) or anno.get("name:" + PurePosixPath(rel).name) or ""
                if not raw and types == "require":
                    raise DataLayoutError(
                        root / obj / "image_anno.csv", f"no entry for {row['image']}"
                    )
                if raw:
                    word = VISA.map(obj, raw, where=image)
        cid = vocab.class_id(word, where=image) if word else UNKNOWN_DEFECT
        samples.append(Sample(image, mask, obj, word, 1, cid, raw, mask_nonzero=True))
    if not samples and rows:
        raise DataLayoutError(csv_file, f"no rows for split {split!r}" + (f" and objects {sorted(want)}" if want else ""))
    return samples
