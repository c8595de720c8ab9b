"""Shared fixtures: tiny random OpenCLIP configs only (no weights can be downloaded here)."""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", message=".*pretrained weights.*")


@pytest.fixture(scope="session")
def demo_artifact(tmp_path_factory) -> Path:
    """A real artifact baked from the tiny random backbone (same path as `dapo bake --demo`)."""
    from training.bake import bake_demo

    return bake_demo(tmp_path_factory.mktemp("artifacts") / "demo").folder


@pytest.fixture(scope="session")
def demo_artifact_v2(tmp_path_factory) -> Path:
    """A second demo version: other random weights (seed 7), so other scores, version 0.2.0."""
    from training.bake import bake_demo

    return bake_demo(tmp_path_factory.mktemp("artifacts") / "demo-v2", seed=7, version="0.2.0").folder


@pytest.fixture(scope="session")
def golden_fragile(demo_artifact):
    """Golden key -> filename -> pixels whose class may differ on another CPU (golden_compare)."""
    from test_detect_golden import fragile_maps

    return fragile_maps(demo_artifact)


@pytest.fixture(scope="session")
def tiny_model():
    from training.bake import demo_model

    return demo_model()


@pytest.fixture(scope="session")
def fp16_artifact(tmp_path_factory) -> Path:
    """The demo artifact baked with `--fp16`: encoder_fp16.onnx beside the fp32 files."""
    from training.bake import bake_demo

    return bake_demo(tmp_path_factory.mktemp("artifacts") / "demo16", fp16=True).folder


@pytest.fixture
def bench_script():
    """Import a script under bench/ by name (they are scripts, not a package)."""
    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"dapo_bench_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


@pytest.fixture(scope="session")
def textures(tmp_path_factory) -> Path:
    """`dapo synth` good parts of two textures, wood and carpet (the drift checks' shift)."""
    from quality_util import CALIBRATION_IMAGES
    from training.synth import generate

    root = tmp_path_factory.mktemp("textures")
    generate(root, products=["wood", "carpet"], defects=["scratch"], n_per_class=1, n_good=2 * CALIBRATION_IMAGES,
             size=64, holdout_product=None, holdout_defect=None)
    return root


@pytest.fixture(scope="session")
def wood_artifact(demo_artifact, textures, tmp_path_factory) -> Path:
    """A copy of the demo artifact calibrated (`dapo calibrate`'s function) on the first wood images."""
    import shutil

    from quality_util import CALIBRATION_IMAGES, DRIFT_BINS, good_images
    from training.calibrate import calibrate
    from training.synth import load_split

    folder = tmp_path_factory.mktemp("calibrated") / "wood"
    shutil.copytree(demo_artifact, folder)
    wood = {p.name for p in good_images(textures, "wood")[:CALIBRATION_IMAGES]}
    calib = [s for s in load_split(textures, "train") if s.product == "wood" and s.label == 0 and s.image.name in wood]
    assert len(calib) == CALIBRATION_IMAGES
    table = calibrate(folder, calib, drift_bins=DRIFT_BINS)
    assert table["wood"]["images"] == CALIBRATION_IMAGES
    return folder


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chrome per browser-test module (its modules skip first when Chrome is absent)."""
    from browser_util import headless_chrome

    driver = headless_chrome(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()
