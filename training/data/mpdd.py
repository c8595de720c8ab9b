"""MPDD (metal parts defect detection) layout: MVTec-like folders.

    <root>/<category>/{train/good, test/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png}

Categories: bracket_black, bracket_brown, bracket_white, connector, metal_plate, tubes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .common import Sample
from .mvtec import load_mvtec_like
from .vocab import MPDD, Vocabulary


def load_mpdd(
    root: str | Path,
    *,
    split: str = "test",
    categories: Iterable[str] | None = None,
    vocab: Vocabulary | None = None,
    require_masks: bool = True,
) -> list[Sample]:
    """MPDD samples with defect folders mapped onto the MPDD words."""
    return load_mvtec_like(
        root, MPDD, split=split, categories=categories, vocab=vocab, require_masks=require_masks
    )
