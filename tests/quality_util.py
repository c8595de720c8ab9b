"""Shared by the quality-metric and dashboard tests: the synthetic textures of the drift checks."""
from __future__ import annotations

from pathlib import Path

CALIBRATION_IMAGES = 48  # wood good 0..47 calibrate; 48..95 are fresh good parts of the same texture
DRIFT_BINS = 4  # few bins: a 48-image baseline gives 12 per bin


def good_images(textures: Path, product: str) -> list[Path]:
    return sorted((textures / product / "good").glob("*.png"))
