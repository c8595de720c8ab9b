"""AnomalyCLIP-style meta.json layout:

    <root>/meta.json  {"train": {cls: [item, ...]}, "test": {cls: [item, ...]}}
    item = {"img_path": "bottle/test/broken_large/000.png",
            "mask_path": "bottle/ground_truth/broken_large/000_mask.png" or "",
            "cls_name": "bottle", "specie_name": "broken_large", "anomaly": 0 | 1}

Paths are relative to <root>. ``specie_name`` is mapped onto defect words with a vocabulary
table: a data-set name ('mvtec', 'visa', ...), a DefectTable, a {name: word} dict, 'auto' (the
first table among mvtec, mpdd, mad, realiad, visa that maps every name), or None (the name
itself, underscores as spaces, is the word). An anomalous item with an empty or generic
specie_name ('', 'anomaly', 'bad', 'defect') has an unknown type.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

from .common import DataLayoutError, Sample, UNKNOWN_DEFECT, read_json, require_dir
from .vocab import (
    MAD, MPDD, MVTEC, REALIAD, VISA, DefectTable, Vocabulary, folder_table, get_table, word_form,
)

GENERIC = {"", "anomaly", "anomalous", "bad", "defect", "defective", "abnormal", "ng"}
AUTO_ORDER = (MVTEC, MPDD, MAD, REALIAD, VISA)


def _resolve_table(table, pairs: list[tuple[str, str, Path]]) -> DefectTable | None:
    if table is None:
        return None
    if isinstance(table, Mapping):
        return folder_table(table, "meta.json mapping")
    if isinstance(table, DefectTable):
        return table
    if table != "auto":
        return get_table(table)
    best, best_hits = None, -1
    for cand in AUTO_ORDER:
        hits = sum(cand.lookup(c, s) is not None for c, s, _ in pairs)
        if hits == len(pairs):
            return cand
        if hits > best_hits:
            best, best_hits = cand, hits
    for c, s, where in pairs:  # report the first name the best table cannot map
        best.map(c, s, where=where)
    return best  # unreachable


def load_meta_json(
    root: str | Path,
    *,
    split: str = "test",
    meta_path: str | Path | None = None,
    classes: Iterable[str] | None = None,
    table: str | DefectTable | Mapping[str, str] | None = "auto",
    vocab: Vocabulary | None = None,
    mask_nonzero: bool = False,
    check_files: bool = True,
) -> list[Sample]:
    """Samples of ``split`` ('train' | 'test' | 'all') listed in meta.json."""
    root = require_dir(Path(root), "data set root")
    mpath = Path(meta_path) if meta_path is not None else root / "meta.json"
    meta = read_json(mpath, "meta.json")
    splits = ("train", "test") if split == "all" else (split,)
    want = set(classes) if classes is not None else None
    items: list[tuple[str, dict]] = []
    for sp in splits:
        if sp not in meta or not isinstance(meta[sp], dict):
            raise DataLayoutError(mpath, f"no {sp!r} section (expected {{'{sp}': {{class: [items]}}}})")
        for cls, lst in meta[sp].items():
            if want is not None and cls not in want:
                continue
            for k, it in enumerate(lst):
                if not isinstance(it, dict) or "img_path" not in it or "anomaly" not in it:
                    raise DataLayoutError(mpath, f"{sp}/{cls}[{k}] lacks img_path/anomaly")
                items.append((f"{sp}/{cls}[{k}]", it))
    if want is not None:
        missing = want - {it.get("cls_name") or key.split("/")[1].split("[")[0] for key, it in items}
        if missing:
            raise DataLayoutError(mpath, f"no items for class(es) {sorted(missing)}")

    pairs = []
    for key, it in items:
        sp_name = str(it.get("specie_name", "") or "")
        if int(it["anomaly"]) == 1 and sp_name.strip().lower() not in GENERIC:
            pairs.append((it.get("cls_name", ""), sp_name, root / it["img_path"]))
    tbl = _resolve_table(table, pairs)
    if vocab is None:
        if tbl is not None:
            vocab = tbl.vocabulary()
        else:
            vocab = Vocabulary(sorted({word_form(s) for _, s, _ in pairs}))

    samples: list[Sample] = []
    for key, it in items:
        cls = it.get("cls_name") or key.split("/")[1].split("[")[0]
        image = root / it["img_path"]
        if check_files and not image.is_file():
            raise DataLayoutError(image, f"image listed in {mpath} ({key}) does not exist")
        label = int(it["anomaly"])
        if label not in (0, 1):
            raise DataLayoutError(mpath, f"{key}: anomaly must be 0 or 1, got {it['anomaly']!r}")
        sp_name = str(it.get("specie_name", "") or "")
        mrel = it.get("mask_path") or ""
        if label == 0:
            samples.append(Sample(image, None, cls, None, 0, 0, sp_name or "good", mask_nonzero=mask_nonzero))
            continue
        mask = root / mrel if mrel else None
        if mask is not None and check_files and not mask.is_file():
            raise DataLayoutError(mask, f"mask listed in {mpath} ({key}) does not exist")
        if sp_name.strip().lower() in GENERIC:
            word = None
        elif tbl is None:
            word = word_form(sp_name)
        else:
            word = tbl.map(cls, sp_name, where=image)
        cid = vocab.class_id(word, where=image) if word else UNKNOWN_DEFECT
        samples.append(Sample(image, mask, cls, word, 1, cid, sp_name, mask_nonzero=mask_nonzero))
    return samples
