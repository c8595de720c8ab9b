"""The artifact folder: the only thing `training/` and `service/` share.

An artifact is a self-describing folder (like a Triton model repository entry):

    manifest.json               this schema; every other file listed with its sha256
    text_features.safetensors   "text_features" (C, D) float32, row i = class id i (0 = normal);
                                "abnormal_feature" (D,) the generic abnormal feature t_Abar
    encoder.onnx                image encoder + visual prompts + adapters + scoring head
    encoder.safetensors         the same weights for the PyTorch backend (no pickle)
    encoder_fp16.onnx           optional (`dapo bake --fp16`): the ONNX graph with fp16 compute
                                for ONNX Runtime on a GPU; same inputs and outputs (dtypes too)
    encoder_int8.xml/.bin       optional (`dapo bake --int8`, `dapo quantize`): the encoder
                                quantised by NNCF for OpenVINO, calibrated on good parts
    encoder_int8_ort.onnx       optional: ONNX Runtime's own INT8 graph, written only where it
                                measured faster than fp32 and passed its accuracy check
    references/<product>.safetensors  optional (`dapo calibrate --references K`): a product's bank
                                of good-part features (see `service.runtime.references`)

Both encoder files implement one contract (see `service.runtime.backends.base`): inputs
`pixel_values` (B, 3, S, S) float32 and `allowed` (B, C) bool; outputs `anomaly_score`,
`type_scores`, `anomaly_map`, `type_map`, `class_max`.

Loading verifies every file's sha256 before anything is deserialised, so a truncated copy or
a tampered file is refused with a message that names it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, Field, ValidationError, model_validator

SCHEMA_VERSION = 3  # see UPGRADES for what each version added
MANIFEST = "manifest.json"
DEMO_ARTIFACT = Path("model_artifacts/demo")  # where `dapo bake --demo` writes and `dapo serve` looks


class ArtifactError(RuntimeError):
    """An artifact folder that cannot be served; the message names the offending file."""


class FileEntry(BaseModel):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class VocabEntry(BaseModel):
    id: int = Field(ge=0, le=255)
    name: str = Field(min_length=1)


class ScoreBaseline(BaseModel):
    """Good-part image-score distribution at calibration: the reference the service's drift
    statistics compare against (see `service.runtime.drift`)."""

    cuts: list[float]  # ascending bin cut points (the good scores' quantiles); len(cuts) + 1 bins
    fractions: list[float]  # fraction of the calibration images in each bin
    mean: float
    std: float = Field(ge=0.0)
    images: int = Field(ge=1)

    @model_validator(mode="after")
    def _check(self) -> "ScoreBaseline":
        if len(self.fractions) != len(self.cuts) + 1:
            raise ValueError(f"{len(self.cuts)} cuts need {len(self.cuts) + 1} fractions, got {len(self.fractions)}")
        if any(b <= a for a, b in zip(self.cuts, self.cuts[1:])):
            raise ValueError("baseline cuts must be strictly ascending")
        if any(f < 0 for f in self.fractions) or abs(sum(self.fractions) - 1.0) > 1e-6:
            raise ValueError("baseline fractions must be >= 0 and sum to 1")
        return self


class Tiling(BaseModel):
    """Tiled inspection of a product (see `service.runtime.tiling` and docs/tiling.md): the
    upload is cut into `tile` x `tile` squares (original pixels) overlapping by `overlap` px,
    each seen by the encoder at its full input size, and the maps are stitched back.
    `image_score`: how the image score combines the whole-image pass and the tiles;
    `map_max_side`: the cap on the stitched map's size (service.runtime.tiling)."""

    tile: int = Field(ge=16)
    overlap: int = Field(default=0, ge=0)
    image_score: Literal["max", "whole", "tiles", "mean"] = "max"
    # the stitched map's longer side at most this (px); below it the tiles' full map density.
    # Why a cap: an S x S tile map is an upsampled patch grid (37 x 37 at S = 518), so 4 x 4
    # tiles at full density (2072 px) cost 16x the rendering for no information
    map_max_side: int = Field(default=1024, ge=16)

    @model_validator(mode="after")
    def _check(self) -> "Tiling":
        if self.overlap >= self.tile:
            raise ValueError(f"tiling overlap {self.overlap} must be smaller than the tile {self.tile}")
        return self
class BranchStats(BaseModel):
    """A score branch's distribution on a product's good parts, leave-one-out: what turns it into
    a z-score, so that branches of different units can be fused without defective samples."""

    mean: float
    std: float = Field(gt=0.0)


# A reference bank's choices; the first of each tuple is what `dapo calibrate --references` writes.
Fusion = Literal["mean", "max"]  # how the z-scored branches are combined (measured: docs/references.md)
GlobalFeature = Literal["patch_mean", "class_token"]  # the image descriptor (References.global_feature)
Squash = Literal["softsign", "sigmoid"]  # fused z -> [0, 1] (References.squash)
FUSIONS, GLOBAL_FEATURES, SQUASHES = get_args(Fusion), get_args(GlobalFeature), get_args(Squash)


class References(BaseModel):
    """A product's reference bank (`dapo calibrate --references K`); see service.runtime.references."""

    file: str  # the bank's safetensors file, listed (sha256) in `files`
    images: int = Field(ge=1)  # good images it was built from
    patches: int = Field(ge=1)  # patch features kept (after coreset subsampling)
    coreset_limit: int = Field(ge=1)  # most patches kept (greedy coreset past it)
    fusion: Fusion = "mean"  # how the z-scored branches are combined (measured: docs/references.md)
    dapo_map: BranchStats  # DAPO's anomaly map, per pixel
    nn_map: BranchStats  # nearest-neighbour patch distance, per pixel (upsampled)
    dapo_image: BranchStats  # DAPO's image score (the manifest's image_score mode)
    nn_global: BranchStats  # nearest-neighbour distance of the global feature
    nn_patch_max: BranchStats  # max over the image's patches of the nearest-neighbour distance
    # the tile side (original px) the bank's patches were cut at: a tiled product's bank holds its
    # good parts' tile features (docs/tiling.md); None = whole images. Must equal the product's tiling
    tile: int | None = Field(default=None, ge=16)
    # the image-level descriptor the bank's `globals` hold and each image is searched with
    # (service.runtime.references.global_query): "patch_mean", the L2-normalised mean of the
    # image's reference patch features (what `dapo calibrate --references` writes), or
    # "class_token", DAPO's pooled global feature (manifests without the field: every bank built
    # before the descriptor was measured, served as they were built)
    global_feature: GlobalFeature = "class_token"
    # how a fused z-score becomes a score in [0, 1] (service.runtime.references.squash): "softsign"
    # for the banks `dapo calibrate --references` writes; "sigmoid" for manifests without the field
    # (their thresholds and baselines were computed with it, so they are served as they were built)
    squash: Squash = "sigmoid"


class Product(BaseModel):
    """Per-product settings: which defect types may compete, its thresholds, its score baseline,
    and its tiling (None = the whole image in one encoder pass; manifests without the field,
    i.e. every one written before tiling existed, read as untiled: no schema step needed)."""

    defect_types: list[str] | None = None  # None = the whole vocabulary
    image_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    pixel_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    baseline: ScoreBaseline | None = None  # written by `dapo calibrate`; None = no drift statistic
    tiling: Tiling | None = None  # `dapo calibrate --tile PX` or `dapo bake --products`; None = untiled
    references: References | None = None  # schema 3; None = zero-shot only
    # the line's cycle: a /detect for this product not answered within it gets 504 (the service's
    # DAPO_REQUEST_TIMEOUT_MS when None; a request's X-Deadline-Ms header wins); older manifests load unchanged
    timeout_ms: int | None = Field(default=None, ge=1, le=3_600_000)


class BackboneInfo(BaseModel):
    name: str
    pretrained: str | None = None
    patch_size: int
    width: int
    layers: int
    heads: int
    embed_dim: int
    act: Literal["gelu", "quick_gelu"] = "gelu"
    # OpenCLIP ViT options beyond plain CLIP (service.runtime.backends.torch_model.EncoderOptions);
    # the defaults are plain CLIP's, so manifests written before these fields read the same
    layer_scale: bool = False
    ln_pre: bool = True
    norm_eps: float = Field(1e-5, gt=0)
    mlp_width: int | None = Field(None, gt=0)


class EncoderGeometry(BaseModel):
    """The image side's shape: what the plain-PyTorch encoder needs to rebuild it.

    One definition for both ends: bake derives it from the training model
    (`training.export.encoder_geometry`) and writes its values into the manifest; the service
    reads it back (`Manifest.encoder_geometry`) to build `DapoImageEncoder`.
    """

    width: int = Field(gt=0)
    layers: int = Field(gt=0)
    heads: int = Field(gt=0)
    patch_size: int = Field(gt=0)
    image_size: int = Field(gt=0)
    embed_dim: int = Field(gt=0)
    taps: list[int]  # 1-based tapped blocks
    prompt_tokens: int = Field(ge=0)  # deep visual prompt tokens per layer
    alpha: float = Field(ge=0.0, le=1.0)  # weight of the previous layer's prompt-slot outputs
    act: Literal["gelu", "quick_gelu"] = "gelu"
    temperature: float = Field(gt=0)
    # OpenCLIP ViT options beyond plain CLIP (defaults: plain CLIP's)
    layer_scale: bool = False
    ln_pre: bool = True
    norm_eps: float = Field(1e-5, gt=0)
    mlp_width: int | None = Field(None, gt=0)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


class Verification(BaseModel):
    """What bake measured when it checked its own export (ORT vs PyTorch on the same input)."""

    max_abs_diff: dict[str, float]
    type_map_mismatch_fraction: float
    tolerance: float
    passed: bool
    type_map_tolerance: float = 1e-3  # largest type_map_mismatch_fraction that passes
    # fp16: a type-map pixel whose class differs from the reference's counts only if the reference
    # probability of the class picked is more than this below the reference winner's (smaller
    # gaps are near-ties, decided by rounding); 0 = every differing pixel counts
    type_map_tie_margin: float = 0.0
    type_map_flips_at_ties: float | None = None  # fraction of pixels that differ at near-ties (not counted)


ONNX_PRECISIONS = ("fp32", "fp16", "int8")
OPENVINO_PRECISIONS = ("int8",)  # OpenVINO IR files; fp32 and bf16 run encoder.onnx


class Manifest(BaseModel):
    schema_version: int = SCHEMA_VERSION
    name: str
    version: str
    created: str
    description: str = ""
    backbone: BackboneInfo
    image_size: int = Field(gt=0)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tapped_layers: list[int]
    visual_prompt_tokens: int = Field(ge=0)
    prompt_alpha: float = Field(default=0.01, ge=0.0, le=1.0)
    temperature: float = Field(gt=0)
    prompts: Literal["learned", "handcrafted"]
    text_mode: Literal["fixed", "reference"] = "fixed"
    vocabulary: list[VocabEntry]
    products: dict[str, Product] = {}
    image_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    pixel_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    gaussian_sigma: float = Field(default=0.0, ge=0.0)
    # "global": METHOD's image score (softmax of the global feature vs t_N / t_Abar);
    # "global_max": its mean with the anomaly map's maximum (the AnomalyCLIP-family fusion)
    image_score: Literal["global", "global_max"] = "global"
    files: dict[str, FileEntry]
    # ONNX encoder file per precision (schema 1 manifests get theirs from `upgrade_v1`)
    onnx_encoders: dict[Literal["fp32", "fp16", "int8"], str] = {}
    # OpenVINO IR per precision ({"int8": "encoder_int8.xml"}; its .bin beside it, both in files)
    openvino_encoders: dict[Literal["int8"], str] = {}
    verification: Verification | None = None
    verification_fp16: Verification | None = None  # encoder_fp16.onnx vs the fp32 model
    # "<backend>:<precision>" (e.g. "openvino:int8") -> that encoder vs fp32 on held-out good parts;
    # DAPO_PRECISION=auto only ever picks a precision whose check passed (service.runtime.precision)
    precision_checks: dict[str, Verification] = {}
    provenance: dict = {}

    @model_validator(mode="after")
    def _check(self) -> "Manifest":
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version} is not {SCHEMA_VERSION}; read manifests with "
                             "read_manifest, which upgrades older ones")
        ids = [v.id for v in self.vocabulary]
        if ids != list(range(len(ids))):
            raise ValueError(f"vocabulary ids must be 0..C-1 in order, got {ids}")
        if not self.vocabulary or self.vocabulary[0].name != "normal":
            raise ValueError("vocabulary[0] must be 'normal'")
        names = [v.name for v in self.vocabulary]
        if len(set(names)) != len(names):
            raise ValueError("vocabulary names must be unique")
        for pname, prod in self.products.items():
            unknown = set(prod.defect_types or []) - set(names[1:])
            if unknown:
                raise ValueError(f"product {pname!r} names unknown defect types {sorted(unknown)}")
        banks = {p.references.file for p in self.products.values() if p.references is not None}
        if banks - set(self.files):
            raise ValueError(f"products' references name files missing from files: {sorted(banks - set(self.files))}")
        unlisted = {f for f in self.onnx_encoders.values() if f not in self.files}
        unlisted |= {f for x in self.openvino_encoders.values() for f in (x, ir_weights(x)) if f not in self.files}
        if unlisted:
            raise ValueError(f"onnx_encoders names files missing from files: {sorted(unlisted)}")
        return self

    def onnx_file(self, precision: str = "fp32") -> str | None:
        """The ONNX encoder file for a precision, or None if this artifact has none."""
        return self.onnx_encoders.get(precision)

    def openvino_file(self, precision: str) -> str | None:
        """The OpenVINO IR (.xml) for a precision, or None if this artifact has none."""
        return self.openvino_encoders.get(precision)

    def precision_passed(self, backend: str, precision: str) -> bool:
        """Whether this backend's encoder at this precision passed its accuracy check at bake;
        fp32 is the reference (always passes)."""
        if precision == "fp32":
            return True
        check = self.precision_checks.get(f"{backend}:{precision}")
        return check is not None and check.passed

    def encoder_geometry(self) -> EncoderGeometry:
        """The geometry bake recorded (for service.runtime.backends.torch_model)."""
        b = self.backbone
        return EncoderGeometry(width=b.width, layers=b.layers, heads=b.heads, patch_size=b.patch_size,
                               image_size=self.image_size, embed_dim=b.embed_dim, taps=self.tapped_layers,
                               prompt_tokens=self.visual_prompt_tokens, alpha=self.prompt_alpha, act=b.act,
                               layer_scale=b.layer_scale, ln_pre=b.ln_pre, norm_eps=b.norm_eps, mlp_width=b.mlp_width,
                               temperature=self.temperature)

    @property
    def class_names(self) -> list[str]:
        return [v.name for v in self.vocabulary]

    @property
    def defect_names(self) -> list[str]:
        return self.class_names[1:]


def ir_weights(xml_name: str) -> str:
    """An OpenVINO IR's weights file: the .xml's name with .bin."""
    return str(Path(xml_name).with_suffix(".bin"))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path) -> FileEntry:
    return FileEntry(sha256=sha256_file(path), bytes=path.stat().st_size)


def upgrade_v1(data: dict) -> dict:
    """Schema 1 -> 2: `onnx_encoders` became required. Manifests baked before fp16 export have
    none (or {}); their only ONNX graph is the fp32 `encoder.onnx`."""
    if not data.get("onnx_encoders") and "encoder.onnx" in data.get("files", {}):
        data["onnx_encoders"] = {"fp32": "encoder.onnx"}
    return data


def upgrade_v2(data: dict) -> dict:
    """Schema 2 -> 3: products may carry a reference bank (`references`); a manifest written
    before has none, so every product stays zero-shot. Nothing to fill in."""
    for product in (data.get("products") or {}).values():
        if isinstance(product, dict):
            product.setdefault("references", None)
    return data


# UPGRADES[v] turns a schema-v manifest (as parsed JSON) into a schema-(v + 1) one
UPGRADES = {1: upgrade_v1, 2: upgrade_v2}


def upgrade_manifest(data: dict, where: Path) -> dict:
    """Bring parsed manifest JSON to SCHEMA_VERSION, one named step at a time; a manifest from a
    newer release is refused (this code cannot know what its new fields mean)."""
    version = data.get("schema_version", 1)
    if not isinstance(version, int) or version < 1:
        raise ArtifactError(f"{where}: invalid manifest: schema_version {version!r}")
    if version > SCHEMA_VERSION:
        raise ArtifactError(f"{where}: schema_version {version} was written by a newer dapo-inspect; this one reads "
                            f"up to {SCHEMA_VERSION}: upgrade the service, or re-bake the artifact with this version")
    while version < SCHEMA_VERSION:
        data = UPGRADES[version](dict(data))
        version += 1
        data["schema_version"] = version
    return data


def read_manifest(folder: str | Path) -> Manifest:
    """Parse, upgrade (older schema versions) and validate manifest.json (no file hashes checked)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder {folder} does not exist")
    if not path.is_file():
        raise ArtifactError(f"{path}: manifest missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: invalid manifest: {e}") from e
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: invalid manifest: a JSON object expected, got {type(data).__name__}")
    try:
        return Manifest.model_validate(upgrade_manifest(data, path))
    except ValidationError as e:
        raise ArtifactError(f"{path}: invalid manifest: {e}") from e


def verify_files(folder: str | Path, manifest: Manifest, names: list[str] | None = None) -> None:
    """Check size and sha256 of the listed files; raise naming the first one that is wrong."""
    folder = Path(folder)
    for name in names if names is not None else list(manifest.files):
        entry = manifest.files.get(name)
        if entry is None:
            raise ArtifactError(f"{folder / MANIFEST}: no entry for {name}")
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path}: file listed in the manifest is missing")
        size = path.stat().st_size
        if size != entry.bytes:
            raise ArtifactError(f"{path}: size {size} != {entry.bytes} in the manifest (truncated or replaced)")
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise ArtifactError(f"{path}: sha256 {digest} does not match the manifest ({entry.sha256}); refusing to load")


def load_manifest(folder: str | Path, verify: bool = True) -> Manifest:
    """Read the manifest and, by default, verify every file it lists."""
    manifest = read_manifest(folder)
    if verify:
        verify_files(folder, manifest)
    return manifest


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    path = Path(folder) / MANIFEST
    path.write_text(manifest.model_dump_json(indent=2) + "\n")
    return path
