"""`create_app(settings)`: the FastAPI app, its middleware, handlers and lifespan.

Lifespan, in order: verify and read the artifact (sha256 of every file, in a thread) into a
Detector with its backend, run a warm-up batch (first-call costs such as CUDA context,
TensorRT engine build or ORT graph optimisation are paid before traffic), start the batcher,
then report ready. `open_model` / `close_model` are that load and that drain for one model.
Later, `POST /v1/model/reload` or SIGHUP open another model the same way beside the serving
one and swap it in (service.server.reload).
On shutdown: stop reporting ready, let the batcher finish what is queued or running, release
the threads. Uvicorn itself lets in-flight requests finish before running the shutdown half.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

import service
from service.runtime.artifact import MANIFEST, load_manifest, sha256_file
from service.runtime.backends.base import Backend
from service.runtime.detector import Detector, RuntimeOptions
from service.runtime.precision import precision_info
from service.server.admission import Admission, seed_service_times
from service.server.batching import MicroBatcher
from service.server.line.feedback_routes import router as feedback_router
from service.server import openapi_contract
from service.server.errors import install_handlers
from service.server.line.feedback import FeedbackIn
from service.server.logs import configure_logging
from service.server.metrics import Metrics
from service.server.middleware import BodyLimitMiddleware, RequestContextMiddleware
from service.server.reload import Reloader
from service.server.routes import router
from service.server.ui import router as ui_router
from service.server.schemas import ReloadRequest
from service.server.settings import Settings
from service.server.state import LoadedModel, ServiceState, cpu_workers

log = logging.getLogger("dapo.app")


def runtime_options(settings: Settings) -> RuntimeOptions:
    """The runtime part of the settings (backend, providers, device, precision, I/O binding)."""
    return RuntimeOptions(backend=settings.backend,
                          providers=tuple(settings.providers) if settings.providers else None,
                          trt_cache_dir=settings.trt_cache_dir, device=settings.device,
                          precision=settings.precision, io_binding=settings.ort_io_binding,
                          max_batch_size=settings.max_batch_size, threads=settings.cpu_threads)


def load_detector(settings: Settings, backend: Backend | None = None) -> Detector:
    """Verify and read the artifact and build its Detector (blocking: run it in a thread).
    `backend` replaces the one the artifact would build (tests, embedding)."""
    if backend is None:
        return Detector.load(settings.artifact, runtime_options(settings))
    folder = Path(settings.artifact)
    return Detector(load_manifest(folder, verify=True), backend, folder)


async def open_model(settings: Settings, metrics: Metrics, backend: Backend | None = None) -> LoadedModel:
    """Load, warm up and start one model: everything it needs before it may take a request.
    Used at start-up and, beside the serving model, by a hot reload (service.server.reload)."""
    detector = await asyncio.to_thread(load_detector, settings, backend)
    manifest_sha256 = await asyncio.to_thread(sha256_file, Path(settings.artifact) / MANIFEST)
    batcher = MicroBatcher(detector.infer, max_batch_size=settings.max_batch_size,
                           max_queue_delay_ms=settings.max_queue_delay_ms, max_queue_size=settings.max_queue_size,
                           workers=settings.workers, observer=metrics)
    if settings.warmup:
        sizes = sorted({1, settings.max_batch_size})
        await asyncio.to_thread(detector.warm_up, sizes)
        await asyncio.to_thread(seed_service_times, detector.warm_up, batcher, sizes)  # admission's first measure
    await batcher.start()
    metrics.models_loaded.inc()
    return LoadedModel(detector, batcher, Path(settings.artifact), manifest_sha256,
                       admission=Admission(batcher, settings.retry_after_s))


async def close_model(model: LoadedModel, metrics: Metrics) -> None:
    """Finish what the model's batcher has queued or running, then release its threads."""
    await model.batcher.stop()
    metrics.models_loaded.dec()


def make_reloader(state: ServiceState) -> Reloader:
    """Reloads build models exactly as start-up does, from the same settings but the artifact."""
    async def open_artifact(artifact: Path, precision: str | None = None) -> LoadedModel:
        update = {"artifact": artifact, **({"precision": precision} if precision else {})}
        return await open_model(state.settings.model_copy(update=update), state.metrics)

    async def close(model: LoadedModel) -> None:
        await close_model(model, state.metrics)

    return Reloader(state, open_artifact, close)


def watch_sighup(reloader: Reloader) -> Callable[[], None]:
    """SIGHUP reloads the configured artifact (the Unix daemon convention). Only where the
    event loop runs in the main thread (`dapo serve`); returns how to stop watching."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, reloader.reload_in_background, "sighup")
    except (ValueError, RuntimeError, NotImplementedError, AttributeError) as e:  # thread, Windows
        log.debug("SIGHUP reload not available here: %s", e)
        return lambda: None
    return lambda: loop.remove_signal_handler(signal.SIGHUP)


async def start(state: ServiceState, backend: Backend | None) -> None:
    """Everything between 'process up' and 'ready'."""
    settings = state.settings
    t0 = time.perf_counter()
    model = await open_model(settings, state.metrics, backend)
    state.cpu_pool = ThreadPoolExecutor(cpu_workers(settings.cpu_threads), thread_name_prefix="dapo-cpu")
    state.model = model
    state.metrics.set_model(model.ref())
    state.metrics.set_precision(precision_info(model.detector.backend))
    state.reloader = make_reloader(state)
    await asyncio.to_thread(state.loop.start)  # sinks, samples, feedback (a receiver may be down: it queues)
    state.ready = True
    detector = model.detector
    log.info("ready", extra={"artifact": str(settings.artifact), "model": detector.name,
                             "version": detector.version, "backend": detector.backend.name,
                             "provider": detector.backend.provider, **precision_info(detector.backend),
                             "startup_s": round(time.perf_counter() - t0, 3)})


async def stop(state: ServiceState) -> None:
    """Graceful: not ready any more, drain the batcher, release threads."""
    state.ready = False
    if state.reloader is not None:
        await state.reloader.close()  # replaced models finish their requests and close
    if state.model is not None:
        await close_model(state.model, state.metrics)
    await asyncio.to_thread(state.loop.stop)  # after the last answer: drain the sinks (bounded)
    if state.link is not None:
        await state.link.close()
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
        unwatch = watch_sighup(state.reloader)
        try:
            yield
        finally:
            unwatch()
            await stop(state)

    app = FastAPI(title="dapo-inspect", version=service.__version__, lifespan=lifespan,
                  description="Zero-shot industrial visual inspection: anomaly score, defect types, "
                              "regions and masks for uploaded images.")
    app.state.service = state
    app.include_router(router)
    app.include_router(feedback_router)  # POST /v1/feedback
    app.include_router(ui_router)  # the operator page at / and /ui (static, same API)
    install_handlers(app, settings.retry_after_s)
    openapi_contract.install(app, [FeedbackIn, ReloadRequest])  # bodies the routes read after the key check
    # added innermost first: body limit, then request context, then CORS outermost
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContextMiddleware, metrics=state.metrics)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST"], allow_headers=["*"],
                           expose_headers=["X-Request-ID", "Retry-After", "Idempotent-Replayed"])
    return app
