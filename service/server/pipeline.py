"""One /detect request, HTTP aside: decode -> preprocess -> batch -> postprocess -> results.

Order matters for "nothing is half-done": every file is decoded and checked before any image
is queued, and all of a request's images are admitted to the batcher together or not at all.
CPU-heavy steps (decode, resize, RLE, PNG) run in the app's CPU thread pool so the event loop
only coordinates; the model itself runs in the batcher's inference threads.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from service.runtime import imaging, postprocess, scoring
from service.server.state import ServiceState

T = TypeVar("T")


@dataclass(frozen=True)
class Upload:
    filename: str
    data: bytes


@dataclass
class Prepared:
    """A decoded, checked, preprocessed image (the RGB image kept only for overlays)."""

    filename: str
    width: int
    height: int
    pixel_values: np.ndarray
    image: Image.Image | None
    decode_ms: float
    preprocess_ms: float


def ms_since(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 3)


def prepare(upload: Upload, state: ServiceState, keep_image: bool) -> Prepared:
    """Decode and preprocess one upload (runs in a CPU thread); raises ImageError."""
    settings, manifest = state.settings, state.manifest
    assert manifest is not None
    t0 = time.perf_counter()
    img = imaging.decode(upload.data, upload.filename, settings.max_pixels, settings.max_side)
    decode_ms = ms_since(t0)
    t1 = time.perf_counter()
    pixel_values = imaging.preprocess(img, manifest.image_size, manifest.mean, manifest.std)
    return Prepared(upload.filename, img.width, img.height, pixel_values, img if keep_image else None,
                    decode_ms, ms_since(t1))


async def run_cpu(state: ServiceState, fn: Callable[..., T], *args: Any) -> T:
    """Run a CPU-bound step off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(state.cpu_pool, fn, *args)


async def prepare_all(state: ServiceState, uploads: list[Upload], keep_images: bool) -> list[Prepared]:
    """Decode every file in parallel; the first failure in upload order fails the request."""
    outcomes = await asyncio.gather(*(run_cpu(state, prepare, u, state, keep_images) for u in uploads),
                                    return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return list(outcomes)  # type: ignore[arg-type]


def render(prep: Prepared, outputs: Any, policy: scoring.Policy, class_names: list[str],
           options: postprocess.RenderOptions) -> tuple[dict[str, Any], float]:
    """Postprocess one image (runs in a CPU thread); returns the fields and the time taken."""
    t0 = time.perf_counter()
    fields = postprocess.postprocess(outputs, policy, prep.width, prep.height, class_names, options, prep.image)
    return fields, ms_since(t0)


async def detect(state: ServiceState, uploads: list[Upload], policy: scoring.Policy,
                 options: postprocess.RenderOptions, echo: dict[str, str]) -> list[dict[str, Any]]:
    """The results list of a /detect answer, in upload order."""
    manifest, batcher = state.manifest, state.batcher
    assert manifest is not None and batcher is not None
    prepared = await prepare_all(state, uploads, keep_images=options.overlay)
    batch_results = await batcher.submit_many([(p.pixel_values, policy.allowed) for p in prepared])
    rendered = await asyncio.gather(*(
        run_cpu(state, render, p, r.outputs, policy, manifest.class_names, options)
        for p, r in zip(prepared, batch_results, strict=True)))
    results = []
    for prep, br, (fields, post_ms) in zip(prepared, batch_results, rendered, strict=True):
        result: dict[str, Any] = {"filename": prep.filename, **fields}
        result["timing_ms"] = {"decode": prep.decode_ms, "preprocess": prep.preprocess_ms,
                               "queue_wait": round(br.queue_wait_s * 1000.0, 3),
                               "inference": round(br.inference_s * 1000.0, 3), "postprocess": post_ms}
        result.update(echo)
        results.append(result)
    return results
