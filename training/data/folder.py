"""The custom layout (what a customer drops in, and what ``dapo synth`` writes):

    <root>/<product>/good/*.png
    <root>/<product>/<defect_type>/*.png
    <root>/<product>/ground_truth/<defect_type>/<stem>[_mask].png      (optional)

The defect folder name is the defect word ('faulty_imprint' -> 'faulty imprint') unless a table
or a {folder: word} mapping is given, in which case an unmapped folder raises. A defective
image without a mask is kept with ``mask=None`` (image loss only).

Folders the service writes (samples kept by policy, operator feedback) hold a ``<stem>.json``
sidecar beside each image, written last. In such a folder (one that holds sidecars) an image
whose sidecar is missing or does not parse was cut short by a crash: it is skipped with an
``IncompleteSampleWarning`` (the service removes it at its next start).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterable, Mapping

from .common import DataLayoutError, Sample, check_mask_sizes, find_mask, list_images, require_dir
from .vocab import DefectTable, Vocabulary, folder_table, get_table, word_form

GOOD = "good"
GROUND_TRUTH = "ground_truth"


class IncompleteSampleWarning(UserWarning):
    """An image of a service samples folder without a readable sidecar (a crash mid-write)."""


def _readable_json(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def complete_images(folder: Path, images: list[Path]) -> list[Path]:
    """`images` less the incomplete samples, when `folder` is a service samples folder."""
    if not any(folder.glob("*.json")):
        return images  # a customer's folder: no sidecars at all
    kept = []
    for image in images:
        if _readable_json(image.with_suffix(".json")):
            kept.append(image)
        else:
            warnings.warn(f"{image}: incomplete sample (no readable sidecar {image.with_suffix('.json').name}); "
                          "skipped", IncompleteSampleWarning, stacklevel=3)
    return kept


def _table(table) -> DefectTable | None:
    if table is None:
        return None
    if isinstance(table, Mapping):
        return folder_table(table)
    return get_table(table)


def load_folder(
    root: str | Path,
    *,
    products: Iterable[str] | None = None,
    defects: Iterable[str] | None = None,
    include_good: bool = True,
    table: str | DefectTable | Mapping[str, str] | None = None,
    vocab: Vocabulary | None = None,
    check_sizes: bool = True,
) -> list[Sample]:
    """Samples of a custom folder tree.

    ``products``: product folders to read (default: every sub-folder of root).
    ``defects``: keep only these defect words / folder names (good images are kept unless
    ``include_good`` is False). ``vocab``: class-id numbering (default: the words found, sorted;
    pass one explicitly to keep ids stable across splits). ``check_sizes``: compare every mask's
    size with its image's (header reads only).
    """
    root = require_dir(Path(root), "data set root")
    tbl = _table(table)
    if products is None:
        prods = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not prods:
            raise DataLayoutError(root, "no product folders (expected <root>/<product>/good/)")
    else:
        prods = list(products)
    keep = None if defects is None else {word_form(d) for d in defects}

    found: list[tuple[Path, Path | None, str, str | None, str]] = []
    for prod in prods:
        pdir = require_dir(root / prod, f"product {prod!r}")
        class_dirs = sorted(
            d for d in pdir.iterdir()
            if d.is_dir() and not d.name.startswith(".") and d.name != GROUND_TRUTH
        )
        if not class_dirs:
            raise DataLayoutError(pdir, "no class folders (expected good/ and <defect_type>/)")
        for cdir in class_dirs:
            images = complete_images(cdir, list_images(cdir))
            if not images and any(d.is_dir() for d in cdir.iterdir()):
                raise DataLayoutError(
                    cdir, "holds folders, not images: is this an MVTec-style tree? (use the mvtec loader)"
                )
            if cdir.name == GOOD:
                if include_good:
                    found += [(p, None, prod, None, GOOD) for p in images]
                continue
            word = tbl.map(prod, cdir.name, where=cdir) if tbl else word_form(cdir.name)
            if keep is not None and word not in keep and word_form(cdir.name) not in keep:
                continue
            gt = pdir / GROUND_TRUTH / cdir.name
            for p in images:
                found.append((p, find_mask(gt, p.stem), prod, word, cdir.name))
    if vocab is None:
        vocab = tbl.vocabulary() if tbl else Vocabulary(sorted({w for *_, w, _ in found if w}))
    samples = [
        Sample(img, mask, prod, word, int(word is not None),
               vocab.class_id(word, where=img) if word else 0, raw)
        for img, mask, prod, word, raw in found
    ]
    if check_sizes:
        check_mask_sizes(samples)
    return samples
