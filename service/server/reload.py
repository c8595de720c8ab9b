"""Hot model swap: load a new artifact beside the serving one, switch atomically, retire the old.

`POST /v1/model/reload` (admin key) and SIGHUP both end up in `Reloader.reload`:

1. load the new artifact *beside* the serving model: sha256 of every file, the backend (on
   TensorRT its engines are built here, into a cache folder of their own), the warm-up batches
   and a started micro-batcher; the serving model keeps answering meanwhile;
2. switch: one assignment of `state.model` on the event loop. A request captures the model once,
   when it is admitted, so it is answered wholly by the old model or wholly by the new one;
3. retire the old model in the background: once the last request holding it has answered, its
   batcher drains and stops and its memory (ONNX Runtime session, GPU buffers) is released.

A load that fails (missing or corrupt artifact, backend error, warm-up error) changes nothing:
the serving model stays, and the reason is in the reload answer, in /v1/model's `reload` and
in the `dapo_model_reloads_total{result="failed"}` / `dapo_model_reload_last_failed` metrics.
One reload at a time: a second one while the first runs is refused (409), never queued.

Memory: during a swap both models are resident (twice the model's host and GPU memory), until
the old model's last request finishes.
"""
from __future__ import annotations

import asyncio
import ctypes
import datetime as dt
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from service.runtime.artifact import ArtifactError
from service.runtime.precision import precision_info
from service.server.state import LoadedModel, ServiceState

log = logging.getLogger("dapo.reload")

OpenModel = Callable[..., Awaitable[LoadedModel]]  # (artifact, precision=None): None = the configured one
CloseModel = Callable[[LoadedModel], Awaitable[None]]


@dataclass
class ReloadReport:
    """The latest reload: what /v1/model shows and the reload answer carries."""

    status: Literal["in_progress", "ok", "failed"]
    source: str  # "http" or "sighup"
    artifact: str
    started: str  # ISO 8601, UTC
    seconds: float | None = None
    model: dict[str, str] | None = None  # ok: the model now serving
    previous: dict[str, str] | None = None  # ok: the model it replaced
    error: str | None = None  # failed: why (the serving model is unchanged)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ReloadInProgress(RuntimeError):
    """Another reload is running; this one was not started."""


class ReloadFailed(RuntimeError):
    """The new artifact could not be loaded; the serving model is unchanged."""

    def __init__(self, report: ReloadReport, cause: BaseException):
        super().__init__(report.error)
        self.report = report
        self.invalid_artifact = isinstance(cause, ArtifactError)


class Reloader:
    """Owns the swap: one reload at a time, the retirement of replaced models, the report."""

    def __init__(self, state: ServiceState, open_model: OpenModel, close_model: CloseModel):
        self.state = state
        self._open = open_model
        self._close = close_model
        self._running: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()  # reloads and retirements not finished yet
        self._closing = False
        self.last: ReloadReport | None = None

    def start(self, artifact: Path | None = None, source: str = "http", precision: str | None = None) -> asyncio.Task:
        """Start loading `artifact` (default: the configured one) in a task of its own, so a
        client that hangs up does not cancel a half-built model; ReloadInProgress if one runs.
        `precision`: this load's precision (e.g. fp32 -> int8); None = DAPO_PRECISION."""
        if self._running is not None:
            raise ReloadInProgress(f"a reload of {self.last.artifact if self.last else '?'} is running")
        if self._closing:
            raise ReloadInProgress("the service is shutting down")
        task = self._spawn(self._reload(Path(artifact or self.state.settings.artifact), source, precision))
        self._running = task
        task.add_done_callback(self._done)
        return task

    async def reload(self, artifact: Path | None = None, source: str = "http",
                     precision: str | None = None) -> ReloadReport:
        """Load and switch; the report, or ReloadInProgress / ReloadFailed (old model serving)."""
        return await asyncio.shield(self.start(artifact, source, precision))

    def reload_in_background(self, source: str = "sighup") -> None:
        """SIGHUP: reload the configured artifact; the outcome goes to the report, log and metrics."""
        try:
            self.start(None, source)
        except ReloadInProgress as e:
            log.warning("reload (%s) ignored: %s", source, e)

    def _done(self, task: asyncio.Task) -> None:
        self._running = None

    async def _reload(self, artifact: Path, source: str, precision: str | None = None) -> ReloadReport:
        metrics, t0 = self.state.metrics, time.perf_counter()
        report = ReloadReport("in_progress", source, str(artifact), _now())
        self.last = report
        log.info("reload: loading", extra={"artifact": str(artifact), "source": source})
        try:
            new = await (self._open(artifact, precision) if precision else self._open(artifact))
        except Exception as e:  # anything: the old model must keep serving
            report.status, report.seconds = "failed", round(time.perf_counter() - t0, 3)
            report.error = f"{type(e).__name__}: {e}; {_serving(self.state.model)}"
            metrics.observe_reload("failed", report.seconds)
            log.warning("reload failed: %s", report.error, extra={"artifact": str(artifact), "source": source})
            raise ReloadFailed(report, e) from e
        if self._closing:  # the app stopped while this model loaded: do not leave it running
            await self._close(new)
            raise ReloadFailed(_failed(report, "the service is shutting down"), RuntimeError("shutting down"))
        old = self.state.model
        self.state.model = new  # the switch: requests admitted from now on get the new model
        report.status, report.seconds = "ok", round(time.perf_counter() - t0, 3)
        report.model, report.previous = new.ref(), old.ref() if old is not None else None
        metrics.observe_reload("ok", report.seconds)
        metrics.set_model(new.ref())
        metrics.set_precision(precision_info(new.detector.backend))
        log.info("reload: switched", extra={"artifact": str(artifact), "source": source, "model": new.manifest.name,
                                            "version": new.manifest.version, "seconds": report.seconds})
        if old is not None:
            self._spawn(self._retire(old))
        return report

    async def _retire(self, old: LoadedModel) -> None:
        """Close a replaced model once no request holds it, and let its memory go."""
        await old.usage.idle()
        await self._close(old)
        log.info("reload: previous model released", extra={"model": old.manifest.name,
                                                           "version": old.manifest.version})
        del old
        gc.collect()  # the ORT session may sit in a reference cycle; free its arena now, not later
        trim_heap()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # failures are reported, not raised
        return task

    async def close(self) -> None:
        """At shutdown: no new model may be switched in; replaced models finish and close."""
        self._closing = True
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def trim_heap() -> None:
    """Hand the freed model's memory back to the OS. glibc's malloc keeps freed chunks in its
    per-thread arenas, so without this the RSS after many swaps creeps up by a fraction of a
    model per swap (bench/reload.py measures both). No-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _serving(model: LoadedModel | None) -> str:
    if model is None:
        return "no model is serving"
    return f"still serving {model.manifest.name} {model.manifest.version} ({model.artifact})"


def _failed(report: ReloadReport, error: str) -> ReloadReport:
    report.status, report.error = "failed", error
    return report


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
