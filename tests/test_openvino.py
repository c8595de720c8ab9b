"""The OpenVINO backend, INT8 calibrated on good parts, and DAPO_PRECISION=auto, on real parts:
the demo artifact, real OpenVINO / NNCF / ONNX Runtime, real `dapo synth` good images, the real
server under load for the reload. Skipped where the `openvino` extra is not installed."""
from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from image_util import gradient_png
from prometheus_client.parser import text_string_to_metric_families
from traffic_util import BackgroundClients

from service.runtime.artifact import ArtifactError, read_manifest, write_manifest
from service.runtime.backends.openvino_backend import (
    PrecisionUnavailable,
    cpu_capabilities,
)
from service.runtime.detector import Detector, RuntimeOptions
from service.runtime.precision import (
    TOLERANCES,
    TYPE_MAP_TOLERANCES,
    candidates,
    compare,
    cpu_isa,
    pick,
)
from service.server.app import create_app
from service.server.local_server import serve_in_thread
from service.server.settings import Settings
from training.quantize import (
    ORT_INT8,
    OV_INT8,
    QuantizeOptions,
    add_int8,
    good_images,
)

ADMIN, LINE = "admin-key-for-tests", "line-client-key"
MAP_OUTPUTS = ("anomaly_score", "type_scores", "anomaly_map", "class_max")


@pytest.fixture(scope="module")
def int8_artifact(demo_artifact, textures, tmp_path_factory) -> Path:
    """The demo artifact with INT8 encoders calibrated on the textures' good parts (ORT's kept
    whenever it passes, whatever its speed here, so both INT8 paths are exercised)."""
    folder = tmp_path_factory.mktemp("int8") / "demo"
    shutil.copytree(demo_artifact, folder)
    add_int8(folder, QuantizeOptions(textures, max_images=12, check_images=4, keep_ort="always"))
    return folder


@pytest.fixture(scope="module")
def parts(demo_artifact, textures) -> np.ndarray:
    """Good parts preprocessed as the service does (the distribution INT8 was calibrated for)."""
    detector = Detector.load(demo_artifact)
    return np.stack([detector.prepare(Image.open(p)).pixel_values for p in good_images(textures)[-3:]])


def allowed_for(pixels: np.ndarray) -> np.ndarray:
    allowed = np.ones((len(pixels), 7), bool)
    allowed[:, 2] = False  # a product's defect list applies on this backend too
    return allowed


def outputs(artifact: Path, backend: str, precision: str, pixels: np.ndarray):
    detector = Detector.load(artifact, RuntimeOptions(backend=backend, precision=precision))
    return detector.infer(pixels, allowed_for(pixels), class_probs=True)


def max_diff(a, b, names=MAP_OUTPUTS) -> float:
    return max(float(np.abs(getattr(a, n).astype(np.float64) - getattr(b, n)).max()) for n in names)


@pytest.mark.parametrize("batch", [1, 3])
def test_openvino_fp32_is_ort_fp32_at_every_batch_size(demo_artifact, parts, batch):
    ref = outputs(demo_artifact, "onnxruntime", "fp32", parts[:batch])
    out = outputs(demo_artifact, "openvino", "fp32", parts[:batch])
    assert max_diff(ref, out, (*MAP_OUTPUTS, "class_probs")) < 1e-5
    assert np.array_equal(ref.type_map, out.type_map) and out.type_map.dtype == np.uint8
    assert out.anomaly_map.shape == (batch, 112, 112) and out.anomaly_map.dtype == np.float32


def test_int8_encoders_are_listed_checked_and_within_tolerance(int8_artifact, parts):
    m = read_manifest(int8_artifact)
    assert m.openvino_file("int8") == OV_INT8 and {OV_INT8, "encoder_int8.bin"} <= set(m.files)
    check = m.precision_checks["openvino:int8"]
    assert check.passed and check.tolerance == TOLERANCES["int8"]
    report = m.provenance["int8"]
    assert report["isa"] == cpu_isa() and report["calibration_images"] > 0
    assert set(report["onnxruntime"]["variants"]) == {"dynamic", "static_qdq"}
    ref = outputs(int8_artifact, "onnxruntime", "fp32", parts)
    ov8 = outputs(int8_artifact, "openvino", "int8", parts)
    assert 0 < max_diff(ref, ov8) <= TOLERANCES["int8"]  # quantised (not the fp32 graph), and close
    verdict = compare(ref, ov8, allowed_for(parts))  # type-map flips beyond near-ties, as bake counts them
    assert verdict.passed and verdict.type_map_mismatch_fraction <= TYPE_MAP_TOLERANCES["int8"]


def test_ort_int8_is_kept_only_with_a_passed_check_and_then_serves_within_tolerance(int8_artifact, parts):
    m = read_manifest(int8_artifact)
    kept = m.provenance["int8"]["onnxruntime"]["kept"]
    variants = m.provenance["int8"]["onnxruntime"]["variants"]
    if kept is None:  # none passed: nothing listed, and asking for it is a clear error
        assert not any(v["passed"] for v in variants.values()) and m.onnx_file("int8") is None
        with pytest.raises(ArtifactError, match="no int8 ONNX encoder"):
            Detector.load(int8_artifact, RuntimeOptions(precision="int8"))
        return
    assert variants[kept]["passed"] and m.onnx_file("int8") == ORT_INT8 and m.precision_checks["onnxruntime:int8"].passed
    ref = outputs(int8_artifact, "onnxruntime", "fp32", parts)
    ort8 = outputs(int8_artifact, "onnxruntime", "int8", parts)
    assert max_diff(ref, ort8) <= TOLERANCES["int8"] and compare(ref, ort8, allowed_for(parts)).passed


def test_bf16_runs_only_where_the_cpu_has_it(demo_artifact, parts):
    import openvino as ov

    if "BF16" in cpu_capabilities(ov.Core()):
        ref = outputs(demo_artifact, "onnxruntime", "fp32", parts)
        assert max_diff(ref, outputs(demo_artifact, "openvino", "bf16", parts)) <= TOLERANCES["bf16"]
    else:
        with pytest.raises(PrecisionUnavailable, match="native bf16"):
            Detector.load(demo_artifact, RuntimeOptions(backend="openvino", precision="bf16"))


@pytest.mark.parametrize("name", [OV_INT8, "encoder_int8.bin"])
def test_an_int8_file_that_does_not_match_its_sha256_refuses_to_load(int8_artifact, tmp_path, name):
    folder = tmp_path / "tampered"
    shutil.copytree(int8_artifact, folder)
    data = bytearray((folder / name).read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the sha256 can tell
    (folder / name).write_bytes(bytes(data))
    for precision in ("int8", "fp32", "auto"):  # the whole artifact is refused, whatever is asked
        with pytest.raises(ArtifactError, match=f"{name}: sha256 .* does not match"):
            Detector.load(folder, RuntimeOptions(backend="openvino", precision=precision))


def failed_copy(src: Path, dst: Path) -> Path:
    """A copy whose OpenVINO int8 check is recorded as failed (manifest.json is not hashed)."""
    shutil.copytree(src, dst)
    m = read_manifest(dst)
    m.precision_checks["openvino:int8"].passed = False
    write_manifest(dst, m)
    return dst


def test_auto_never_selects_a_precision_that_failed_its_check(int8_artifact, tmp_path):
    folder = failed_copy(int8_artifact, tmp_path / "failed")
    m = read_manifest(folder)
    assert candidates(read_manifest(int8_artifact), "openvino", "avx512+vnni")[0] == ["fp32", "int8"]
    names, skipped = candidates(m, "openvino", "avx512+vnni+bf16")
    assert names == ["fp32", "bf16"] and skipped == {"int8": "its accuracy check failed"}
    m.precision_checks.pop("openvino:int8")
    assert candidates(m, "openvino", "avx2")[1] == {"bf16": "the CPU (avx2) has no native bf16",
                                                    "int8": "no accuracy check recorded"}
    detector = Detector.load(folder, RuntimeOptions(backend="openvino", precision="auto"))
    choice = detector.backend.precision_choice
    # fp32, or bf16 on a CPU that has it natively (and where it passed its check at load): never int8
    assert detector.backend.precision == choice.precision and choice.precision in ("fp32", "bf16")
    assert "int8" not in choice.ms_per_image
    assert choice.skipped["int8"] == "its accuracy check failed" and choice.isa == cpu_isa()
    with pytest.raises(ArtifactError, match="failed its accuracy check"):  # nor when asked by name
        Detector.load(folder, RuntimeOptions(backend="openvino", precision="int8"))


def test_auto_measures_every_passing_precision_and_serves_the_fastest(int8_artifact):
    detector = Detector.load(int8_artifact, RuntimeOptions(backend="openvino", precision="auto"))
    choice = detector.backend.precision_choice
    native_bf16 = "bf16" in cpu_isa() or "amx" in cpu_isa()  # the test runs on AVX2 and AVX-512 bf16 CPUs alike
    assert set(choice.ms_per_image) | set(choice.skipped) == ({"fp32", "int8", "bf16"})
    assert "int8" in choice.ms_per_image and ("bf16" in choice.ms_per_image) == (
        native_bf16 and choice.skipped.get("bf16") != "outside its tolerance of fp32 at load")
    if not native_bf16:
        assert "no native bf16" in choice.skipped["bf16"]
    assert choice.precision == pick(choice.ms_per_image)[0]  # the measured rule, not a guess
    assert detector.backend.provider == f"CPU:{choice.precision}"


@pytest.mark.parametrize("timings,served,passed_over", [
    ({"fp32": 100.0, "int8": 40.0, "bf16": 60.0}, "int8", set()),      # VNNI: the fastest
    ({"fp32": 100.0, "int8": 95.0}, "fp32", {"int8"}),                    # AVX2: a tie is noise, keep fp32
    ({"fp32": 100.0, "int8": 120.0}, "fp32", {"int8"}),                   # slower
    ({"fp32": 100.0, "int8": 95.0, "bf16": 80.0}, "bf16", {"int8"}),     # the fastest that clearly gains
    ({"int8": 50.0}, "int8", set()),                                      # fp32 could not load
])
def test_auto_serves_a_reduced_precision_only_when_it_clearly_beats_fp32(timings, served, passed_over):
    precision, skipped = pick(timings)
    assert precision == served and set(skipped) == passed_over
    assert all("not 1.1x faster" in why for why in skipped.values())


class Load(BackgroundClients):
    """Client threads posting a part back to back; every status kept."""

    def __init__(self, url: str, clients: int = 3):
        self.url, self.statuses, self.lock = url, [], threading.Lock()
        super().__init__(clients, join_timeout_s=30)

    def client_loop(self, stop: threading.Event) -> None:
        with httpx.Client(timeout=60, headers={"X-API-Key": LINE}) as client:
            while not stop.is_set():
                try:
                    r = client.post(f"{self.url}/detect", files={"image": ("p.png", gradient_png(3, 64, 48),
                                                                            "image/png")})
                    status = r.status_code
                except httpx.HTTPError:
                    status = 0
                with self.lock:
                    self.statuses.append(status)

    def wait_for(self, count: int, deadline_s: float = 60) -> None:
        end = time.monotonic() + deadline_s
        while len(self.statuses) < count:
            assert time.monotonic() < end, f"only {len(self.statuses)} answers"
            time.sleep(0.05)


def precision_metric(text: str) -> dict[str, str]:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "dapo_precision_info" and sample.value == 1:
                return sample.labels
    return {}


def test_hot_reload_from_fp32_to_int8_under_load_fails_no_request(int8_artifact):
    settings = Settings(artifact=int8_artifact, backend="openvino", precision="fp32", max_batch_size=4,
                        api_keys=[LINE], admin_keys=[ADMIN], log_level="WARNING", cpu_threads=2)
    with serve_in_thread(create_app(settings, configure_logs=False)) as url, Load(url) as load:
        info = httpx.get(f"{url}/v1/model", headers={"X-API-Key": LINE}, timeout=10).json()["backend"]
        assert (info["name"], info["precision"], info["isa"]) == ("openvino", "fp32", cpu_isa())
        load.wait_for(5)
        r = httpx.post(f"{url}/v1/model/reload", json={"artifact": str(int8_artifact), "precision": "int8"},
                       headers={"X-API-Key": ADMIN}, timeout=120)
        assert r.status_code == 200, r.text
        switched = len(load.statuses)
        load.wait_for(switched + 5)  # answers from the int8 model too
        info = httpx.get(f"{url}/v1/model", headers={"X-API-Key": LINE}, timeout=10).json()["backend"]
        labels = precision_metric(httpx.get(f"{url}/metrics", timeout=10).text)
    assert info["provider"] == "CPU:int8" and info["precision"] == "int8"
    assert labels == {"backend": "openvino", "precision": "int8", "isa": cpu_isa()}
    assert load.statuses and set(load.statuses) == {200}, sorted(set(load.statuses))


def test_quantize_cli_reports_and_refuses_a_root_without_good_parts(tmp_path):
    (tmp_path / "disc" / "scratch").mkdir(parents=True)
    with pytest.raises(ValueError, match="no good images"):
        good_images(tmp_path)
    assert json.loads(json.dumps(TOLERANCES)) == TOLERANCES  # documented values are plain numbers


def test_interleaved_encoder_bench_times_every_configuration_and_says_what_auto_picked(int8_artifact):
    from service.bench import bench_encoder_interleaved

    rows = bench_encoder_interleaved(int8_artifact, ["onnxruntime", "openvino"], ["fp32", "int8", "auto"], [1, 2],
                                     rounds=2)
    assert rows[0] == {"cpu_isa": cpu_isa(), "interleaved_rounds": 2}
    timed = {(r["backend"], r["precision"], r["batch"]): r for r in rows[1:] if "skipped" not in r}
    for backend in ("onnxruntime", "openvino"):
        for precision in ("fp32", "int8", "auto"):
            for batch in (1, 2):
                row = timed[(backend, precision, batch)]
                assert row["ms_per_image"] > 0 and row["img_per_s"] == pytest.approx(1000 / row["ms_per_image"], rel=0.02)
    assert all(timed[("onnxruntime", "fp32", b)]["x_ort_fp32"] == 1.0 for b in (1, 2))
    for backend in ("onnxruntime", "openvino"):  # auto says what it measured at load and what it serves
        auto = timed[(backend, "auto", 1)]
        assert auto["auto_picked"] == pick(auto["auto_ms_per_image_batch1"])[0]


def test_openvino_serves_a_product_s_reference_bank_like_onnxruntime(int8_artifact, textures, tmp_path):
    from training.data import Sample
    from training.references import ReferenceOptions, calibrate_references

    folder = tmp_path / "banked"
    shutil.copytree(int8_artifact, folder)
    good = [Sample(image=p, mask=None, product="wood", defect=None, label=0, class_id=0)
            for p in sorted((textures / "wood" / "good").glob("*.png"))[:6]]
    calibrate_references(folder, good, ReferenceOptions(4, coreset_limit=120), 0.99, 0.999, 8)
    images = [Image.open(p).convert("RGB") for p in sorted((textures / "wood" / "scratch").glob("*.png"))[:2]]
    ort = Detector.load(folder)
    for precision in ("fp32", "int8"):
        ov = Detector.load(folder, RuntimeOptions(backend="openvino", precision=precision))
        assert ov.backend.has_features and "wood" in ov.references.banks
        tolerance = 1e-4 if precision == "fp32" else TOLERANCES["int8"]
        for a, b in zip(ort.predict(images, ort.policy("wood")), ov.predict(images, ov.policy("wood")), strict=True):
            assert abs(a.scores.anomaly_score - b.scores.anomaly_score) <= tolerance
            assert float(np.abs(a.scores.anomaly_map - b.scores.anomaly_map).max()) <= tolerance
        off = ov.predict(images, ov.policy("wood", references=False))
        assert any(abs(x.scores.anomaly_score - y.scores.anomaly_score) > 1e-3
                   for x, y in zip(off, ov.predict(images, ov.policy("wood"))))  # the bank is used
