"""A product's references: good parts kept as a feature memory and fused with DAPO's maps.

Why: DAPO's zero-shot maps know what defects *look like* in general; a handful of good parts of
*this* product say what normal looks like here (WinCLIP+, AnomalyCLIP and PatchCore's memory
bank). `dapo calibrate --references K` (training.references) keeps, per product, the patch
features of up to K good images (greedy-coreset subsampled past a limit) and their global
features in `references/<product>.safetensors`; the manifest lists its sha256 like every file,
and the branch statistics (`artifact.BranchStats`) that make the scores comparable.

At serving time, for a product that has a bank (and unless the call says `references=false`):

    map   = squash(fuse(z(DAPO's anomaly map), z(nearest-neighbour patch distance, upsampled)))
    image = squash(fuse(z(DAPO's image score), z(NN distance of the image descriptor),
                        z(max over patches of the NN patch distance)))

z(.) = (x - mean) / std with the good parts' own leave-one-out statistics (each reference scored
against the others), so fusing needs no defective sample; `fuse` is the per-product rule
(max or mean, measured in docs/references.md); `squash` keeps scores and thresholds in [0, 1]
like every other score of the service: `0.5 + 0.5 * softsign(z / FUSED_SCALE)` for the banks
`dapo calibrate` writes, never equal to 1 in float32 for any finite z, so the fused map keeps its
ranking where DAPO's branch is far out (a sigmoid, what older banks use, rounds every z above
about 70 to exactly 1.0 in a float32 map: measured, docs/references.md). Defect *types* still come
from DAPO: a pixel the fused map calls defective takes the argmax over the allowed defect
classes (`defect_type_map`).

A tiled product (docs/tiling.md) keeps a bank of its good parts' *tiles*: the patch features of
every tile (the scale the encoder sees the part at), and the image descriptor of the whole-image
pass (`global_query`). Serving searches each tile's patches, smooths each tile's distance map as the tiled path
smooths DAPO's, and stitches both branches' maps with the tiles' blending rule (mean of the
covering tiles) before z-scoring and fusing on the stitched map; the image fuses DAPO's tiled
image score, the whole image's descriptor distance and the max over all tiles' patch distances
(`tiled_branches`). Why this split: small defects are found at the tiles' scale and global
texture changes by the whole part's descriptor (the measurements in the references issue:
patches of 2 x 2 tiles with a whole-image descriptor beat either alone).

The nearest-neighbour search runs where the encoder runs: a second small ONNX graph on the
encoder's own execution providers (squared distances ||a||^2 - 2ab + ||b||^2, a ReduceMin, the
bilinear upsampling), or torch on the torch backend's device; never numpy on the event loop
(the server calls this from its CPU render threads, like the rest of postprocessing).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from service.runtime import tiling
from service.runtime.artifact import FUSIONS, GLOBAL_FEATURES, SQUASHES, BranchStats, Manifest, References
from service.runtime.backends.base import EncoderOutputs
from service.runtime.scoring import smooth

FUSED_SCALE = 4.0  # squash works on u = z / FUSED_SCALE; z = 0 (a typical good part) -> 0.5
BANK_DIR = "references"
BANK_KEYS = ("patches", "sources", "globals")  # (M, F) float32, (M,) int32 image index, (K, E) float32
OPSET = 18


def bank_file(product: str) -> str:
    """The bank's path inside the artifact: the product's name when it is a safe file name,
    else a digest of it (product names come from folder names or JSON)."""
    safe = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", product) is not None
    return f"{BANK_DIR}/{product if safe else hashlib.sha256(product.encode()).hexdigest()[:16]}.safetensors"


@dataclass(frozen=True)
class Bank:
    """One product's memory: patch features (coreset), which image each came from, the
    global features of the images, and the manifest's statistics for fusing."""

    patches: np.ndarray  # (M, F) float32
    sources: np.ndarray  # (M,) int32
    globals: np.ndarray  # (K, E) float32
    info: References

    def without(self, image: int) -> Bank:
        """The bank less one image's features (leave-one-out at calibration)."""
        keep = self.sources != image
        others = np.arange(len(self.globals)) != image
        return replace(self, patches=self.patches[keep], sources=self.sources[keep], globals=self.globals[others])


def save_bank(path: Path, patches: np.ndarray, sources: np.ndarray, globals_: np.ndarray) -> Path:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"patches": np.ascontiguousarray(patches, np.float32), "sources": np.ascontiguousarray(sources, np.int32),
               "globals": np.ascontiguousarray(globals_, np.float32)}, str(path),
              metadata={"format": "dapo-references", "version": "1"})
    return path


def load_bank(folder: Path, info: References) -> Bank:
    """Read a bank (its sha256 was checked with every other file by `load_manifest`)."""
    from safetensors.numpy import load_file

    tensors = load_file(str(Path(folder) / info.file))
    missing = set(BANK_KEYS) - set(tensors)
    if missing:
        raise ValueError(f"{info.file}: bank lacks {sorted(missing)}")
    patches, sources, globals_ = (tensors[k] for k in BANK_KEYS)
    if patches.ndim != 2 or sources.shape != (len(patches),) or globals_.ndim != 2 or len(patches) != info.patches:
        raise ValueError(f"{info.file}: shapes {patches.shape}, {sources.shape}, {globals_.shape} do not fit the "
                         f"manifest ({info.patches} patches)")
    if info.global_feature == "patch_mean" and globals_.shape[1] != patches.shape[1]:
        raise ValueError(f"{info.file}: its globals ({globals_.shape[1]} wide) are not patch means "
                         f"({patches.shape[1]} wide) as the manifest says; run dapo calibrate --references again")
    return Bank(patches.astype(np.float32), sources.astype(np.int32), globals_.astype(np.float32), info)


@dataclass
class Distances:
    """One image's nearest-neighbour distances to a bank."""

    patch_map: np.ndarray  # (S, S) float32, upsampled like DAPO's map
    patch_max: float  # max over the g x g patches
    global_distance: float


def global_query(outputs: EncoderOutputs, kind: str, rows: slice = slice(None)) -> np.ndarray:
    """(B, E) float32: the image-level descriptor of each input in `rows` that a bank of this
    `kind` (References.global_feature) holds and is searched with.

    "patch_mean": the mean over the image's patches of its reference patch features
    (`patch_features`, the tapped blocks the patch bank holds), L2-normalised. Why not DAPO's
    pooled class token: measured on the stand-in textures (docs/references.md), the distance of
    this mean to the references' tells global texture changes (blur, zoom, contrast) from good
    parts with image AUROC 0.97, the prompted class token's 0.87; it costs no encoder pass and
    adds nothing to the search but an (N, F) mean. "class_token": `global_feature` as is."""
    if kind == "class_token":
        return np.ascontiguousarray(outputs.global_feature[rows], np.float32)
    if kind != "patch_mean":
        raise ValueError(f"unknown global feature {kind!r}; known: {GLOBAL_FEATURES}")
    mean = outputs.patch_features[rows].astype(np.float32).mean(axis=1)
    return (mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)).astype(np.float32)


# --- the search ------------------------------------------------------------------------------
def search_graph(grid: int, image_size: int):
    """The ONNX graph of the search: queries (B, N, F), bank (M, F), global (B, E), global bank
    (K, E) -> patch_map (B, S, S), patch_max (B,), global_distance (B,). Distances are Euclidean:
    sqrt(max(||a||^2 - 2ab + ||b||^2, 0)), the min over the bank by ReduceMin."""
    from onnx import TensorProto, helper

    f32 = TensorProto.FLOAT

    def const(name: str, values: list, dtype=TensorProto.INT64):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [len(values)], values))

    def nearest(prefix: str, query: str, bank: str, query_axes: list[int]) -> list:
        """Nodes for min over the bank of the squared distance: `prefix`_d (query's shape less F)."""
        return [
            helper.make_node("Mul", [query, query], [f"{prefix}_qq"]),
            helper.make_node("ReduceSum", [f"{prefix}_qq", "last_axis"], [f"{prefix}_qn"], keepdims=1),
            helper.make_node("Mul", [bank, bank], [f"{prefix}_bb"]),
            helper.make_node("ReduceSum", [f"{prefix}_bb", "last_axis"], [f"{prefix}_bn1"], keepdims=0),
            helper.make_node("Transpose", [bank], [f"{prefix}_bt"], perm=[1, 0]),
            helper.make_node("MatMul", [query, f"{prefix}_bt"], [f"{prefix}_ab"]),
            helper.make_node("Mul", [f"{prefix}_ab", "minus_two"], [f"{prefix}_ab2"]),
            helper.make_node("Add", [f"{prefix}_ab2", f"{prefix}_bn1"], [f"{prefix}_s1"]),
            helper.make_node("Add", [f"{prefix}_s1", f"{prefix}_qn"], [f"{prefix}_d2all"]),
            helper.make_node("ReduceMin", [f"{prefix}_d2all", "last_axis"], [f"{prefix}_d2"], keepdims=0),
            helper.make_node("Max", [f"{prefix}_d2", "zero"], [f"{prefix}_d2c"]),
            helper.make_node("Sqrt", [f"{prefix}_d2c"], [f"{prefix}_d"]),
        ]

    nodes = [
        const("last_axis", [-1]),
        helper.make_node("Constant", [], ["minus_two"], value=helper.make_tensor("minus_two", f32, [], [-2.0])),
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("zero", f32, [], [0.0])),
        *nearest("p", "queries", "bank", [0, 1]),
        *nearest("g", "global", "global_bank", [0]),
        helper.make_node("ReduceMax", ["p_d", "last_axis"], ["patch_max"], keepdims=0),
        helper.make_node("Identity", ["g_d"], ["global_distance"]),
        const("grid_shape", [0, 1, grid, grid]),
        helper.make_node("Reshape", ["p_d", "grid_shape"], ["p_grid"]),
        helper.make_node("Shape", ["p_grid"], ["p_shape"]),
        const("s0", [0]), const("s2", [2]),
        helper.make_node("Slice", ["p_shape", "s0", "s2"], ["p_bc"]),
        const("hw", [image_size, image_size]),
        helper.make_node("Concat", ["p_bc", "hw"], ["out_shape"], axis=0),
        # torch's bilinear with align_corners=True, as DAPO's map is upsampled (METHOD.md)
        helper.make_node("Resize", ["p_grid", "", "", "out_shape"], ["p_up"], mode="linear",
                         coordinate_transformation_mode="align_corners"),
        const("up_shape", [0, image_size, image_size]),
        helper.make_node("Reshape", ["p_up", "up_shape"], ["patch_map"]),
    ]
    graph = helper.make_graph(
        nodes, "dapo_reference_search",
        [helper.make_tensor_value_info("queries", f32, ["B", "N", "F"]),
         helper.make_tensor_value_info("bank", f32, ["M", "F"]),
         helper.make_tensor_value_info("global", f32, ["B", "E"]),
         helper.make_tensor_value_info("global_bank", f32, ["K", "E"])],
        [helper.make_tensor_value_info("patch_map", f32, ["B", image_size, image_size]),
         helper.make_tensor_value_info("patch_max", f32, ["B"]),
         helper.make_tensor_value_info("global_distance", f32, ["B"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    return model


class OrtSearch:
    """The search graph in an ONNX Runtime session on the encoder's providers."""

    def __init__(self, providers: list, grid: int, image_size: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(search_graph(grid, image_size).SerializeToString(), sess_options=opts,
                                            providers=providers)
        self.provider = self.session.get_providers()[0]

    def __call__(self, queries: np.ndarray, bank: np.ndarray, global_: np.ndarray,
                 global_bank: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        feeds = {"queries": np.ascontiguousarray(queries, np.float32), "bank": bank,
                 "global": np.ascontiguousarray(global_, np.float32), "global_bank": global_bank}
        pm, mx, gd = self.session.run(["patch_map", "patch_max", "global_distance"], feeds)
        return pm, mx, gd


def make_search(backend, grid: int, image_size: int):
    """The search on the backend's own providers (ORT) or device (torch)."""
    if getattr(backend, "name", "") == "torch":
        from service.runtime.backends.torch_backend import TorchSearch

        return TorchSearch(str(backend.device), grid, image_size)
    providers = getattr(backend, "providers", None) or ["CPUExecutionProvider"]
    return OrtSearch(list(providers), grid, image_size)


# --- fusion ----------------------------------------------------------------------------------
def zscore(x, stats: BranchStats):
    return (np.asarray(x, np.float64) - stats.mean) / stats.std


def fuse(zs: list, rule: str):
    if rule == "max":
        return np.maximum.reduce([np.asarray(z, np.float64) for z in zs])
    if rule == "mean":
        return np.mean([np.asarray(z, np.float64) for z in zs], axis=0)
    raise ValueError(f"unknown fusion rule {rule!r}; known: {FUSIONS}")


def squash(z, kind: str):
    """A fused z-score -> (0, 1), monotone: thresholds and answers stay in [0, 1]. "softsign"
    (0.5 + 0.5 u / (1 + |u|)) approaches 1 as 1 - 0.5 / u, so a float32 map still tells z = 100
    from z = 1000; "sigmoid" (older banks, their thresholds computed with it) is 1.0 in float32
    from z of about 70."""
    u = np.asarray(z, np.float64) / FUSED_SCALE
    if kind == "softsign":
        return 0.5 + 0.5 * u / (1.0 + np.abs(u))
    if kind == "sigmoid":
        return 1.0 / (1.0 + np.exp(-u))
    raise ValueError(f"unknown squash {kind!r}; known: {SQUASHES}")


@dataclass(frozen=True)
class Branches:
    """One image's branch scores (what evaluation reports each of, and fusion combines)."""

    dapo_map: np.ndarray  # (S, S)
    dapo_image: float
    nn_map: np.ndarray  # (S, S)
    nn_global: float
    nn_patch_max: float

    def fused(self, info: References, rule: str | None = None) -> tuple[float, np.ndarray]:
        """(image score, map) in [0, 1]."""
        rule = rule or info.fusion
        image = fuse([zscore(self.dapo_image, info.dapo_image), zscore(self.nn_global, info.nn_global),
                      zscore(self.nn_patch_max, info.nn_patch_max)], rule)
        amap = fuse([zscore(self.dapo_map, info.dapo_map), zscore(self.nn_map, info.nn_map)], rule)
        return float(squash(image, info.squash)), squash(amap, info.squash).astype(np.float32)


def dapo_image_score(outputs: EncoderOutputs, mode: str) -> float:
    from service.runtime.scoring import image_score

    return image_score(outputs.anomaly_score[0], outputs.anomaly_map[0], mode)


def check_tiling(product: str, info: References, product_tiling) -> None:
    """A bank is searched with the patches of the inputs it was built from: whole images or
    tiles of one size. A product whose tiling no longer matches its bank is refused at load."""
    tile = product_tiling.tile if product_tiling is not None else None
    if info.tile != tile:
        built = f"tiles of {info.tile} px" if info.tile else "whole images"
        now = f"tiles of {tile} px" if tile else "untiled"
        raise ValueError(f"product {product!r}: its reference bank {info.file} was built from {built}, but the "
                         f"product is {now}; run dapo calibrate --references again with the product's tiling")


class ReferenceSet:
    """Every product's bank of one artifact, and the search that runs on them."""

    def __init__(self, banks: dict[str, Bank], search=None):
        self.banks = banks
        self.search = search

    @classmethod
    def load(cls, folder: Path | None, manifest: Manifest, backend) -> ReferenceSet:
        infos = {p: prod.references for p, prod in manifest.products.items() if prod.references is not None}
        if not infos or folder is None:
            return cls({})
        if not getattr(backend, "has_features", False):
            raise ValueError("this artifact's encoder has no reference features (baked before references); "
                             "re-bake it, then run dapo calibrate --references again")
        for p, info in infos.items():
            check_tiling(p, info, manifest.products[p].tiling)
        banks = {p: load_bank(folder, info) for p, info in infos.items()}
        g = manifest.image_size // manifest.backbone.patch_size
        return cls(banks, make_search(backend, g, manifest.image_size))

    def __bool__(self) -> bool:
        return bool(self.banks)

    def sizes(self) -> dict[str, dict[str, int]]:
        return {p: {"images": b.info.images, "patches": b.info.patches} for p, b in self.banks.items()}

    def branches(self, outputs: EncoderOutputs, bank: Bank, image_score_mode: str) -> Branches:
        """One image's outputs (leading axis 1, with features) against one bank."""
        pm, mx, gd = self.search(outputs.patch_features, bank.patches, global_query(outputs, bank.info.global_feature),
                                 bank.globals)
        return Branches(dapo_map=outputs.anomaly_map[0], dapo_image=dapo_image_score(outputs, image_score_mode),
                        nn_map=pm[0], nn_global=float(gd[0]), nn_patch_max=float(mx[0]))

    def tiled_branches(self, outputs: EncoderOutputs, bank: Bank, tiles: tiling.TiledInput,
                       dapo_map: np.ndarray, dapo_image: float, sigma: float) -> Branches:
        """A tiled image's outputs (the whole image, then its tiles) against a bank of tiles, with
        DAPO's stitched map and tiled image score as the tiled path serves them
        (`Detector.tiled_dapo`): each tile's distance map smoothed like DAPO's and stitched the
        same way, the whole image's descriptor distance, the largest patch distance of any tile."""
        first = tiles.first_tile
        n = len(outputs.patch_features) - first
        whole = np.repeat(global_query(outputs, bank.info.global_feature, slice(0, 1)), n, axis=0)  # one per search row
        pm, mx, gd = self.search(outputs.patch_features[first:], bank.patches, whole, bank.globals)
        nn = np.stack([smooth(m, sigma) for m in pm])
        return Branches(dapo_map=dapo_map, dapo_image=float(dapo_image), nn_map=tiling.stitch_mean(tiles.grid, nn),
                        nn_global=float(gd[0]), nn_patch_max=float(np.max(mx)))

    def apply_tiled(self, outputs: EncoderOutputs, product: str, tiles: tiling.TiledInput, dapo_map: np.ndarray,
                    dapo_image: float, sigma: float) -> tuple[float, np.ndarray]:
        """A tiled image's fused (image score, stitched map) from DAPO's stitched map and score."""
        bank = self.banks[product]
        return self.tiled_branches(outputs, bank, tiles, dapo_map, dapo_image, sigma).fused(bank.info)

    @staticmethod
    def defect_types(outputs: EncoderOutputs, pixel_threshold: float | None) -> np.ndarray | None:
        """The allowed-defect type maps (B, S, S) a fused map's pixels take their type from when a
        pixel threshold will cut it; None: DAPO's own type map stands (no threshold, or an
        encoder without the reference outputs). One rule for the untiled and the tiled path."""
        return outputs.defect_type_map if pixel_threshold is not None else None

    def apply(self, outputs: EncoderOutputs, product: str, image_score_mode: str,
              pixel_threshold: float | None) -> EncoderOutputs:
        """One image's outputs with the fused score and map in place of DAPO's (type scores,
        class maxima stay DAPO's). Types: pixels at or above the pixel threshold take the
        argmax over the allowed defect classes; without a threshold DAPO's own type map stands."""
        bank = self.banks[product]
        score, amap = self.branches(outputs, bank, image_score_mode).fused(bank.info)
        type_map, defects = outputs.type_map, self.defect_types(outputs, pixel_threshold)
        if defects is not None:
            type_map = np.where(amap[None] >= pixel_threshold, defects, 0).astype(np.uint8)
        return replace(outputs, anomaly_score=np.array([score], np.float32), anomaly_map=amap[None],
                       type_map=type_map)
