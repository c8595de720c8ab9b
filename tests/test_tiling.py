"""Tiled inspection (service.runtime.tiling): the grid, the stitching against an independent
reference, 1 x 1 tiling == untiled byte for byte, and tiles never crossing requests under load
on the real server."""
from __future__ import annotations

import io
import itertools
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.runtime import postprocess, tiling
from service.runtime.artifact import Product, Tiling, read_manifest, write_manifest
from service.runtime.detector import Detector, ImageLimits, Upload
from service.server.routes import encode_json

LIMITS = ImageLimits(max_pixels=40_000_000, max_side=16384)


def photo(width: int, height: int, seed: int, fmt: str = "JPEG") -> bytes:
    """A textured image with a few dark marks (so maps and regions are not uniform)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    arr = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)).copy()
    for _ in range(4):
        y, x = int(rng.integers(0, height - 12)), int(rng.integers(0, width - 12))
        arr[y:y + 6, x:x + 10] = 0
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


# --- the grid ---------------------------------------------------------------------------------
@pytest.mark.parametrize("length,tile,overlap", [(100, 100, 0), (100, 200, 10), (1000, 256, 32), (999, 250, 0),
                                                 (2448, 612, 0), (513, 128, 127)])
def test_tiles_cover_the_axis_overlap_as_asked_and_end_on_the_edge(length, tile, overlap):
    starts = tiling.starts(length, tile, overlap)
    extent = min(tile, length)
    assert starts[0] == 0 and starts[-1] + extent == length
    assert all(b > a for a, b in itertools.pairwise(starts))
    assert all(a + extent - b >= overlap for a, b in itertools.pairwise(starts))  # at least the overlap asked
    assert all(b - a == tile - overlap for a, b in itertools.pairwise(starts[:-1]))  # the regular stride


def test_tiling_settings_are_checked_and_old_manifests_read_untiled(demo_artifact):
    with pytest.raises(ValueError, match="overlap"):
        Tiling(tile=64, overlap=64)
    manifest = read_manifest(demo_artifact)  # baked without the field
    assert all(p.tiling is None for p in manifest.products.values())
    assert Product.model_validate({"tiling": {"tile": 512, "overlap": 64}}).tiling == Tiling(tile=512, overlap=64)  # bake JSON


# --- stitching vs an independent reference -----------------------------------------------------
def reference_stitch(g: tiling.TileGrid, anomaly: np.ndarray, types: np.ndarray):
    """Pixel by pixel, in exact fractions: a canvas pixel's centre in original pixels, the tiles
    whose extent holds it, the nearest tile-map pixel in each; mean anomaly, class of the max."""
    wc, hc = g.canvas
    out_a = np.zeros((hc, wc))
    out_t = np.zeros((hc, wc), np.uint8)
    counts = np.zeros((hc, wc), int)
    for r in range(hc):
        cy = (Fraction(r) + Fraction(1, 2)) * g.height / hc
        for c in range(wc):
            cx = (Fraction(c) + Fraction(1, 2)) * g.width / wc
            values = []
            for i, (x0, y0, x1, y1) in enumerate(g.boxes):
                if x0 <= cx < x1 and y0 <= cy < y1:
                    sy = min(int((cy - y0) * g.size / g.tile_h), g.size - 1)
                    sx = min(int((cx - x0) * g.size / g.tile_w), g.size - 1)
                    values.append((float(anomaly[i, sy, sx]), int(types[i, sy, sx])))
            out_a[r, c] = np.mean([v for v, _ in values])
            out_t[r, c] = max(values, key=lambda v: v[0])[1]  # first of equal maxima, as documented
            counts[r, c] = len(values)
    return out_a, out_t, counts


@pytest.mark.parametrize("width,height,tile,overlap,size,cap", [(300, 200, 128, 32, 16, 1024), (250, 250, 100, 0, 12, 1024),
                                                                 (97, 131, 40, 13, 8, 1024), (300, 200, 128, 32, 16, 24)])
def test_stitching_matches_an_independent_reference_in_the_overlaps(width, height, tile, overlap, size, cap):
    g = tiling.grid(width, height, Tiling(tile=tile, overlap=overlap, map_max_side=max(cap, 16)), size)
    full = (round(width * size / g.tile_w), round(height * size / g.tile_h))
    assert max(g.canvas) == min(max(full), max(cap, size))  # the cap, never below S
    rng = np.random.default_rng(0)
    anomaly = rng.random((g.count, size, size), dtype=np.float32)
    anomaly[0, :4, :4] = anomaly[1, :4, :4]  # equal maxima somewhere: ties go to the first tile
    types = rng.integers(0, 5, (g.count, size, size)).astype(np.uint8)
    got_a, got_t = tiling.stitch(g, anomaly, types)
    ref_a, ref_t, counts = reference_stitch(g, anomaly, types)
    assert got_a.shape == ref_a.shape == (g.canvas[1], g.canvas[0])
    assert (counts >= 1).all() and (counts > 1).sum() > 0.05 * counts.size  # the overlaps are exercised
    np.testing.assert_allclose(got_a, ref_a, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got_t, ref_t)
    probs = rng.random((g.count, 3, size, size), dtype=np.float32)
    per_class = [reference_stitch(g, probs[:, k], types)[0] for k in range(3)]
    np.testing.assert_allclose(tiling.stitch_mean(g, probs), np.stack(per_class), atol=1e-6)


def test_image_score_rules():
    assert tiling.image_score(0.3, [0.1, 0.7], "max") == 0.7
    assert tiling.image_score(0.9, [0.1, 0.7], "max") == 0.9
    assert tiling.image_score(0.3, [0.1, 0.7], "whole") == 0.3
    assert tiling.image_score(0.3, [0.1, 0.7], "tiles") == 0.7
    assert tiling.image_score(0.3, [0.1, 0.7], "mean") == pytest.approx(0.5)
    with pytest.raises(ValueError):
        tiling.image_score(0.3, [0.1], "median")


# --- the detector -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def detector(demo_artifact) -> Detector:
    return Detector.load(demo_artifact)


RENDERS = [postprocess.RenderOptions("rle"), postprocess.RenderOptions("png", True, True, view_max_side=256),
           postprocess.RenderOptions("rle", True, True, view_max_side=0)]


@pytest.mark.parametrize("fmt,size", [("JPEG", (1400, 1000)), ("PNG", (300, 220)), ("JPEG", (90, 70))])
def test_a_1x1_tiling_answers_byte_identically_to_the_untiled_path(detector, fmt, size):
    data = photo(*size, seed=3, fmt=fmt)
    for options in RENDERS:
        for tile in (max(size), max(size) + 1000):
            policy = detector.policy("plate")
            plain = detector.predict([Upload("a", data)], policy, options, LIMITS)[0]
            tiled = detector.predict([Upload("a", data)], policy.__class__(**{**policy.__dict__,
                                     "tiling": Tiling(tile=tile)}), options, LIMITS)[0]
            assert encode_json(tiled.fields) == encode_json(plain.fields)
            assert tiled.scores.anomaly_score == plain.scores.anomaly_score
            np.testing.assert_array_equal(tiled.scores.anomaly_map, plain.scores.anomaly_map)


def test_a_tiled_image_is_decoded_once_at_the_tiles_scale_and_stitched_at_their_density(detector):
    data = photo(1600, 1200, seed=5)
    s = detector.manifest.image_size
    prep = detector.prepare(Upload("a.jpg", data), LIMITS, tiles=Tiling(tile=400, overlap=0))
    assert len(prep.inputs()) == 1 + 12 and all(x.shape == (3, s, s) for x in prep.inputs())
    policy = detector.policy()
    outputs = detector.infer_inputs(prep.inputs(), policy.allowed)
    scores = detector.score(outputs, policy, prep)
    assert scores.anomaly_map.shape == (3 * s, 4 * s)
    fields = detector.render(prep, outputs, policy, postprocess.RenderOptions("png"))
    assert (fields["width"], fields["height"]) == (1600, 1200)
    mask = Image.open(io.BytesIO(__import__("base64").b64decode(fields["mask"]["png"])))
    assert mask.size == (1600, 1200)
    tile_scores = [float(outputs.anomaly_score[i]) for i in range(1, 13)]
    assert fields["anomaly_score"] == pytest.approx(max(float(outputs.anomaly_score[0]), *tile_scores), rel=1e-5)


# --- the real server under concurrent load -------------------------------------------------------
@pytest.fixture(scope="module")
def tiled_artifact(demo_artifact, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiled") / "demo"
    shutil.copytree(demo_artifact, folder)
    manifest = read_manifest(folder)
    manifest.products["tiled"] = Product(tiling=Tiling(tile=160, overlap=32))  # 3 x 2 tiles of 320 x 240
    manifest.products["one"] = Product(tiling=Tiling(tile=4096))
    manifest.products["plain"] = Product()
    write_manifest(folder, manifest)
    return folder


def post(client, data: bytes, name: str, product: str) -> dict:
    r = client.post("/detect", params={"mask_format": "rle", "heatmap": "true"},
                    files={"image": (name, data, "image/jpeg")}, data={"product": product})
    r.raise_for_status()
    (result,) = r.json()["results"]
    result.pop("timing_ms")
    return result


def test_tiles_of_concurrent_requests_share_batches_but_never_answers(tiled_artifact):
    import httpx

    from service.server.local_server import Server

    images = {f"img{i}.jpg": photo(320, 240, seed=100 + i) for i in range(6)}
    env = {"DAPO_MAX_BATCH_SIZE": "16", "DAPO_MAX_QUEUE_DELAY_MS": "30", "DAPO_WORKERS": "1",
           "DAPO_MAX_QUEUE_SIZE": "512"}
    with Server(tiled_artifact, env) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        solo = {name: post(client, data, name, "tiled") for name, data in images.items()}
        assert len({json.dumps(r["anomaly_score"]) + json.dumps(r["mask"]) for r in solo.values()}) == len(images)
        # a 1 x 1 tiling over HTTP: the untiled answer, byte for byte (the product echo aside)
        for name, data in list(images.items())[:2]:
            one, plain = post(client, data, name, "one"), post(client, data, name, "plain")
            assert one.pop("product") == "one" and plain.pop("product") == "plain"
            assert encode_json(one) == encode_json(plain)

        def hammer(name: str) -> list[dict]:
            return [post(client, images[name], name, "tiled") for _ in range(4)]

        with ThreadPoolExecutor(len(images)) as pool:
            answers = dict(zip(images, pool.map(hammer, images)))
        for name, results in answers.items():
            for result in results:
                assert result == solo[name], f"{name}: a concurrent answer differs from its solo answer"
        metrics = client.get("/metrics").text
    per_image = 1 + 6  # the whole image and 3 x 2 tiles
    sizes = [line for line in metrics.splitlines() if line.startswith("dapo_batch_size_bucket")]
    le = {float(line.split('le="')[1].split('"')[0]) if 'le="+Inf"' not in line else float("inf"): float(line.split()[-1])
          for line in sizes}
    assert per_image < 8  # so a batch of more than 8 inputs holds inputs of two requests at least
    assert le[float("inf")] > le[8.0], "no batch mixed the tiles of two requests: the test did not exercise sharing"


# --- evaluation and calibration go through the same tiled path -----------------------------------
def test_calibrate_and_eval_use_the_served_tiled_path(demo_artifact, tmp_path):
    from training.calibrate import calibrate
    from training.evaluate import run_artifact
    from training.synth import generate, load_split

    generate(tmp_path / "data", products=["carpet"], defects=["hole"], n_per_class=2, n_good=3, size=300,
             holdout_product=None, holdout_defect=None, defect_scale=(0.02, 0.04), defects_per_image=2)
    samples = load_split(tmp_path / "data", "train")
    good = [s for s in samples if s.label == 0]
    folder = tmp_path / "artifact"
    shutil.copytree(demo_artifact, folder)
    spec = Tiling(tile=128, overlap=24)
    table = calibrate(folder, good, image_quantile=1.0, pixel_quantile=1.0, tiling=spec)
    assert table["carpet"]["tiling"] == spec.model_dump()
    detector = Detector.load(folder)  # reads the calibrated manifest back
    assert detector.manifest.products["carpet"].tiling == spec
    policy = detector.policy("carpet")
    served = detector.predict([Upload(s.image.name, s.image.read_bytes()) for s in samples], policy,
                              limits=LIMITS)
    side = round(300 * 112 / 128)  # the tiles' map density over the whole 300 px image
    assert served[0].scores.anomaly_map.shape == (side, side)
    assert table["carpet"]["image_threshold"] == pytest.approx(max(r.scores.anomaly_score for r, s in
                                                                   zip(served, samples) if s.label == 0), rel=1e-6)
    assert table["carpet"]["pixel_threshold"] == pytest.approx(max(float(r.scores.anomaly_map.max()) for r, s in
                                                                   zip(served, samples) if s.label == 0), rel=1e-6)
    collected = run_artifact(detector, samples, progress=False)["carpet"]
    assert collected.scores == pytest.approx([r.scores.anomaly_score for r in served], rel=1e-6)
    assert len(collected.maps) == len(samples) and collected.maps[0].shape == (side, side)
    assert any(m.any() for m in collected.masks)  # the defects' truth is drawn at the stitched size


def test_a_request_whose_tiles_can_never_fit_the_queue_is_refused_clearly(tiled_artifact):
    import httpx

    from service.server.local_server import Server

    data = photo(320, 240, seed=1)
    with Server(tiled_artifact, {"DAPO_MAX_QUEUE_SIZE": "10", "DAPO_MAX_FILES": "2"}) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        files = [("image", (f"{i}.jpg", data, "image/jpeg")) for i in range(2)]
        r = client.post("/detect", files=files, data={"product": "tiled"})  # 2 x 7 inputs > 10
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_tiles", r.text
        ok = client.post("/detect", files=files[:1], data={"product": "tiled"})
        assert ok.status_code == 200 and len(ok.json()["results"]) == 1
