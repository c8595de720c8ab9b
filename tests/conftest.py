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
