"""What every data-set loader shares: the Sample record, layout errors, mask reading and the
torch Dataset the trainer and the evaluator iterate.

One image becomes ``(pixel_values, class_mask, label, has_mask)``:

- ``pixel_values``  float32 (3, S, S), decoded by ``service.runtime.imaging.load`` (the same
  DCT-scaled JPEG decode as the service for large JPEGs) and made by
  ``service.runtime.imaging.preprocess`` (the serving path's own preprocessing), so training,
  evaluation and serving see identical tensors.
- ``class_mask``    int64 (S, S): 0 = normal, k = the defect's class id; ``ignore_index``
  (default -100, torch's CrossEntropy default) where the truth is unknown.
- ``label``         int64 scalar, 0 = good, 1 = defective.
- ``has_mask``      bool scalar. False for a defective image without ground truth: its class
  mask is all ``ignore_index`` and the trainer uses only the image loss for it.

Binary pixel truth, when ``has_mask``: ``class_mask != 0`` (a defect of unknown type, class id
``UNKNOWN_DEFECT``, is written as ``ignore_index`` inside the mask and 0 outside, so it still
counts as defective for binary metrics and Dice, and is skipped by the multi-class focal loss).

Masks are read as floats in [0, 1], resized bilinearly to S x S, and THRESHOLDED at 0.5 before
anything becomes an integer (the reference cast to int first and lost soft edges).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from service.runtime.imaging import load, model_side, preprocess

IGNORE_INDEX = -100
UNKNOWN_DEFECT = -1  # class_id of a defective sample whose defect type is not known
MASK_THRESHOLD = 0.5
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class DataLayoutError(ValueError):
    """A data-set folder that does not match its layout. The message names the path."""

    def __init__(self, path: os.PathLike | str, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class Sample:
    """One image of a data set.

    ``defect`` is the vocabulary word (None for good images and for defective images whose type
    is unknown); ``class_id`` is its index in the Vocabulary (0 = normal, ``UNKNOWN_DEFECT`` = a
    defective image of unknown type). ``raw_name`` keeps the data set's own folder name or
    description. ``mask_nonzero`` says how to read the mask: False = pixel / max-of-dtype
    (soft masks keep their edges), True = any non-zero pixel is a defect (VisA's masks store
    region indices 1, 2, ... rather than 255).
    """

    image: Path
    mask: Path | None
    product: str
    defect: str | None
    label: int
    class_id: int
    raw_name: str = ""
    mask_nonzero: bool = False

    def __post_init__(self) -> None:
        if self.label not in (0, 1):
            raise ValueError(f"{self.image}: label must be 0 or 1, got {self.label!r}")
        if self.label == 0 and self.class_id != 0:
            raise ValueError(f"{self.image}: a good image must have class_id 0, got {self.class_id}")
        if self.label == 1 and self.class_id == 0:
            raise ValueError(f"{self.image}: a defective image cannot have class_id 0 (normal)")


def with_vocabulary(samples: Iterable[Sample], vocab) -> list[Sample]:
    """Re-number class ids of ``samples`` against another Vocabulary (e.g. a union vocabulary
    for training on several data sets). A defect word missing from ``vocab`` raises."""
    out = []
    for s in samples:
        if s.label == 0:
            out.append(s)
        elif s.defect is None:
            out.append(replace(s, class_id=UNKNOWN_DEFECT))
        else:
            out.append(replace(s, class_id=vocab.class_id(s.defect, where=s.image)))
    return out


def product_defects(samples: Iterable[Sample]) -> dict[str, list[str]]:
    """Per product, the sorted defect words seen (what an artifact's `products` section lists)."""
    table: dict[str, set[str]] = {}
    for s in samples:
        bucket = table.setdefault(s.product, set())
        if s.defect is not None:
            bucket.add(s.defect)
    return {p: sorted(v) for p, v in sorted(table.items())}


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (hidden files skipped)."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataLayoutError(path, f"missing folder ({what})")
    return path


def read_json(path: Path, what: str) -> dict:
    """A data set's JSON index (an object); missing or malformed -> DataLayoutError naming the file."""
    if not path.is_file():
        raise DataLayoutError(path, f"missing {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataLayoutError(path, f"invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DataLayoutError(path, f"expected a JSON object, got {type(data).__name__}")
    return data


def find_mask(folder: Path, stem: str, suffixes: Sequence[str] = ("_mask", "")) -> Path | None:
    """``folder/<stem><suffix>.<ext>`` for the first suffix/extension that exists."""
    if not folder.is_dir():
        return None
    for suf in suffixes:
        for ext in (".png", ".PNG", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg"):
            cand = folder / f"{stem}{suf}{ext}"
            if cand.is_file():
                return cand
    return None


# --------------------------------------------------------------------------- image / mask reading

def mask_to_float(mask: Image.Image, nonzero: bool = False) -> np.ndarray:
    """A mask image as float32 (H, W) in [0, 1]. 8-bit: /255; 16-bit: /65535; 1-bit: 0/1;
    RGB(A): its luminance. ``nonzero``: every pixel > 0 is 1.0."""
    if mask.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
        mask = mask.convert("L")
    arr = np.asarray(mask)
    if nonzero:
        return (arr > 0).astype(np.float32)
    if arr.dtype == bool or mask.mode == "1":
        return arr.astype(np.float32)
    if mask.mode in ("I;16", "I;16B", "I;16L"):
        return arr.astype(np.float32) / 65535.0
    if mask.mode in ("I", "F"):
        a = arr.astype(np.float32)
        peak = float(a.max()) if a.size else 0.0
        # 'I' PNGs are usually 16-bit data promoted by PIL; 'F' is taken as already in [0, 1]
        scale = 1.0 if mask.mode == "F" or peak <= 1.0 else (255.0 if peak <= 255.0 else 65535.0)
        return np.clip(a / scale, 0.0, 1.0)
    return arr.astype(np.float32) / 255.0


def mask_to_class_map(mask_f: np.ndarray, size: int, class_value: int) -> np.ndarray:
    """Float mask (H, W) in [0, 1] -> int64 (size, size): bilinear resize, threshold > 0.5,
    then (and only then) the integer class value. The order matters: soft edges survive."""
    resized = Image.fromarray(mask_f.astype(np.float32), mode="F").resize(
        (size, size), Image.Resampling.BILINEAR
    )
    fg = np.asarray(resized, dtype=np.float32) > MASK_THRESHOLD
    out = np.zeros((size, size), dtype=np.int64)
    out[fg] = class_value
    return out


def read_image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def check_mask_sizes(samples: Iterable[Sample]) -> None:
    """Raise DataLayoutError for the first mask whose size differs from its image (reads
    headers only, cheap)."""
    for s in samples:
        if s.mask is None:
            continue
        isz, msz = read_image_size(s.image), read_image_size(s.mask)
        if isz != msz:
            raise DataLayoutError(
                s.mask, f"mask size {msz[0]}x{msz[1]} differs from its image {s.image} ({isz[0]}x{isz[1]})"
            )


class AnomalyDataset:
    """torch-style Dataset over Samples -> (pixel_values, class_mask, label, has_mask).

    ``AnomalyDataset(samples, size=518, mean=mean, std=std)``. Works with
    ``torch.utils.data.DataLoader`` and its default collate (tensors are stacked). mean/std
    have no default: they belong to the backbone (``DapoModel.normalisation``) or the
    artifact (``manifest.mean``/``std``), and a wrong default would go unnoticed.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        size: int = 518,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        ignore_index: int = IGNORE_INDEX,
        check_sizes: bool = False,
    ):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self.samples = list(samples)
        self.size = int(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.ignore_index = int(ignore_index)
        if check_sizes:
            check_mask_sizes(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def class_mask(self, s: Sample, image_size: tuple[int, int]) -> tuple[np.ndarray, bool]:
        S = self.size
        if s.label == 0:
            return np.zeros((S, S), dtype=np.int64), True
        if s.mask is None:
            return np.full((S, S), self.ignore_index, dtype=np.int64), False
        with Image.open(s.mask) as m:
            if m.size != image_size:
                raise DataLayoutError(
                    s.mask,
                    f"mask size {m.size[0]}x{m.size[1]} differs from its image {s.image} "
                    f"({image_size[0]}x{image_size[1]})",
                )
            mf = mask_to_float(m, nonzero=s.mask_nonzero)
        value = s.class_id if s.class_id > 0 else self.ignore_index
        return mask_to_class_map(mf, S, value), True

    def __getitem__(self, idx: int):
        import torch

        s = self.samples[idx]
        try:
            with Image.open(s.image) as im:
                image_size = im.size  # the stored size: a scaled decode changes im.size
                # the service's own decode: DCT-reduced exactly like a served JPEG of this size;
                # EXIF orientation is NOT applied: data-set masks are drawn on the stored pixel grid
                pix = preprocess(load(im, str(s.image), model_side(self.size), orient=False), self.size,
                                 self.mean, self.std)
        except (OSError, SyntaxError, ValueError) as exc:
            raise DataLayoutError(s.image, f"cannot read image: {exc}") from exc
        cmask, has_mask = self.class_mask(s, image_size)
        pixel_values = torch.as_tensor(np.asarray(pix, dtype=np.float32))
        return (
            pixel_values,
            torch.from_numpy(cmask),
            torch.tensor(s.label, dtype=torch.int64),
            torch.tensor(has_mask, dtype=torch.bool),
        )
