"""calibrate, eval, smoothing and /detect against a reference run of the artifact's encoder.

The reference feeds each image to the artifact's ONNX Runtime encoder directly and derives what
the offline tools and the service should report with plain numpy / scipy / sklearn: quantiles
for calibration, AUROC for evaluation, `scipy.ndimage.gaussian_filter` for smoothing, exact
nearest and bilinear resizing (tests/references.py) at the original size. Every case is built so
that the bug it guards against changes the answer by far more than float noise (checked as a
precondition, so a data change cannot make a test silently weak).
"""
from __future__ import annotations

import base64
import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from scipy.ndimage import gaussian_filter
from sklearn.metrics import f1_score, roc_auc_score

from references import reference_bilinear, reference_nearest
from service.server.app import create_app
from service.runtime.artifact import load_manifest, write_manifest
from service.runtime.backends import create_backend
from service.runtime.imaging import preprocess
from service.server.settings import Settings
from training.data import Sample

N_GOOD = 24  # calibration on at least 20 good parts
PRODUCT = "disc"


def part_image(seed: int, w: int = 112, h: int = 112) -> Image.Image:
    """A gradient part with one random-texture patch somewhere (different per seed)."""
    rng = np.random.default_rng(seed)
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = (np.linspace(0, 255, w)[None] * ((seed % 3) / 2)).astype(np.uint8)
    arr[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    arr[..., 2] = (seed * 37) % 255
    py, px, side = rng.integers(0, h - h // 4), rng.integers(0, w - w // 4), min(w, h) // 4
    arr[py:py + side, px:px + side] = rng.integers(0, 255, (side, side, 3))
    return Image.fromarray(arr)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def png_pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


@dataclass
class Reference:
    scores: np.ndarray  # (N,) global anomaly score
    maps: np.ndarray  # (N, S, S) anomaly map, unsmoothed
    types: np.ndarray  # (N, S, S) type map


def reference_run(artifact: Path, images: list[Image.Image], product: str | None) -> Reference:
    """The artifact's encoder on each image, the product's types allowed (as the policy says)."""
    m = load_manifest(artifact)
    allowed = np.ones(len(m.class_names), bool)
    if product is not None and m.products[product].defect_types is not None:
        allowed[1:] = [n in m.products[product].defect_types for n in m.class_names[1:]]
    pixels = np.stack([preprocess(im.convert("RGB"), m.image_size, m.mean, m.std) for im in images])
    out = create_backend(artifact, m, "onnxruntime").run(pixels, np.repeat(allowed[None], len(images), 0))
    return Reference(out.anomaly_score.astype(np.float64), out.anomaly_map.astype(np.float64), out.type_map)


@pytest.fixture(scope="module")
def good_parts(tmp_path_factory) -> tuple[list[Sample], list[Image.Image]]:
    folder = tmp_path_factory.mktemp("good")
    images = [part_image(i) for i in range(N_GOOD)]
    samples = []
    for i, im in enumerate(images):
        path = folder / f"good_{i:02d}.png"
        im.save(path)
        samples.append(Sample(image=path, mask=None, product=PRODUCT, defect=None, label=0, class_id=0))
    return samples, images


@pytest.fixture
def artifact(demo_artifact, tmp_path) -> Path:
    """A private copy (calibrate and the smoothing tests rewrite its manifest)."""
    dst = tmp_path / "art"
    shutil.copytree(demo_artifact, dst)
    return dst


def edit_manifest(folder: Path, **update) -> None:
    m = load_manifest(folder)
    write_manifest(folder, type(m).model_validate(m.model_copy(update=update).model_dump()))


def served(folder: Path, image: Image.Image, query: str, product: str | None = None) -> dict:
    app = create_app(Settings(artifact=folder, warmup=False), configure_logs=False)
    with TestClient(app) as client:
        r = client.post(f"/detect?{query}", files=[("image", ("part.png", png_bytes(image), "image/png"))],
                        data={"product": product} if product else {})
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


def assert_mask_equal_off_threshold(got: np.ndarray, expected: np.ndarray, amap_full: np.ndarray,
                                    threshold: float | None) -> None:
    """Masks equal, except where the map is within float noise of the pixel threshold."""
    differ = got != expected
    if threshold is not None:
        differ &= np.abs(amap_full - threshold) > 1e-5
    assert not differ.any(), f"{int(differ.sum())} of {differ.size} mask pixels differ"


# --- calibrate ---------------------------------------------------------------------------------
def test_calibrated_thresholds_are_numpy_quantiles_and_detect_applies_them(artifact, good_parts):
    from training.calibrate import calibrate

    samples, images = good_parts
    ref = reference_run(artifact, images, PRODUCT)
    q_img, q_pix = 0.9, 0.99
    expected_img = float(np.quantile(ref.scores, q_img, method="higher"))
    expected_pix = float(np.quantile(ref.maps.ravel(), q_pix, method="higher"))
    # the data tell a quantile from its mirror image (the 1 - q bug) by far more than float noise
    assert expected_img - np.quantile(ref.scores, 1 - q_img) > 1e-3
    assert expected_pix - np.quantile(ref.maps.ravel(), 1 - q_pix) > 1e-2

    table = calibrate(artifact, samples, image_quantile=q_img, pixel_quantile=q_pix)
    assert table[PRODUCT]["images"] == N_GOOD
    assert table[PRODUCT]["image_threshold"] == pytest.approx(expected_img, abs=1e-6)
    assert table[PRODUCT]["pixel_threshold"] == pytest.approx(expected_pix, abs=1e-6)
    m = load_manifest(artifact)  # still verifies: only manifest.json changed
    assert m.products[PRODUCT].image_threshold == pytest.approx(expected_img, abs=1e-6)
    assert m.products[PRODUCT].pixel_threshold == pytest.approx(expected_pix, abs=1e-6)
    assert m.products[PRODUCT].defect_types == ["scratch", "hole", "crack"]  # the rest of the entry kept
    assert m.products["plate"].image_threshold == 0.6 and m.products["plate"].pixel_threshold is None
    # expected false alarms on the good parts: at most 1 - q (plus one image's worth of rounding)
    assert np.mean(ref.scores > expected_img) <= 1 - q_img + 1e-9
    assert np.mean(ref.maps > expected_pix) <= 1 - q_pix + 1e-9

    # /detect uses both: the image threshold as the verdict's, the pixel threshold on the mask
    busiest = int(np.argmax((ref.maps >= expected_pix).sum(axis=(1, 2))))
    res = served(artifact, images[busiest], "mask_format=png", PRODUCT)
    thr = m.products[PRODUCT].image_threshold
    assert res["threshold"] == thr and res["is_anomalous"] == (res["anomaly_score"] >= thr)
    assert res["anomaly_score"] == pytest.approx(ref.scores[busiest], abs=1e-5)
    expected_mask = np.where(ref.maps[busiest] >= expected_pix, ref.types[busiest], 0)
    assert 0 < (expected_mask > 0).mean() < 0.5  # the threshold cuts the map: some pixels, not most
    assert_mask_equal_off_threshold(png_pixels(res["mask"]["png"]), expected_mask, ref.maps[busiest], expected_pix)


# --- eval --------------------------------------------------------------------------------------
def planted_split(scores: np.ndarray) -> np.ndarray:
    """Labels: the images above the widest score gap in the middle third are 'defective'."""
    order = np.argsort(scores)
    sorted_scores = scores[order]
    lo, hi = len(scores) // 3, 2 * len(scores) // 3
    cut = lo + int(np.argmax(np.diff(sorted_scores)[lo:hi])) + 1
    assert sorted_scores[cut] - sorted_scores[cut - 1] > 1e-4  # wider than any batch-size noise
    labels = np.zeros(len(scores), int)
    labels[order[cut:]] = 1
    return labels


def planted_samples(folder: Path, images: list[Image.Image], ref: Reference) -> tuple[list[Sample], np.ndarray]:
    """Samples with labels planted from the scores and, on the 'defective' ones, a 'scratch' mask
    on the hottest fifth of the part; returns them and the (N, S, S) class truth."""
    labels = planted_split(ref.scores)
    samples, truth = [], np.zeros(ref.maps.shape, np.int64)
    for i, (im, label) in enumerate(zip(images, labels)):
        path = folder / f"{i:02d}.png"
        im.save(path)
        if label:
            mask = ref.maps[i] > np.quantile(ref.maps[i], 0.8)
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{i:02d}_mask.png")
            samples.append(Sample(path, folder / f"{i:02d}_mask.png", PRODUCT, "scratch", 1, 1))
            truth[i][mask] = 1  # 'scratch' is class 1
        else:
            samples.append(Sample(path, None, PRODUCT, None, 0, 0))
    return samples, truth


def test_eval_reports_the_known_auroc_of_a_planted_split(artifact, good_parts, tmp_path):
    """Labels planted from the scores (image AUROC exactly 1) and masks planted from the maps
    (pixel AUROC computed by sklearn on the reference): inverted labels or masks cannot pass."""
    from training.evaluate import evaluate

    _, images = good_parts
    ref = reference_run(artifact, images, PRODUCT)
    samples, truth = planted_samples(tmp_path, images, ref)
    pixel_auroc = roc_auc_score(truth.ravel() > 0, ref.maps.ravel())
    assert abs(pixel_auroc - 0.5) > 0.1  # inverting the truth would move it to 1 - auroc

    res = evaluate(artifact, samples, progress=False)
    got = res["per_product"][PRODUCT]
    assert got["images"] == N_GOOD
    assert got["image_auroc"] == 1.0 and got["image_ap"] == 1.0 and got["image_max_f1"] == 1.0
    assert got["pixel_auroc"] == pytest.approx(pixel_auroc, abs=1e-4)
    assert res["mean"]["image_auroc"] == 1.0 and res["mean"]["pixel_auroc"] == pytest.approx(pixel_auroc, abs=1e-4)
    assert "scratch" in got["per_type"]


def test_eval_multitype_f1_measures_the_served_type_map(artifact, good_parts, tmp_path):
    """Multi-type F1 is the F1 of what /detect would draw: the argmax among the product's types
    (disc: scratch, hole, crack), not among the whole vocabulary."""
    from training.evaluate import evaluate

    _, images = good_parts
    served_types = reference_run(artifact, images, PRODUCT).types
    unfiltered = reference_run(artifact, images, None).types
    samples, truth = planted_samples(tmp_path, images, reference_run(artifact, images, PRODUCT))
    f1 = f1_score(truth.ravel(), served_types.ravel(), labels=[0, 1], average="macro")
    f1_unfiltered = f1_score(truth.ravel(), unfiltered.ravel(), labels=[0, 1], average="macro")
    assert abs(f1 - f1_unfiltered) > 2e-2  # the filter matters on these parts

    got = evaluate(artifact, samples, progress=False)["per_product"][PRODUCT]
    # class maps are kept in float16: a near-tie may flip a pixel's argmax (measured: < 1e-3 of F1)
    assert got["mt_f1"] == pytest.approx(f1, abs=5e-3)
    scratch_f1 = f1_score(truth.ravel() == 1, served_types.ravel() == 1)
    assert got["per_type"]["scratch"]["f1"] == pytest.approx(scratch_f1, abs=5e-3)


# --- Gaussian smoothing ------------------------------------------------------------------------
SIGMA = 4.0  # AnomalyCLIP's


def test_eval_path_smooths_like_scipy(artifact, good_parts):
    from training.evaluate import run_artifact

    samples, images = good_parts
    ref = reference_run(artifact, images, PRODUCT)
    smoothed = np.stack([gaussian_filter(a, SIGMA, mode="nearest") for a in ref.maps])
    assert np.abs(smoothed - ref.maps).max() > 1e-2  # smoothing visibly changes these maps
    got = run_artifact(artifact, samples, sigma=SIGMA, image_score="global_max", progress=False)[PRODUCT]
    np.testing.assert_allclose(np.stack(got.maps), smoothed, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got.scores, 0.5 * (ref.scores + smoothed.max(axis=(1, 2))), rtol=0, atol=1e-5)
    plain = run_artifact(artifact, samples, progress=False)[PRODUCT]  # the manifest's sigma: 0, no smoothing
    np.testing.assert_allclose(np.stack(plain.maps), ref.maps, rtol=0, atol=1e-5)
    np.testing.assert_allclose(plain.scores, ref.scores, rtol=0, atol=1e-5)


def test_served_path_smooths_like_scipy_at_the_original_size(artifact):
    """sigma > 0 in the manifest: /detect's score, mask and heatmap all come from the smoothed map."""
    image = part_image(7, w=250, h=170)
    ref = reference_run(artifact, [image], None)
    smoothed = gaussian_filter(ref.maps[0], SIGMA, mode="nearest")
    threshold = float(np.median(smoothed[ref.types[0] > 0]))  # keeps about half of the typed pixels
    edit_manifest(artifact, gaussian_sigma=SIGMA, image_score="global_max", pixel_threshold=threshold)

    res = served(artifact, image, "mask_format=png&heatmap=true")
    assert res["anomaly_score"] == pytest.approx(0.5 * (ref.scores[0] + smoothed.max()), abs=1e-5)
    rows, cols = reference_nearest(170, smoothed.shape[0]), reference_nearest(250, smoothed.shape[1])
    classes = np.where(smoothed >= threshold, ref.types[0], 0)
    full = classes[np.ix_(rows, cols)]
    assert (full > 0).any() and ((ref.types[0] > 0) & (smoothed < threshold)).any()  # the threshold cuts
    assert_mask_equal_off_threshold(png_pixels(res["mask"]["png"]), full, smoothed[np.ix_(rows, cols)], threshold)
    heat = png_pixels(res["heatmap_png"]).astype(np.float64)
    expected = reference_bilinear(smoothed, 250, 170) * 255.0
    assert heat.shape == (170, 250) and np.abs(heat - expected).max() <= 0.5 + 1e-3
    unsmoothed = reference_bilinear(ref.maps[0], 250, 170) * 255.0
    assert np.abs(unsmoothed - expected).max() > 2  # the check above tells the two apart
    peak = max(d["max_pixel_score"] for d in res["defect_types"])  # read on the smoothed map
    assert peak == pytest.approx(smoothed[classes > 0].max(), abs=1e-5)
