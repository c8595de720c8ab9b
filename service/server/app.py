"""`create_app(settings)`: the FastAPI app, its middleware, handlers and lifespan.

Lifespan, in order: verify and read the artifact (sha256 of every file, in a thread), build
the backend, start the batcher, run a warm-up batch (first-call costs such as CUDA context,
TensorRT engine build or ORT graph optimisation are paid before traffic), then report ready.
On shutdown: stop reporting ready, let the batcher finish what is queued or running, release
the threads. Uvicorn itself lets in-flight requests finish before running the shutdown half.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

import service
from service.runtime.artifact import Manifest, load_manifest
from service.runtime.backends.base import Backend
from service.server.batching import MicroBatcher
from service.server.feedback_routes import router as feedback_router
from service.server.errors import envelope, install_handlers, request_id_of
from service.server.logs import configure_logging
from service.server.middleware import BodyLimitMiddleware, RequestContextMiddleware
from service.server.routes import router
from service.server.ui import router as ui_router
from service.server.settings import Settings
from service.server.state import ServiceState, cpu_workers

log = logging.getLogger("dapo.app")


def build_backend(folder: Path, manifest: Manifest, settings: Settings) -> Backend:
    """The configured backend (imported lazily: torch is optional and heavy)."""
    from service.runtime.backends import create_backend

    return create_backend(folder, manifest, backend=settings.backend, providers=settings.providers,
                          trt_cache_dir=settings.trt_cache_dir, device=settings.device,
                          precision=settings.precision, io_binding=settings.ort_io_binding)


def warm_up(backend: Backend, manifest: Manifest, batch_sizes: list[int]) -> None:
    """Run zero images at each batch size once, so the first real request is not the slow one."""
    n_classes = len(manifest.vocabulary)
    for b in batch_sizes:
        pixel_values = np.zeros((b, 3, manifest.image_size, manifest.image_size), dtype=np.float32)
        backend.run(pixel_values, np.ones((b, n_classes), dtype=bool))


async def start(state: ServiceState, backend: Backend | None) -> None:
    """Everything between 'process up' and 'ready'."""
    settings = state.settings
    t0 = time.perf_counter()
    manifest = await asyncio.to_thread(load_manifest, settings.artifact, True)
    state.manifest = manifest
    state.backend = backend or await asyncio.to_thread(build_backend, Path(settings.artifact), manifest, settings)
    state.cpu_pool = ThreadPoolExecutor(cpu_workers(), thread_name_prefix="dapo-cpu")
    if settings.warmup:
        sizes = sorted({1, settings.max_batch_size})
        await asyncio.to_thread(warm_up, state.backend, manifest, sizes)
    state.batcher = MicroBatcher(state.backend, settings.max_batch_size, settings.max_queue_delay_ms,
                                 settings.max_queue_size, settings.workers, observer=state.metrics)
    await state.batcher.start()
    await asyncio.to_thread(state.loop.start)  # sinks, samples, feedback (a receiver may be down: it queues)
    state.ready = True
    log.info("ready", extra={"artifact": str(settings.artifact), "model": manifest.name,
                             "version": manifest.version, "backend": state.backend.name,
                             "provider": state.backend.provider,
                             "startup_s": round(time.perf_counter() - t0, 3)})


async def stop(state: ServiceState) -> None:
    """Graceful: not ready any more, drain the batcher, release threads."""
    state.ready = False
    if state.batcher is not None:
        await state.batcher.stop()
    await asyncio.to_thread(state.loop.stop)  # after the last answer: drain the sinks (bounded)
    if state.cpu_pool is not None:
        state.cpu_pool.shutdown(wait=True)
        state.cpu_pool = None
    log.info("stopped")


def create_app(settings: Settings | None = None, *, backend: Backend | None = None,
               configure_logs: bool = True) -> FastAPI:
    """The service app. `backend` replaces the one the artifact would build (tests, embedding)."""
    settings = settings or Settings()
    if configure_logs:
        configure_logging(settings.log_level)
    state = ServiceState.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await start(state, backend)
        except Exception as e:  # one clear line naming the file before uvicorn's "startup failed"
            log.error("cannot start: %s", e, extra={"artifact": str(settings.artifact),
                                                   "error_type": type(e).__name__})
            raise
        try:
            yield
        finally:
            await stop(state)

    app = FastAPI(title="dapo-inspect", version=service.__version__, lifespan=lifespan,
                  description="Zero-shot industrial visual inspection: anomaly score, defect types, "
                              "regions and masks for uploaded images.")
    app.state.service = state
    app.include_router(router)
    app.include_router(feedback_router)  # POST /v1/feedback
    app.include_router(ui_router)  # the operator page at / and /ui (static, same API)
    install_handlers(app, settings.retry_after_s)

    async def client_gone(request, exc: ClientDisconnect):  # nobody reads this answer
        return envelope(400, "client_disconnected", "client disconnected", request_id_of(request))

    app.add_exception_handler(ClientDisconnect, client_gone)
    # added innermost first: body limit, then request context, then CORS outermost
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContextMiddleware, metrics=state.metrics)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST"], allow_headers=["*"],
                           expose_headers=["X-Request-ID", "Retry-After", "Idempotent-Replayed"])
    return app
