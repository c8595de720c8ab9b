"""`dapo bench --mode cpu-path` runs its parts on real stages (a smoke test on small images;
the figures themselves come from running the benchmark, never from a test)."""
from __future__ import annotations

import io

from PIL import Image

from service.bench_cpu_path import (
    bench_json,
    bench_png_levels,
    bench_stages,
    bench_tiled,
    configurations,
    photo_like_jpeg,
)
from service.runtime.detector import Detector


def test_photo_like_jpeg_is_a_jpeg_of_the_asked_size():
    data = photo_like_jpeg(320, 200, seed=3)
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "JPEG" and img.size == (320, 200)
    assert data != photo_like_jpeg(320, 200, seed=4)


def test_stages_cover_every_mask_format_with_and_without_views(demo_artifact):
    detector = Detector.load(demo_artifact)
    images = {"small": photo_like_jpeg(480, 400)}
    encoder, *rows = bench_stages(detector, images, reps=1)
    assert encoder["encoder_ms"] > 0
    assert [r["config"] for r in rows] == [label for label, _ in configurations()]
    by = {r["config"]: r for r in rows}
    assert by["rle+heatmap+overlay"]["answer_kb"] > by["rle"]["answer_kb"] > by["none"]["answer_kb"]
    assert all(r["full_decode_resize_cpu_ms"] > 0 and r["ratio_cpu"] > 0 for r in rows)
    levels = bench_png_levels(detector, images["small"], reps=1)
    assert {r["level"] for r in levels} == {0, 1, 3, 6, 9}
    mask = {r["level"]: r["kb"] for r in levels if r["picture"] == "mask_full"}
    assert mask[9] <= mask[1] < mask[0]  # zlib compresses, more with a higher level
    assert bench_json(detector, images, reps=1)[0]["kb"] > 0


def test_tiled_section_compares_a_tiled_product_with_the_same_image_untiled(demo_artifact):
    detector = Detector.load(demo_artifact)
    out = bench_tiled(detector, photo_like_jpeg(600, 500, seed=2), 2, reps=1)
    assert out["image"] == "600x500" and out["tile"] == 300
    for row in out["rows"]:
        untiled, tiled = row["untiled"], row["tiled_2x2"]
        assert untiled["inputs"] == 1 and tiled["inputs"] == 1 + 4  # the whole image, then 2 x 2 tiles
        assert tiled["prepare_cpu_ms"] > 0 and untiled["prepare_cpu_ms"] > 0
        assert row["ratio_cpu"] == round(tiled["cpu_ms"] / untiled["cpu_ms"], 3)
        assert row["floor_ratio_cpu"] == round(tiled["prepare_cpu_ms"] / untiled["cpu_ms"], 3)
