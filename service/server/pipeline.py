"""One /detect request, HTTP aside: the Detector's stages with the micro-batcher in the middle.

prepare (CPU threads) -> batcher -> Detector.infer (inference threads) -> render (CPU threads).
Order matters for "nothing is half-done": every file is decoded and checked before any image
is queued, and all of a request's images are admitted to the batcher together or not at all.
CPU-heavy steps (decode, resize, RLE, PNG) run in the app's CPU thread pool so the event loop
only coordinates. Everything runs on the one `LoadedModel` the route captured.

A tiled product's image is several batcher items (`Prepared.inputs()`: the whole image and its
tiles), queued together with the request's other images, so tiles of concurrent requests share
batches; each image gets back exactly its own items (`group`), in order.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

from service.runtime import postprocess, scoring
from service.runtime.artifact import Tiling
from service.runtime.detector import Prepared, Upload, join_outputs, ms_since
from service.server.batching import BatchResult
from service.server.errors import ApiError
from service.server.deadlines import RequestGuard
from service.server.state import LoadedModel, ServiceState

T = TypeVar("T")

__all__ = ["Upload", "detect"]


async def run_cpu(state: ServiceState, fn: Callable[..., T], *args: Any) -> T:
    """Run a CPU-bound step off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(state.cpu_pool, fn, *args)


async def prepare_all(state: ServiceState, model: LoadedModel, uploads: list[Upload],
                      view_max_side: int | None, tiles: Tiling | None = None) -> list[Prepared]:
    """Decode every file in parallel (each only as far as the request needs: the overlay's view
    when `view_max_side` is not None); the first failure in upload order fails the request."""
    limits = state.limits
    outcomes = await asyncio.gather(
        *(run_cpu(state, model.detector.prepare, u, limits, view_max_side, u.filename, tiles) for u in uploads),
        return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return list(outcomes)  # type: ignore[arg-type]


def timed_render(model: LoadedModel, prep: Prepared, outputs: Any, policy: scoring.Policy,
                 options: postprocess.RenderOptions) -> tuple[dict[str, Any], float]:
    """Render one image (runs in a CPU thread); returns the fields and the time taken."""
    t0 = time.perf_counter()
    return model.detector.render(prep, outputs, policy, options), ms_since(t0)


def group(results: list[BatchResult], prepared: list[Prepared]) -> list[list[BatchResult]]:
    """The batcher's results of a request (all images' inputs, in order) -> per image."""
    out, start = [], 0
    for p in prepared:
        n = len(p.inputs())
        out.append(results[start:start + n])
        start += n
    return out


async def detect(state: ServiceState, model: LoadedModel, uploads: list[Upload], policy: scoring.Policy,
                 options: postprocess.RenderOptions, echo: dict[str, str],
                 guard: RequestGuard | None = None) -> list[dict[str, Any]]:
    """The results list of a /detect answer, in upload order. A tiled product's image is its
    whole-image input plus its tiles, all queued under the request's one ticket. With a `guard`
    (the request's deadline and caller, service.server.deadlines) the decoded request is admitted
    by expected wait, dropped from the line (every tile with it) if its deadline passes or its
    caller leaves, and a late answer becomes DeadlineExceeded."""
    prepared = await prepare_all(state, model, uploads, options.view_max_side if options.overlay else None,
                                 policy.tiling)
    items = [(x, policy.allowed) for p in prepared for x in p.inputs()]
    if len(items) > model.batcher.max_queue_size:  # would never fit: not a 503 to retry
        raise ApiError(413, "too_many_tiles", f"{len(prepared)} image(s) of a tiled product make {len(items)} encoder "
                       f"inputs (whole image + tiles each); at most {model.batcher.max_queue_size} (DAPO_MAX_QUEUE_SIZE) "
                       "fit in one request: send fewer images per request")
    if guard is None:
        flat = await model.batcher.submit_many(items)
    else:
        guard.admit(len(items))
        flat = await guard.submit(items)
    batch_results = group(flat, prepared)
    rendered = await asyncio.gather(*(
        run_cpu(state, timed_render, model, p, join_outputs([r.outputs for r in rs]), policy, options)
        for p, rs in zip(prepared, batch_results, strict=True)))
    if guard is not None:
        guard.deliver(len(items))
    results = []
    for prep, rs, (fields, post_ms) in zip(prepared, batch_results, rendered, strict=True):
        result: dict[str, Any] = {"filename": prep.filename, **fields}
        result["timing_ms"] = {"decode": prep.decode_ms, "preprocess": prep.preprocess_ms,
                               "queue_wait": round(max(r.queue_wait_s for r in rs) * 1000.0, 3),
                               "inference": round(max(r.inference_s for r in rs) * 1000.0, 3), "postprocess": post_ms}
        result.update(echo)
        results.append(result)
    return results
