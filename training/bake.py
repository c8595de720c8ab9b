"""`dapo bake`: turn a model (learned checkpoint or handcrafted prompts) into a served artifact.

Text features for the vocabulary are computed once here (the reference prototype recomputed
them for every image). The image side is exported twice (ONNX, plain-torch safetensors) and
bake checks its own work: the training model, ONNX Runtime and the service's torch encoder
run the same inputs, and bake fails if any output differs by more than the tolerance.

With `fp16=True` (`dapo bake --fp16`) bake also writes `encoder_fp16.onnx` (fp16 compute for
ONNX Runtime on a GPU, fp32 inputs/outputs) and checks it the same way against the fp32 model,
through the service's ONNX Runtime backend on the CPU provider, with fp16 tolerances.

Re-baking a learned checkpoint with a longer vocabulary needs no training: a defect word the
prompts never saw gets its own class id, features and masks (the paper's zero-shot claim).
"""
from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import save_file

from service.runtime.artifact import (BackboneInfo, FileEntry, Manifest, Product, VocabEntry, Verification, file_entry,
                                      load_manifest, write_manifest)
from service.runtime.backends import create_backend
from service.runtime.backends.base import FEATURE_OUTPUTS, GRAPH_OUTPUTS, EncoderOutputs
from training.backbone import TINY, BackboneSpec
from training.data.vocab import defect_words
from training.export import (ExportModule, encoder_geometry, export_onnx, export_onnx_fp16, export_safetensors,
                             torch_export_supported)
from training.model import DapoConfig, DapoModel
from training.prompts import abnormal_feature, handcrafted_text_features

TOLERANCE = 1e-4
TYPE_MAP_TOLERANCE = 1e-3
# encoder_fp16.onnx vs the fp32 model (ORT CPU provider; random weights, so not the final word
# for trained ones). Max abs diff over all outputs measured: demo (dapo-tiny@112) 6.2e-4,
# dapo-tiny-b@84 5.9e-4, @168 6.8e-4, ViT-B/16@224 6.7e-4, ViT-L/14@336 6.9e-4, @518 7.5e-4,
# always in anomaly_map; type-map pixels that flipped were all near-ties (0.04-0.6 %).
FP16_TOLERANCE = 1e-2
FP16_TYPE_MAP_TOLERANCE = 1e-3  # beyond near-ties (see verify_fp16_export)
FP16_ONNX = "encoder_fp16.onnx"
DEMO_IMAGE_SIZE = 112
DEMO_VOCAB = ["scratch", "hole", "crack", "contamination", "bent", "discoloration"]
DEMO_PRODUCTS = {
    "disc": Product(defect_types=["scratch", "hole", "crack"]),
    "plate": Product(defect_types=["hole", "contamination", "discoloration"], image_threshold=0.6),
}


@dataclass(frozen=True)
class BakeOptions:
    """Everything `bake` needs besides the model and its words (the knobs of `dapo bake`).

    The first group ends up in the manifest; the second decides how the export is checked."""

    name: str
    version: str = "0.1.0"
    description: str = ""
    prompts: Literal["learned", "handcrafted"] = "learned"
    products: dict[str, Product] = field(default_factory=dict)
    image_threshold: float = 0.5
    pixel_threshold: float | None = None
    gaussian_sigma: float = 0.0
    image_score: Literal["global", "global_max"] = "global"
    provenance: dict = field(default_factory=dict)
    # the export and its checks
    overwrite: bool = False
    tolerance: float = TOLERANCE
    fp16: bool = False  # also write encoder_fp16.onnx, checked against the fp32 model
    fp16_tolerance: float = FP16_TOLERANCE
    fp16_type_map_tolerance: float = FP16_TYPE_MAP_TOLERANCE


@dataclass
class BakeReport:
    folder: Path
    manifest: Manifest
    seconds: dict[str, float]
    sizes: dict[str, int]


def bake_vocabulary(words: list[str]) -> list[str]:
    """The defect words of an artifact: `defect_words`, the rule `dapo train` applies too."""
    out = list(defect_words(words))
    if not out:
        raise ValueError("the defect vocabulary is empty")
    return out


@torch.no_grad()
def text_features_for(model: DapoModel, words: list[str], prompts: str) -> torch.Tensor:
    if prompts == "learned":
        return model.text_features(words)
    if prompts == "handcrafted":
        return handcrafted_text_features(model.clip, model.text_prompts.tokenizer, words)
    raise ValueError(f"prompts must be 'learned' or 'handcrafted', got {prompts!r}")


def _compare(ref: EncoderOutputs, other: EncoderOutputs) -> tuple[dict[str, float], float]:
    diffs = {n: float(np.max(np.abs(getattr(ref, n).astype(np.float64) - getattr(other, n))))
             for n in (*GRAPH_OUTPUTS, *FEATURE_OUTPUTS)
             if n not in ("type_map", "defect_type_map") and getattr(other, n) is not None}
    mismatch = float(np.mean(ref.type_map != other.type_map))
    if other.defect_type_map is not None:
        mismatch = max(mismatch, float(np.mean(ref.defect_type_map != other.defect_type_map)))
    return diffs, mismatch


def _type_map_flips(ref: EncoderOutputs, other: EncoderOutputs, allowed: np.ndarray,
                    tie_margin: float) -> tuple[float, float]:
    """(fraction of pixels whose type differs beyond a near-tie, fraction that differs at one).

    A pixel is a near-tie if the reference probability of the class `other` picked is within
    tie_margin of the reference winner's; a disallowed pick is never a tie."""
    probs = np.where(allowed[:, :, None, None], ref.class_probs, -1.0)  # as the head masks them
    picked = np.take_along_axis(probs, other.type_map[:, None].astype(np.int64), 1)[:, 0]
    best = np.take_along_axis(probs, ref.type_map[:, None].astype(np.int64), 1)[:, 0]
    differ = ref.type_map != other.type_map
    beyond = differ & (best - picked > tie_margin)
    return float(np.mean(beyond)), float(np.mean(differ & ~beyond))


def _verification_inputs(manifest: Manifest, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = manifest.image_size
    pixels = rng.standard_normal((batch, 3, s, s), dtype=np.float32)
    allowed = rng.random((batch, len(manifest.vocabulary))) < 0.6
    allowed[:, 0] = True
    return pixels, allowed


@torch.no_grad()
def _reference(module: ExportModule, pixels: np.ndarray, allowed: np.ndarray) -> EncoderOutputs:
    return EncoderOutputs(*(t.numpy() for t in module(torch.from_numpy(pixels), torch.from_numpy(allowed))))


def _verdict(worst: dict[str, float], mismatch: float, tolerance: float, type_map_tolerance: float,
             **extra) -> Verification:
    passed = all(v <= tolerance for v in worst.values()) and mismatch <= type_map_tolerance
    return Verification(max_abs_diff=worst, type_map_mismatch_fraction=mismatch, tolerance=tolerance, passed=passed,
                        type_map_tolerance=type_map_tolerance, **extra)


@torch.no_grad()
def verify_export(module: ExportModule, folder: Path, manifest: Manifest, batch: int = 2, seed: int = 0,
                  tolerance: float = TOLERANCE, backends: tuple[str, ...] = ("onnxruntime", "torch")) -> Verification:
    """Run the training model and each exported backend on the same inputs; compare outputs."""
    pixels, allowed = _verification_inputs(manifest, batch, seed)
    ref = _reference(module, pixels, allowed)
    worst: dict[str, float] = {}
    mismatch = 0.0
    for name in backends:
        out = create_backend(folder, manifest, backend=name, providers=["CPUExecutionProvider"], device="cpu") \
            .run(pixels, allowed, class_probs=True, features=True)
        diffs, mm = _compare(ref, out)
        for k, v in diffs.items():
            worst[f"{name}.{k}"] = v
        mismatch = max(mismatch, mm)
    return _verdict(worst, mismatch, tolerance, TYPE_MAP_TOLERANCE)


# Runs encoder_fp16.onnx through the service's ORT backend in a child process, so that a graph
# ONNX Runtime cannot load (it has segfaulted on fp16 graphs) fails the bake with a message
# instead of killing it.
_FP16_RUNNER = """
import sys
import numpy as np
from service.runtime.backends.base import GRAPH_OUTPUTS
from service.runtime.backends.ort_backend import OrtBackend
feeds = np.load(sys.argv[2])
backend = OrtBackend(sys.argv[1], providers=["CPUExecutionProvider"], precision="fp16")
out = backend.run(feeds["pixel_values"], feeds["allowed"], class_probs=True)
np.savez(sys.argv[3], **{n: getattr(out, n) for n in GRAPH_OUTPUTS})
"""


def run_onnx_fp16_isolated(path: Path, pixels: np.ndarray, allowed: np.ndarray,
                           timeout: float = 1800) -> EncoderOutputs:
    """encoder_fp16.onnx's outputs on the CPU provider, computed in a child process."""
    import onnxruntime

    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryDirectory(prefix="dapo-fp16-") as work:
        feeds, result = Path(work) / "feeds.npz", Path(work) / "out.npz"
        np.savez(feeds, pixel_values=pixels, allowed=allowed)
        proc = subprocess.run([sys.executable, "-c", _FP16_RUNNER, str(path), str(feeds), str(result)],
                              check=False, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            raise RuntimeError(f"{path.name}: ONNX Runtime {onnxruntime.__version__} (CPUExecutionProvider) failed to "
                               f"load or run the fp16 graph ({how}){': ' + tail if tail else ''}")
        with np.load(result) as z:
            return EncoderOutputs(**{n: z[n] for n in GRAPH_OUTPUTS})


@torch.no_grad()
def verify_fp16_export(module: ExportModule, folder: Path, manifest: Manifest, batch: int = 2, seed: int = 0,
                       tolerance: float = FP16_TOLERANCE,
                       type_map_tolerance: float = FP16_TYPE_MAP_TOLERANCE) -> Verification:
    """encoder_fp16.onnx (ONNX Runtime, CPU provider) vs the fp32 training model, same inputs as
    `verify_export`; the fp32 exports are already within TOLERANCE of that model.

    Type-map pixels may flip where two allowed classes' probabilities are within `tolerance` of
    each other (rounding decides a near-tie; with untrained weights most pixels are near-ties):
    those are reported, not counted. Beyond that, type_map_tolerance applies."""
    pixels, allowed = _verification_inputs(manifest, batch, seed)
    ref = _reference(module, pixels, allowed)
    out = run_onnx_fp16_isolated(folder / FP16_ONNX, pixels, allowed)
    diffs, _ = _compare(ref, out)
    mismatch, at_ties = _type_map_flips(ref, out, allowed, tolerance)
    return _verdict({f"onnxruntime_fp16.{k}": v for k, v in diffs.items()}, mismatch, tolerance, type_map_tolerance,
                    type_map_tie_margin=tolerance, type_map_flips_at_ties=at_ties)


def bake(model: DapoModel, words: list[str], out_dir: str | Path, options: BakeOptions) -> BakeReport:
    """Write a verified artifact folder; nothing is left at out_dir if any step fails.

    options.fp16: also write encoder_fp16.onnx, verified against the fp32 model within
    fp16_tolerance (outputs) and fp16_type_map_tolerance (fraction of type-map pixels that differ)."""
    o = options
    words = bake_vocabulary(words)
    out_dir = Path(out_dir)
    if out_dir.exists() and not o.overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--force) to replace it")
    model.eval()
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    text = text_features_for(model, words, o.prompts).float()
    abnormal = abnormal_feature(text)
    seconds["text_features"] = time.perf_counter() - t0

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bake-", dir=out_dir.parent))
    try:
        save_file({"text_features": text.contiguous(), "abnormal_feature": abnormal.contiguous()},
                  str(tmp / "text_features.safetensors"))
        module = ExportModule(model, text, abnormal).eval()
        t = time.perf_counter()
        export_onnx(module, tmp / "encoder.onnx", model.geometry["image_size"], len(words) + 1)
        seconds["export_onnx"] = time.perf_counter() - t
        files = ["text_features.safetensors", "encoder.onnx"]
        onnx_encoders = {"fp32": "encoder.onnx"}
        if o.fp16:
            t = time.perf_counter()
            export_onnx_fp16(tmp / "encoder.onnx", tmp / FP16_ONNX)
            seconds["export_onnx_fp16"] = time.perf_counter() - t
            files.append(FP16_ONNX)
            onnx_encoders["fp16"] = FP16_ONNX
        unsupported = torch_export_supported(model)
        if unsupported is None:
            export_safetensors(model, text, abnormal, tmp / "encoder.safetensors")
            files.append("encoder.safetensors")
        manifest = _manifest(model, words, o, {f: file_entry(tmp / f) for f in files})
        manifest.onnx_encoders = onnx_encoders
        if unsupported:
            manifest.provenance["torch_backend"] = f"not exported: {unsupported}"
        t = time.perf_counter()
        backends = ("onnxruntime", "torch") if unsupported is None else ("onnxruntime",)
        manifest.verification = verify_export(module, tmp, manifest, tolerance=o.tolerance, backends=backends)
        seconds["verify"] = time.perf_counter() - t
        if not manifest.verification.passed:
            raise RuntimeError(f"export verification failed (tolerance {o.tolerance}): "
                               f"{manifest.verification.model_dump()}")
        if o.fp16:
            t = time.perf_counter()
            manifest.verification_fp16 = verify_fp16_export(module, tmp, manifest, tolerance=o.fp16_tolerance,
                                                            type_map_tolerance=o.fp16_type_map_tolerance)
            seconds["verify_fp16"] = time.perf_counter() - t
            if not manifest.verification_fp16.passed:
                raise RuntimeError(f"fp16 export verification failed: {FP16_ONNX} differs from the fp32 model by more "
                                   f"than tolerance {o.fp16_tolerance} (type map {o.fp16_type_map_tolerance}): "
                                   f"{manifest.verification_fp16.model_dump()}")
        write_manifest(tmp, manifest)
        load_manifest(tmp)  # what the service will do: schema + every sha256
        _readable_by_all(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    seconds["total"] = time.perf_counter() - t0
    sizes = {f: (out_dir / f).stat().st_size for f in manifest.files}
    return BakeReport(out_dir, manifest, seconds, sizes)


def _readable_by_all(folder: Path) -> None:
    """mkdtemp makes the folder 0700 and safetensors writes 0600: the serving container runs as
    another uid than the one that baked (compose: DAPO_UID vs 10001), and an artifact holds no
    secret, so folder 0755 and files 0644."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def _manifest(model: DapoModel, words: list[str], o: BakeOptions, files: dict[str, FileEntry]) -> Manifest:
    """The manifest of a bake: the options, the model's geometry, the files (verification later)."""
    geo = encoder_geometry(model)
    spec = model.config.backbone
    mean, std = model.normalisation
    manifest = Manifest(
        name=o.name, version=o.version, created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        description=o.description,
        backbone=BackboneInfo(name=Path(spec.name).stem if spec.name.endswith(".json") else spec.name,
                              pretrained=Path(spec.pretrained).name if spec.pretrained else None,
                              patch_size=geo.patch_size, width=geo.width, layers=geo.layers,
                              heads=geo.heads, embed_dim=geo.embed_dim, act=geo.act,
                              layer_scale=geo.layer_scale, ln_pre=geo.ln_pre, norm_eps=geo.norm_eps,
                              mlp_width=geo.mlp_width),
        image_size=geo.image_size, mean=mean, std=std, tapped_layers=geo.taps,
        visual_prompt_tokens=geo.prompt_tokens, prompt_alpha=geo.alpha, temperature=geo.temperature,
        prompts=o.prompts, text_mode=model.config.text_mode,
        vocabulary=[VocabEntry(id=i, name=n) for i, n in enumerate(["normal", *words])],
        products=dict(o.products), image_threshold=o.image_threshold, pixel_threshold=o.pixel_threshold,
        gaussian_sigma=o.gaussian_sigma, image_score=o.image_score, files=files, provenance=dict(o.provenance),
    )
    if manifest.encoder_geometry() != geo:  # the manifest must give the service back what export used
        raise RuntimeError(f"manifest geometry {manifest.encoder_geometry()} != the model's {geo}")
    return manifest


def demo_model(image_size: int = DEMO_IMAGE_SIZE, seed: int = 42) -> DapoModel:
    """The tiny random-weight model behind the demo artifact (plumbing only, not a detector)."""
    spec = BackboneSpec(name=TINY, pretrained=None, image_size=image_size, seed=seed)
    return DapoModel(DapoConfig(backbone=spec, seed=seed))


def bake_demo(out_dir: str | Path, overwrite: bool = True, fp16: bool = False, *, seed: int = 42,
              version: str = "0.1.0") -> BakeReport:
    """A complete artifact from a tiny random OpenCLIP ViT, in seconds, with no downloads.

    Another seed gives other random weights, hence other scores: two demo versions are what the
    model-swap and rolling-update tests switch between."""
    return bake(demo_model(seed=seed), DEMO_VOCAB, out_dir, BakeOptions(
        name="dapo-demo", version=version, products=dict(DEMO_PRODUCTS),
        description="DEMO: tiny randomly initialised OpenCLIP ViT with untrained DAPO prompts. "
                    "Exercises the whole pipeline; its scores carry no meaning.",
        provenance={"kind": "demo", "weights": "random", "seed": seed}, overwrite=overwrite, fp16=fp16))
