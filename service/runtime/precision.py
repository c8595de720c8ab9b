"""Which precision a CPU station runs: the CPU's ISA, the accuracy bar per precision, and
`DAPO_PRECISION=auto`.

Why measure instead of a rule: the same INT8 model measured 3.6x faster than fp32 on an
AVX-512 VNNI CPU and 0.8x (slower) on an AVX2 one; stations in plants differ the same way. So
`auto` runs, at load, a few warm batches of 1 through each precision this backend can serve
from the artifact *and* whose accuracy check passed at bake (`Manifest.precision_checks`), and
keeps the fastest; a reduced precision only if it is at least `AUTO_MIN_GAIN` (1.1x) faster
than fp32, since it costs some accuracy and a smaller gain is within the noise. A precision that
failed its check, or that the CPU lacks (bf16 without AVX-512 bf16 / AMX), is never a candidate;
fp32 always is, so auto is never slower than the backend's fp32 by more than the measurement's
noise.

The tolerances below are the one definition of "passes" for reduced precisions: bake
(`training.quantize`) checks against them, and bf16 (no file, so no bake check) is checked here
at load against fp32 on the measurement's inputs.
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.runtime.artifact import Verification
from service.runtime.backends.base import GRAPH_OUTPUTS, EncoderOutputs

log = logging.getLogger("dapo.precision")

# Largest abs difference from fp32 (anomaly_score, type_scores, anomaly_map, class_max) and the
# largest fraction of type-map pixels that may flip beyond near-ties (a pixel whose two best
# allowed classes are within the tolerance of each other is a near-tie: rounding decides it).
# int8: NNCF with the scoring head, adapters and final projection kept in f32 (training.quantize);
# measured on the demo and a random ViT-B/16@224 well below these (see docs/cpu-backends.md).
TOLERANCES = {"bf16": 2e-2, "int8": 5e-2}
TYPE_MAP_TOLERANCES = {"bf16": 1e-2, "int8": 2e-2}
AUTO_RUNS = 5  # timed rounds (one batch of 1 per candidate each, after 2 warm rounds); medians compared
AUTO_WARM = 2
# a reduced precision serves only when it measures this many times faster than fp32 at load (`pick`)
AUTO_MIN_GAIN = 1.1
CPU_BACKENDS = ("onnxruntime", "openvino")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_isa(flags: set[str] | None = None) -> str:
    """The vector ISA that decides reduced-precision speed, as one label: avx512 / avx2 / sse,
    then +vnni (int8 dot products), +bf16, +amx. e.g. 'avx2' (no VNNI: int8 is not faster)."""
    f = cpu_flags() if flags is None else flags
    base = "avx512" if "avx512f" in f else "avx2" if "avx2" in f else "sse" if f else "unknown"
    extras = [("vnni", {"avx512_vnni", "avx_vnni"}), ("bf16", {"avx512_bf16"}), ("amx", {"amx_bf16", "amx_int8"})]
    return "+".join([base, *(name for name, any_of in extras if f & any_of)])


@dataclass
class Choice:
    """What auto measured and picked (for /v1/model, the startup log and the metric)."""

    backend: str
    precision: str
    isa: str
    ms_per_image: dict[str, float] = field(default_factory=dict)  # candidate precision -> median ms, batch 1
    skipped: dict[str, str] = field(default_factory=dict)  # precision -> why it was not a candidate

    def to_dict(self) -> dict:
        return {"backend": self.backend, "precision": self.precision, "isa": self.isa,
                "ms_per_image": self.ms_per_image, "skipped": self.skipped}


def precision_info(backend) -> dict:
    """What /v1/model, the startup log and dapo_precision_info say about a loaded backend: its
    precision, the CPU's ISA, and with auto what was measured."""
    precision = getattr(backend, "precision", None) or str(backend.provider).rsplit(":", 1)[-1]
    choice = getattr(backend, "precision_choice", None)
    return {"backend": backend.name, "precision": precision, "isa": cpu_isa(),
            "precision_auto": choice.to_dict() if choice is not None else None}


def candidates(manifest, backend: str, isa: str) -> tuple[list[str], dict[str, str]]:
    """The precisions auto may measure for this backend and artifact, and why others are not."""
    if backend not in CPU_BACKENDS:
        raise ValueError(f"precision auto is for the CPU backends {CPU_BACKENDS}, not {backend!r}")
    out, skipped = ["fp32"], {}
    wanted = ("int8",) if backend == "onnxruntime" else ("bf16", "int8")
    for precision in wanted:
        has_file = precision == "bf16" or (manifest.onnx_file(precision) if backend == "onnxruntime"
                                           else manifest.openvino_file(precision)) is not None
        if not has_file:
            skipped[precision] = "not in the artifact"
        elif precision == "bf16" and not ("bf16" in isa or "amx" in isa):
            skipped[precision] = f"the CPU ({isa}) has no native bf16"
        elif precision != "bf16" and not manifest.precision_passed(backend, precision):
            check = manifest.precision_checks.get(f"{backend}:{precision}")
            skipped[precision] = "its accuracy check failed" if check is not None else "no accuracy check recorded"
        else:
            out.append(precision)
    return out, skipped


def interleaved_median_ms(backends: dict, x: np.ndarray, allowed: np.ndarray, warm: int = AUTO_WARM,
                          runs: int = AUTO_RUNS) -> dict[str, float]:
    """{name: median ms per call}, the backends timed **in turns** (one call of each per round,
    after `warm` untimed rounds): a station's load that changes during the measurement (another
    process, a thermal step) then weighs on every candidate alike, where timing one candidate
    after the other let the load decide the choice (auto's measurement; bake's INT8 check)."""
    for _ in range(warm):
        for backend in backends.values():
            backend.run(x, allowed)
    times: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(runs):
        for name, backend in backends.items():
            t = time.perf_counter()
            backend.run(x, allowed)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) * 1000.0 for name, v in times.items()}


def compare(ref: EncoderOutputs, out: EncoderOutputs, allowed: np.ndarray, precision: str = "int8") -> Verification:
    """`out` vs the fp32 `ref` (same inputs, class maps fetched) under the precision's tolerance;
    type-map flips at near-ties (two allowed classes within the tolerance) are reported, not counted.
    The one test of "passes": bake's INT8 check and auto's bf16 check at load both use it."""
    tol = TOLERANCES[precision]
    diffs = {n: float(np.max(np.abs(getattr(ref, n).astype(np.float64) - getattr(out, n))))
             for n in GRAPH_OUTPUTS if n not in ("type_map", "class_probs")}
    probs = np.where(allowed[:, :, None, None], ref.class_probs, -1.0)
    picked = np.take_along_axis(probs, out.type_map[:, None].astype(np.int64), 1)[:, 0]
    best = np.take_along_axis(probs, ref.type_map[:, None].astype(np.int64), 1)[:, 0]
    differ = ref.type_map != out.type_map
    beyond = float(np.mean(differ & (best - picked > tol)))
    passed = all(v <= tol for v in diffs.values()) and beyond <= TYPE_MAP_TOLERANCES[precision]
    return Verification(max_abs_diff=diffs, type_map_mismatch_fraction=beyond, tolerance=tol, passed=passed,
                        type_map_tolerance=TYPE_MAP_TOLERANCES[precision], type_map_tie_margin=tol,
                        type_map_flips_at_ties=float(np.mean(differ)) - beyond)


def pick(timings: dict[str, float]) -> tuple[str, dict[str, str]]:
    """The precision auto serves from measured {precision: ms}, and why faster-looking ones were
    passed over: a reduced precision must beat fp32 by AUTO_MIN_GAIN, since it costs accuracy and
    a tie is measurement noise (on a CPU without VNNI, OpenVINO INT8 and fp32 measure within a
    few % of each other, and the lower of two equal numbers is a coin toss)."""
    fp32 = timings.get("fp32")
    passed_over = {p: f"measured {t} ms against fp32's {fp32} ms: not {AUTO_MIN_GAIN}x faster"
                   for p, t in timings.items() if fp32 is not None and p != "fp32" and t * AUTO_MIN_GAIN > fp32}
    eligible = {p: t for p, t in timings.items() if p not in passed_over}
    return (min(eligible, key=eligible.__getitem__) if eligible else "fp32"), passed_over


def choose(manifest, backend: str, build, seed: int = 0):
    """Measure each candidate at batch 1 on this CPU and return (the fastest backend, Choice).

    `build(precision)` makes the backend at a precision. The losers are dropped; bf16, which has
    no bake check, must also come within its tolerance of fp32 on the measured input."""
    isa = cpu_isa()
    names, skipped = candidates(manifest, backend, isa)
    s, c = manifest.image_size, len(manifest.vocabulary)
    x = np.random.default_rng(seed).standard_normal((1, 3, s, s), dtype=np.float32)
    allowed = np.ones((1, c), bool)
    built, reference = {}, None
    for precision in names:
        try:
            candidate = build(precision)
        except Exception as e:  # noqa: BLE001 - a candidate that cannot load is skipped, with the reason
            skipped[precision] = f"failed to load: {e}"
            continue
        if precision == "fp32":
            reference = candidate.run(x, allowed, class_probs=True)
        elif precision == "bf16" and reference is not None and not compare(
                reference, candidate.run(x, allowed, class_probs=True), allowed, "bf16").passed:
            skipped[precision] = "outside its tolerance of fp32 at load"
            continue
        built[precision] = candidate
    timings = {p: round(ms, 3) for p, ms in interleaved_median_ms(built, x, allowed).items()} if built else {}
    best_precision, not_faster = pick(timings)
    skipped.update(not_faster)
    best = built.get(best_precision)
    if best is None:
        raise RuntimeError(f"precision auto: no precision of {backend} could run: {skipped}")
    choice = Choice(backend, best_precision, isa, timings, skipped)
    log.info("precision auto: %s %s on %s (ms per image at batch 1: %s; skipped: %s)", backend, best_precision, isa,
             timings, skipped)
    best.precision_choice = choice
    return best, choice
