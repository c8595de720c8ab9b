"""MVTec AD layout (also the shape MPDD and MAD use):

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect>/<stem>.png
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png

The training protocol (METHOD.md) uses the *test* split: all images, good and defective.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .common import (
    DataLayoutError,
    Sample,
    find_mask,
    list_images,
    require_dir,
)
from .vocab import MVTEC, DefectTable, Vocabulary, get_table

GOOD = "good"


def find_categories(root: Path, marker_dirs: Iterable[str] = ("test", "train")) -> list[str]:
    """Sub-folders of ``root`` that contain one of ``marker_dirs``, sorted."""
    root = require_dir(Path(root), "data set root")
    cats = sorted(
        p.name for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and any((p / m).is_dir() for m in marker_dirs)
    )
    if not cats:
        raise DataLayoutError(root, f"no category folders (none contains {'/'.join(marker_dirs)}/)")
    return cats


def load_mvtec_like(
    root: str | Path,
    table: DefectTable | str,
    *,
    split: str = "test",
    categories: Iterable[str] | None = None,
    vocab: Vocabulary | None = None,
    require_masks: bool = True,
    mask_suffixes: tuple[str, ...] = ("_mask", ""),
) -> list[Sample]:
    """Samples of an MVTec-shaped tree.

    ``split``: 'test' (good + defective, with masks) or 'train' (train/good only).
    ``vocab``: numbering of class ids (default: the table's own vocabulary).
    ``require_masks``: a defective image without ``ground_truth/<defect>/<stem><suffix>.png``
    raises; when False it gets ``mask=None`` (has_mask False in the Dataset).
    """
    root = Path(root)
    table = get_table(table)
    vocab = vocab or table.vocabulary()
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    cats = list(categories) if categories is not None else find_categories(root)
    samples: list[Sample] = []
    for cat in cats:
        cdir = require_dir(root / cat, f"category {cat!r}")
        sdir = require_dir(cdir / split, f"{split} split of {cat!r}")
        if split == "train":
            gdir = require_dir(sdir / GOOD, f"train/good of {cat!r}")
            samples += [Sample(p, None, cat, None, 0, 0, GOOD) for p in list_images(gdir)]
            continue
        defect_dirs = sorted(p for p in sdir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not defect_dirs:
            raise DataLayoutError(sdir, "no class folders (expected good/ and <defect>/)")
        for ddir in defect_dirs:
            images = list_images(ddir)
            if ddir.name == GOOD:
                samples += [Sample(p, None, cat, None, 0, 0, GOOD) for p in images]
                continue
            word = table.map(cat, ddir.name, where=ddir)
            cid = vocab.class_id(word, where=ddir)
            gt_dir = cdir / "ground_truth" / ddir.name
            if require_masks and images:
                require_dir(gt_dir, f"ground truth of {cat}/{ddir.name}")
            for p in images:
                mask = find_mask(gt_dir, p.stem, mask_suffixes)
                if mask is None and require_masks:
                    raise DataLayoutError(
                        gt_dir / f"{p.stem}{mask_suffixes[0]}.png", f"missing mask for {p}"
                    )
                samples.append(Sample(p, mask, cat, word, 1, cid, ddir.name))
    return samples


def load_mvtec(
    root: str | Path,
    *,
    split: str = "test",
    categories: Iterable[str] | None = None,
    vocab: Vocabulary | None = None,
    require_masks: bool = True,
) -> list[Sample]:
    """MVTec AD samples (15 categories auto-detected), defect folders mapped onto the 20 words."""
    return load_mvtec_like(
        root, MVTEC, split=split, categories=categories, vocab=vocab, require_masks=require_masks
    )
