"""INT8 encoders for CPU stations, calibrated on good parts (`dapo bake --int8`, `dapo quantize`).

What is written, beside an existing verified artifact's encoder.onnx:

* `encoder_int8.xml/.bin`: NNCF post-training quantisation of the OpenVINO model read from
  encoder.onnx (`nncf.quantize`, transformer model type). The layers that make the maps stay in
  f32 (`KEEP_FP32`: the scoring head with its softmaxes and upsampling, the per-tap adapters and
  the final projection): their inputs are L2-normalised features compared by cosine with
  temperature 0.01 (METHOD), so a quantisation step there is multiplied by 100 in the logits.
* ONNX Runtime's own INT8 (`quantize_dynamic`, and static QDQ on the same calibration images),
  written as `encoder_int8_ort.onnx` only if it measures faster than ORT fp32 on this CPU *and*
  passes the check; otherwise only the measurement is recorded (manifest provenance.int8), so a
  station without OpenVINO gains where INT8 pays (VNNI) and loses nothing where it does not.

Calibration data: every product's `good/` images of a folder-layout root, preprocessed by
`Detector.prepare` exactly as the service does. The last `check_images` of them (spread across
products) are held out of calibration and are the accuracy check's inputs: each INT8 encoder vs
the same backend in fp32, under `service.runtime.precision.TOLERANCES["int8"]`; pass or fail is
recorded in `Manifest.precision_checks`, and `DAPO_PRECISION=auto` never picks a failed one.
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from service.runtime.artifact import (
    Manifest,
    Verification,
    file_entry,
    ir_weights,
    load_manifest,
    write_manifest,
)
from service.runtime.detector import Detector, RuntimeOptions
from service.runtime.precision import (
    TOLERANCES,
    compare,
    cpu_isa,
    interleaved_median_ms,
)

log = logging.getLogger("dapo.quantize")

OV_INT8 = "encoder_int8.xml"
ORT_INT8 = "encoder_int8_ort.onnx"
# ONNX node-name patterns (torch.onnx export scopes) kept in f32: see the module docstring
KEEP_FP32 = (r".*/head/.*", r".*/adapters\.\d+/.*", r".*/visual_prompts/MatMul(_\d+)?$")
SPEED_RUNS = 5  # timed batches of 1 per ORT variant (median), after one warm run


@dataclass(frozen=True)
class QuantizeOptions:
    """`calibration`: a folder-layout root (<root>/<product>/good/*)."""

    calibration: Path
    max_images: int = 64  # calibration images at most (spread over products, in sorted order)
    check_images: int = 8  # held out of calibration: the accuracy check's inputs
    ort: bool = True  # also try ONNX Runtime's dynamic and static QDQ INT8
    keep_ort: str = "measured"  # measured: only if faster and passing; always (tests); never


def good_images(root: Path) -> list[Path]:
    """Every product's good/ images under a folder-layout root, interleaved across products so
    any prefix covers all of them."""
    root = Path(root)
    per_product = [sorted(p for p in (d / "good").iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp"})
                   for d in sorted(root.iterdir()) if (d / "good").is_dir()]
    if not any(per_product):
        raise ValueError(f"{root}: no good images (expected <root>/<product>/good/*.png|jpg)")
    out: list[Path] = []
    for i in range(max(map(len, per_product))):
        out += [paths[i] for paths in per_product if i < len(paths)]
    return out


def calibration_split(detector: Detector, options: QuantizeOptions) -> tuple[np.ndarray, np.ndarray]:
    """(calibration pixels, check pixels), each (N, 3, S, S), preprocessed as the service does."""
    paths = good_images(options.calibration)
    n_check = min(options.check_images, max(1, len(paths) // 4))
    if len(paths) < 2:
        raise ValueError(f"{options.calibration}: {len(paths)} good image(s); INT8 calibration needs at least 2")

    def pixels(ps: list[Path]) -> np.ndarray:
        return np.stack([detector.prepare(Image.open(p), filename=str(p)).pixel_values for p in ps])
    check, calib = paths[-n_check:], paths[:-n_check][:options.max_images]
    return pixels(calib), pixels(check)


def _allowed(manifest: Manifest, n: int) -> np.ndarray:
    return np.ones((n, len(manifest.vocabulary)), bool)


def keep_fp32_nodes(onnx_path: Path) -> list[str]:
    """The ONNX node names matching KEEP_FP32 (ONNX Runtime's nodes_to_exclude)."""
    import onnx

    pattern = re.compile("|".join(f"(?:{p})" for p in KEEP_FP32))
    return [n.name for n in onnx.load(str(onnx_path), load_external_data=False).graph.node if pattern.fullmatch(n.name)]


def quantize_openvino(folder: Path, manifest: Manifest, calib: np.ndarray) -> Path:
    """NNCF INT8 of encoder.onnx, calibrated on `calib`, written as encoder_int8.xml/.bin."""
    import nncf
    import openvino as ov

    nncf.set_log_level(logging.WARNING)  # its per-node INFO lines would bury the report
    model = ov.Core().read_model(str(folder / manifest.onnx_file("fp32")))
    allowed = _allowed(manifest, 1)
    dataset = nncf.Dataset([calib[i:i + 1] for i in range(len(calib))],
                           lambda x: {"pixel_values": x, "allowed": allowed})
    quantized = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib),
                              ignored_scope=nncf.IgnoredScope(patterns=list(KEEP_FP32), validate=False))
    out = folder / OV_INT8
    ov.save_model(quantized, str(out), compress_to_fp16=False)  # weights stay as quantised (no fp16 rounding)
    return out


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over the calibration pixels."""

    def __init__(self, calib: np.ndarray, allowed: np.ndarray):
        self._items = iter([{"pixel_values": calib[i:i + 1], "allowed": allowed} for i in range(len(calib))])

    def get_next(self):
        return next(self._items, None)

    def rewind(self):  # pragma: no cover - not called by the MinMax calibrator
        pass


def _fold_every(n: int) -> int:
    """Images per min/max fold of ORT's calibrator: every few, as a ViT-B's activations for a
    whole calibration set would not fit in memory; never a divisor of `n` (onnxruntime 1.2x
    drops the last fold when it is full and then finds no data: "No data is collected")."""
    return next(k for k in range(4, n + 2) if n % k)  # n + 1 never divides n


def quantize_ort_variants(folder: Path, manifest: Manifest, calib: np.ndarray, work: Path) -> dict[str, Path]:
    """ONNX Runtime dynamic and static-QDQ INT8 graphs of encoder.onnx, in `work`."""
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    src = folder / manifest.onnx_file("fp32")
    exclude = keep_fp32_nodes(src)
    out = {"dynamic": work / "dynamic.onnx", "static_qdq": work / "static_qdq.onnx"}
    quantize_dynamic(src, out["dynamic"], weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=exclude)
    quantize_static(src, out["static_qdq"], _Reader(calib, _allowed(manifest, 1)), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                    nodes_to_exclude=exclude,
                    extra_options={"CalibMaxIntermediateOutputs": _fold_every(len(calib))})
    return out


def _check(backend_ref, backend, pixels: np.ndarray, manifest: Manifest) -> Verification:
    allowed = _allowed(manifest, len(pixels))
    return compare(backend_ref.run(pixels, allowed, class_probs=True), backend.run(pixels, allowed, class_probs=True),
                   allowed)


def add_int8(folder: str | Path, options: QuantizeOptions) -> dict:
    """Quantise a verified artifact's encoder in place; returns what was measured and kept.

    The manifest is rewritten last (sha256 of every new file, the checks, the measurements), so
    an interrupted run leaves the artifact as it was (at worst with unlisted extra files)."""
    from service.runtime.backends.openvino_backend import OpenVinoBackend

    folder = Path(folder)
    manifest = load_manifest(folder)
    detector = Detector.load(folder, RuntimeOptions(providers=("CPUExecutionProvider",), verify=False))
    calib, check = calibration_split(detector, options)
    report: dict = {"isa": cpu_isa(), "calibration_images": len(calib), "check_images": len(check),
                    "tolerance": TOLERANCES["int8"], "kept_fp32": list(KEEP_FP32), "seconds": {}}
    t = time.perf_counter()
    xml = quantize_openvino(folder, manifest, calib)
    report["seconds"]["nncf"] = round(time.perf_counter() - t, 2)
    ov_check = _check(OpenVinoBackend(folder / manifest.onnx_file("fp32")), OpenVinoBackend(xml, "int8"), check, manifest)
    files = {f: file_entry(folder / f) for f in (OV_INT8, ir_weights(OV_INT8))}
    manifest.openvino_encoders["int8"] = OV_INT8
    manifest.precision_checks["openvino:int8"] = ov_check
    report["openvino"] = {"passed": ov_check.passed, "max_abs_diff": ov_check.max_abs_diff,
                          "type_map_flips": ov_check.type_map_mismatch_fraction}
    if options.ort:
        report["onnxruntime"] = _ort_int8(folder, manifest, calib, check, options, files)
    manifest.files.update(files)
    manifest.provenance["int8"] = report
    write_manifest(folder, manifest)
    load_manifest(folder)  # what the service will do: schema + every sha256
    log.info("int8: %s", json.dumps(report))
    return report


def _ort_int8(folder: Path, manifest: Manifest, calib: np.ndarray, check: np.ndarray, options: QuantizeOptions,
              files: dict) -> dict:
    """Measure ORT's INT8 variants against ORT fp32; keep the fastest one that is faster and
    passes (or, with keep_ort='always', the best passing one regardless of speed)."""
    import tempfile

    from service.runtime.backends.ort_backend import OrtBackend

    cpu = ["CPUExecutionProvider"]
    fp32 = OrtBackend(folder / manifest.onnx_file("fp32"), providers=cpu)
    x, one = check[:1], _allowed(manifest, 1)
    out: dict = {"variants": {}, "kept": None}
    with tempfile.TemporaryDirectory(prefix="dapo-int8-", dir=folder.parent) as work:
        t = time.perf_counter()
        variants = quantize_ort_variants(folder, manifest, calib, Path(work))
        out["seconds"] = round(time.perf_counter() - t, 2)
        backends = {name: OrtBackend(path, providers=cpu, precision="int8") for name, path in variants.items()}
        timed = interleaved_median_ms({"fp32": fp32, **backends}, x, one, warm=1, runs=SPEED_RUNS)  # in turns
        fp32_ms = timed["fp32"]
        out["fp32_ms_batch1"] = round(fp32_ms, 2)
        best = None
        for name, path in variants.items():
            backend = backends[name]
            verdict = _check(fp32, backend, check, manifest)
            ms = timed[name]
            out["variants"][name] = {"passed": verdict.passed, "ms_batch1": round(ms, 2),
                                     "speedup_vs_fp32": round(fp32_ms / ms, 3), "max_abs_diff": verdict.max_abs_diff,
                                     "type_map_flips": verdict.type_map_mismatch_fraction}
            eligible = verdict.passed and (options.keep_ort == "always" or ms < fp32_ms)
            if eligible and options.keep_ort != "never" and (best is None or ms < best[1]):
                best = (name, ms, path, verdict)
        if best is None:
            out["why_not_kept"] = ("keep_ort=never" if options.keep_ort == "never" else
                                   "no variant both measured faster than fp32 on this CPU and passed the check")
            return out
        name, _, path, verdict = best
        (folder / ORT_INT8).write_bytes(path.read_bytes())
    files[ORT_INT8] = file_entry(folder / ORT_INT8)
    manifest.onnx_encoders["int8"] = ORT_INT8
    manifest.precision_checks["onnxruntime:int8"] = verdict
    out["kept"] = name
    return out
