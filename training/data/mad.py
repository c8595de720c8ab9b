"""MAD (the PAD benchmark's multi-pose LEGO toys), both MAD-Sim and MAD-Real, read as
MVTec-like folders:

    <root>/<category>/train/good/*
    <root>/<category>/test/{good,Burrs,Missing,Stains}/*
    <root>/<category>/ground_truth/{Burrs,Missing,Stains}/<stem>[_mask].png

Folder names are matched case-insensitively (Burrs -> burr, Missing -> missing, Stains -> stain).
Masks are looked up as ``<stem>_mask.png`` then ``<stem>.png``. By default a defective image
without a mask is kept with ``mask=None`` (image loss only); ``require_masks=True`` makes it an
error.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .common import Sample
from .mvtec import load_mvtec_like
from .vocab import MAD, Vocabulary


def load_mad(
    root: str | Path,
    *,
    split: str = "test",
    categories: Iterable[str] | None = None,
    vocab: Vocabulary | None = None,
    require_masks: bool = False,
) -> list[Sample]:
    """MAD-Sim or MAD-Real samples (point ``root`` at the folder holding the 20 categories)."""
    return load_mvtec_like(
        root, MAD, split=split, categories=categories, vocab=vocab, require_masks=require_masks
    )
