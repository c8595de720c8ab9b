"""`Detector`: one loaded artifact, and the one way to run it.

Every caller predicts through this object: the HTTP server (stage by stage, with its
micro-batcher between `infer` calls), `dapo eval` / `dapo calibrate` and the benchmarks
(`predict`, or the same stages on their own batches). Why one object: the artifact's
preprocessing constants, its backend and its scoring policy belong together, and four hand-built
copies of "backend + preprocess + policy + postprocess" drift apart; with one, what is measured
is what is served.

The stages, in the order a request goes through them:

    prepare(upload bytes | PIL image)      -> Prepared   decode, check, orient, preprocess (CPU)
    policy(product, defect_types, threshold) -> Policy   resolved once per call
    infer(pixel_values (B,3,S,S), allowed (B,C)) -> EncoderOutputs   the backend (accelerator)
    score(outputs of one image, policy)    -> Scores     image score and maps at the model size
    render(prepared, outputs, policy, options) -> dict   the /detect result fields (CPU)

A tiled product (`Product.tiling`, `service.runtime.tiling`) prepares several encoder inputs per
image (`Prepared.inputs()`: the whole image, then its tiles); every caller sends them all to
`infer` like images and hands the image's outputs back together (leading axis = its inputs) to
`score` / `render`, which stitch the tiles. Untiled images have one input, as before.

`predict(images, policy, render_options)` composes them for synchronous callers. Nothing here
knows about HTTP; the server owns the batcher, the thread pools and the request limits.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from service.runtime import imaging, postprocess, scoring, tiling
from service.runtime.artifact import Manifest, Tiling, load_manifest
from service.runtime.references import ReferenceSet
from service.runtime.backends.base import Backend, EncoderOutputs

BackendName = Literal["onnxruntime", "openvino", "torch"]


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run an artifact: which backend, on what, at which precision.

    `precision`: the torch backend's compute dtype (fp32, fp16, bf16); for ONNX Runtime which
    graph (fp32 = encoder.onnx, fp16 = encoder_fp16.onnx). `io_binding` None = on for
    CUDA/TensorRT, off on the CPU EP. `verify`: check every file's sha256 before loading.
    """

    backend: BackendName = "onnxruntime"
    providers: tuple[str, ...] | None = None
    trt_cache_dir: str | None = None
    device: str | None = None
    precision: Literal["fp32", "fp16", "bf16", "int8", "auto"] = "fp32"
    io_binding: bool | None = None
    verify: bool = True
    max_batch_size: int = 1  # the largest batch infer() will get (TensorRT's optimisation profile)
    threads: int | None = None  # OpenVINO inference threads (None = its default); see backends


@dataclass(frozen=True)
class ImageLimits:
    """Decode limits for untrusted bytes (checked from the header, before any pixel is decoded)."""

    max_pixels: int
    max_side: int


@dataclass(frozen=True)
class Upload:
    """An uploaded file: its name (for messages and echo) and its bytes."""

    filename: str
    data: bytes


@dataclass
class Prepared:
    """A decoded, checked, preprocessed image (the RGB image kept only for overlays)."""

    filename: str
    width: int  # original (oriented) size: the size of every answer
    height: int
    pixel_values: np.ndarray  # (3, S, S) float32
    image: Image.Image | None  # for an overlay only, at its view size (see Detector.prepare)
    decode_ms: float
    preprocess_ms: float
    tiles: tiling.TiledInput | None = None  # a tiled product's tiles (their inputs follow pixel_values)

    def inputs(self) -> list[np.ndarray]:
        """The encoder inputs of this image, in the order its outputs are handed back: the
        whole image, then the tiles (a 1 x 1 grid's tile is the whole image: one input)."""
        return [self.pixel_values, *(self.tiles.pixel_values if self.tiles is not None else ())]


def split_outputs(outputs: EncoderOutputs, counts: Sequence[int]) -> list[EncoderOutputs]:
    """A batch's outputs -> one EncoderOutputs per image, `counts[i]` consecutive items each
    (every output the backend gave, feature outputs included)."""
    names = outputs._names()
    bounds = np.cumsum([0, *counts])
    return [EncoderOutputs(**{n: getattr(outputs, n)[a:b] for n in names}) for a, b in itertools.pairwise(bounds)]


def join_outputs(items: Sequence[EncoderOutputs]) -> EncoderOutputs:
    """One image's per-input outputs (each leading axis 1, e.g. from the batcher) -> one; an
    output that some input lacks is left out."""
    if len(items) == 1:
        return items[0]
    names = [n for n in items[0]._names() if all(getattr(i, n) is not None for i in items)]
    return EncoderOutputs(**{n: np.concatenate([getattr(i, n) for i in items]) for n in names})


@dataclass
class Scores:
    """One image's verdict at the model resolution (what evaluation and calibration read)."""

    anomaly_score: float  # the image score in force (policy's mode, on the smoothed map)
    is_anomalous: bool
    anomaly_map: np.ndarray  # (S, S) float32, smoothed per the policy; tiled: the stitched (Hc, Wc)
    type_scores: np.ndarray  # (C,) softmax of the global feature over the vocabulary
    class_probs: np.ndarray | None = None  # (C, S, S) when asked for (evaluation only)


@dataclass
class Result:
    """`predict`'s answer for one image: the scores, and the rendered fields when asked for."""

    filename: str
    width: int
    height: int
    scores: Scores
    fields: dict[str, Any] | None = None  # the /detect result fields (postprocess), if rendered
    timing_ms: dict[str, float] = field(default_factory=dict)


def ms_since(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 3)


class Detector:
    """One verified artifact with its backend. Thread-safe as far as the backend is: the server
    calls `prepare`/`render` from CPU threads and `infer` from inference threads."""

    def __init__(self, manifest: Manifest, backend: Backend, folder: Path | None = None, references: bool = True):
        self.manifest = manifest
        self.backend = backend
        self.folder = folder
        self.name, self.version = manifest.name, manifest.version  # the artifact's identity
        # the products' reference banks (files verified with the manifest), searched on the backend's providers
        self.references = ReferenceSet.load(folder if references else None, manifest, backend)

    @classmethod
    def load(cls, folder: str | Path, options: RuntimeOptions | None = None, references: bool = True) -> "Detector":
        """Read and (by default) verify the artifact, then build the chosen backend.
        `references` False leaves the products' banks unread (calibration, which rebuilds them)."""
        options = options or RuntimeOptions()
        folder = Path(folder)
        manifest = load_manifest(folder, verify=options.verify)
        return cls(manifest, build_backend(folder, manifest, options), folder, references)

    @property
    def class_names(self) -> list[str]:
        return self.manifest.class_names

    # --- stages -------------------------------------------------------------------------
    def policy(self, product: str | None = None, defect_types: list[str] | None = None,
               threshold: float | None = None, *, gaussian_sigma: float | None = None,
               image_score: str | None = None, references: bool = True) -> scoring.Policy:
        """The call's scoring policy (raises ScoringError for unknown names or a bad threshold).
        `gaussian_sigma` / `image_score` override the manifest's (evaluation studies only);
        `references` False leaves a product's reference bank out (zero-shot DAPO alone)."""
        resolved = scoring.policy(self.manifest, product, defect_types, threshold)
        use = references and product is not None and product in self.references.banks
        overrides = {k: v for k, v in {"gaussian_sigma": gaussian_sigma, "image_score": image_score,
                                       "product": product, "references": use or None}.items()
                     if v is not None}
        return replace(resolved, **overrides) if overrides else resolved

    def pixel_values(self, image: Image.Image) -> np.ndarray:
        """An RGB image -> the encoder's (3, S, S) input with this artifact's constants."""
        m = self.manifest
        return imaging.preprocess(image, m.image_size, m.mean, m.std)

    def prepare(self, source: Upload | Image.Image, limits: ImageLimits | None = None,
                view_max_side: int | None = None, filename: str = "image", tiles: Tiling | None = None) -> Prepared:
        """Decode (bytes: sniffed, size-checked against `limits`, EXIF-oriented) or convert (a
        PIL image, taken as already oriented) to 8-bit RGB, then preprocess. Raises ImageError.

        Bytes are decoded only as far as needed (`imaging.decode_sized`): a large JPEG straight
        at a reduced DCT scale for the model. `view_max_side` (None = no overlay) also keeps the
        image for an overlay, at `imaging.view_size(W, H, view_max_side)` (0 = original size).
        `tiles` (a product's tiling, `policy.tiling`): decode at the tiles' scale and cut them."""
        t0 = time.perf_counter()
        if isinstance(source, Upload):
            if limits is None:
                raise ValueError("decoding uploaded bytes needs ImageLimits")
            options = imaging.DecodeOptions(limits.max_pixels, limits.max_side, self.manifest.image_size,
                                            view_max_side, tiles.tile if tiles is not None else 0)
            decoded = imaging.decode_sized(source.data, source.filename, options)
            filename = source.filename
        else:
            img = imaging.to_rgb8(source, filename)
            view = None if view_max_side is None else imaging.view_of(img, view_max_side)
            decoded = imaging.Decoded(img, img.width, img.height, view)
        decode_ms = ms_since(t0)
        t1 = time.perf_counter()
        if tiles is None:
            pixel_values = self.pixel_values(decoded.image)
            return Prepared(filename, decoded.width, decoded.height, pixel_values, decoded.view, decode_ms, ms_since(t1))
        m = self.manifest
        g = tiling.grid(decoded.width, decoded.height, tiles, m.image_size)
        pixel_values = self.pixel_values(decoded.image if g.count == 1 else tiling.whole_view(decoded.image, m.image_size))
        cut = tiling.cut(decoded.image, g, m.mean, m.std) if g.count > 1 else []
        return Prepared(filename, decoded.width, decoded.height, pixel_values, decoded.view, decode_ms, ms_since(t1),
                        tiling.TiledInput(g, cut, tiles.image_score))

    def infer(self, pixel_values: np.ndarray, allowed: np.ndarray, class_probs: bool = False,
              features: bool = False) -> EncoderOutputs:
        """The backend on a batch (what the server's micro-batcher calls, in its threads); with
        reference banks, the reference features come along (the batch may mix products)."""
        if self.references or features:
            return self.backend.run(pixel_values, allowed, class_probs=class_probs, features=True)
        if class_probs:
            return self.backend.run(pixel_values, allowed, class_probs=True)
        return self.backend.run(pixel_values, allowed)

    def with_references(self, outputs: EncoderOutputs, policy: scoring.Policy
                        ) -> tuple[EncoderOutputs, scoring.Policy]:
        """One image's outputs fused with its product's bank when the policy says so (the
        nearest-neighbour search runs on the backend's providers, in the caller's thread)."""
        if not policy.references or policy.product is None:
            return outputs, policy
        fused = self.references.apply(outputs, policy.product, policy.image_score, policy.pixel_threshold)
        return fused, replace(policy, image_score="global")  # the fused score is the image score

    def score(self, outputs: EncoderOutputs, policy: scoring.Policy, prepared: Prepared | None = None) -> Scores:
        """One image's outputs (leading axis 1; a tiled image's: one per input) -> its score and
        smoothed map at the model size (tiled: stitched, with its bank of tiles if any: `tiled_maps`)."""
        if prepared is not None and prepared.tiles is not None:
            return self._tiled_score(outputs, policy, prepared.tiles)
        outputs, policy = self.with_references(outputs, policy)
        amap = scoring.smooth(outputs.anomaly_map[0], policy.gaussian_sigma)
        value = scoring.image_score(outputs.anomaly_score[0], amap, policy.image_score)
        probs = outputs.class_probs[0] if outputs.class_probs is not None else None
        return Scores(value, scoring.is_anomalous(value, policy.image_threshold), amap,
                      outputs.type_scores[0], probs)

    def tiled_dapo(self, outputs: EncoderOutputs, policy: scoring.Policy, tiles: tiling.TiledInput,
                   types: np.ndarray | None = None) -> tuple[float, np.ndarray, np.ndarray]:
        """A tiled image's outputs -> (DAPO's image score, stitched smoothed anomaly map, stitched
        type map), both (Hc, Wc): each input smoothed and scored as an untiled image is, the score
        combined and the maps stitched by the rules of `service.runtime.tiling`. `types`: per-input
        type maps to stitch instead of DAPO's own (the allowed-defect argmax, with references)."""
        first = tiles.first_tile
        amaps = [scoring.smooth(outputs.anomaly_map[i], policy.gaussian_sigma) for i in range(len(outputs))]
        scores = [scoring.image_score(outputs.anomaly_score[i], amaps[i], policy.image_score)
                  for i in range(len(outputs))]
        types = outputs.type_map if types is None else types
        anomaly, stitched = tiling.stitch(tiles.grid, np.stack(amaps[first:]), types[first:])
        return tiling.image_score(scores[0], scores[first:], tiles.rule), anomaly, stitched

    def tiled_maps(self, outputs: EncoderOutputs, policy: scoring.Policy, tiles: tiling.TiledInput
                   ) -> tuple[float, np.ndarray, np.ndarray]:
        """A tiled image's (image score, anomaly map, type map) as served: DAPO's (`tiled_dapo`),
        or with the product's bank of tiles (policy.references) the fused score and map
        (`ReferenceSet.apply_tiled`) and, when a pixel threshold will cut the map, the
        allowed-defect type map (as `ReferenceSet.apply` does untiled)."""
        if not (policy.references and policy.product is not None):
            return self.tiled_dapo(outputs, policy, tiles)
        value, anomaly, types = self.tiled_dapo(outputs, policy, tiles,
                                                self.references.defect_types(outputs, policy.pixel_threshold))
        value, anomaly = self.references.apply_tiled(outputs, policy.product, tiles, anomaly, value,
                                                     policy.gaussian_sigma)
        return value, anomaly, types

    def _tiled_score(self, outputs: EncoderOutputs, policy: scoring.Policy, tiles: tiling.TiledInput) -> Scores:
        value, anomaly, _ = self.tiled_maps(outputs, policy, tiles)
        probs = (tiling.stitch_mean(tiles.grid, outputs.class_probs[tiles.first_tile:])
                 if outputs.class_probs is not None else None)
        return Scores(value, scoring.is_anomalous(value, policy.image_threshold), anomaly, outputs.type_scores[0], probs)

    def render(self, prepared: Prepared, outputs: EncoderOutputs, policy: scoring.Policy,
               options: postprocess.RenderOptions) -> dict[str, Any]:
        """The result fields of one image at its original resolution (masks, regions, maps), and
        whether the product's references were used."""
        if prepared.tiles is not None:
            value, anomaly, types = self.tiled_maps(outputs, policy, prepared.tiles)
            maps = postprocess.stitched_maps(anomaly, types, policy, prepared.width, prepared.height)
            fields = postprocess.render_maps(maps, value, outputs.type_scores[0], policy, self.class_names, options,
                                             prepared.image)
        else:
            outputs, fused_policy = self.with_references(outputs, policy)
            fields = postprocess.postprocess(outputs, fused_policy, prepared.width, prepared.height,
                                             self.class_names, options, prepared.image)
        fields["references_used"] = policy.references
        return fields

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        """Run zero images at each batch size once, so the first real call is not the slow one."""
        s, c = self.manifest.image_size, len(self.manifest.vocabulary)
        for b in batch_sizes:
            self.infer(np.zeros((b, 3, s, s), dtype=np.float32), np.ones((b, c), dtype=bool))

    # --- synchronous use ----------------------------------------------------------------
    def predict(self, images: Sequence[Upload | Image.Image], policy: scoring.Policy | None = None,
                render_options: postprocess.RenderOptions | None = None, limits: ImageLimits | None = None,
                class_probs: bool = False, batch_size: int = 16) -> list[Result]:
        """Images -> one Result each, in order, through the same stages the server runs.

        `render_options` None: scores only (no masks or regions drawn); `class_probs`: keep the
        per-class maps (evaluation). Bytes need `limits` (see `prepare`)."""
        policy = policy or self.policy()
        view = render_options.view_max_side if render_options is not None and render_options.overlay else None
        results: list[Result] = []
        for start in range(0, len(images), max(1, batch_size)):
            prepared = [self.prepare(src, limits, view, f"image[{start + i}]", policy.tiling)
                        for i, src in enumerate(images[start:start + batch_size])]
            t0 = time.perf_counter()
            outputs = split_outputs(self.infer_inputs([x for p in prepared for x in p.inputs()], policy.allowed,
                                                      class_probs, batch_size), [len(p.inputs()) for p in prepared])
            inference_ms = ms_since(t0)
            for prep, one in zip(prepared, outputs, strict=True):
                t1 = time.perf_counter()
                fields = self.render(prep, one, policy, render_options) if render_options is not None else None
                timing = {"decode": prep.decode_ms, "preprocess": prep.preprocess_ms, "inference": inference_ms,
                          "postprocess": ms_since(t1)}
                results.append(Result(prep.filename, prep.width, prep.height, self.score(one, policy, prep), fields,
                                      timing))
        return results

    def infer_inputs(self, inputs: Sequence[np.ndarray], allowed: np.ndarray, class_probs: bool = False,
                     batch_size: int = 16, features: bool = False) -> EncoderOutputs:
        """Encoder inputs (3, S, S) of one policy -> their outputs in order, `batch_size` at a
        time (a tiled image has many inputs); `features`: with the reference features."""
        parts = []
        for start in range(0, len(inputs), max(1, batch_size)):
            chunk = np.stack(inputs[start:start + batch_size])
            parts.append(self.infer(chunk, np.broadcast_to(allowed, (len(chunk), len(allowed))), class_probs,
                                    features))
        return join_outputs(parts)


def build_backend(folder: Path, manifest: Manifest, options: RuntimeOptions) -> Backend:
    """The chosen backend over a verified folder (imported lazily: torch is optional and heavy)."""
    from service.runtime.backends import create_backend

    return create_backend(folder, manifest, backend=options.backend,
                          providers=list(options.providers) if options.providers else None,
                          trt_cache_dir=options.trt_cache_dir, device=options.device,
                          precision=options.precision, io_binding=options.io_binding,
                          max_batch_size=options.max_batch_size, threads=options.threads)
