"""What a running app holds: settings, the current model, the stores.

One object on `app.state.service`, created by `create_app` and filled in by the lifespan, so
routes never reach for module globals and several apps can live in one process.

The served model is ONE object (`LoadedModel`: the runtime's Detector plus the micro-batcher
that feeds it). A request reads `state.model` once, at its start, and uses only that object to
the end, so replacing `state.model` (a hot swap) is atomic: each request is answered wholly by
the old model or wholly by the new one.
"""
from __future__ import annotations

import asyncio
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.runtime.artifact import Manifest
from service.runtime.backends.base import Backend
from service.runtime.detector import Detector, ImageLimits
from service.server.admission import Admission
from service.server.batching import MicroBatcher
from service.server.line.loop import LineLoop
from service.server.metrics import Metrics
from service.server.quality import QualityMetrics, QualityOptions
from service.server.auth import ApiKeys
from service.server.idempotency import IdempotencyStore, MemoryIdempotencyStore
from service.server.settings import Settings

if TYPE_CHECKING:  # reload.py builds on this module
    from service.server.reload import Reloader


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """CPUs this process may actually use: its affinity mask, lowered to a cgroup v2 CPU quota
    (a container started with --cpus=N sees every core of the host in its affinity mask)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            n = min(n, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota visible: the affinity mask is the limit
    return max(1, n)


def cpu_workers(configured: int | None = None) -> int:
    """Threads for decode/preprocess/postprocess: DAPO_CPU_THREADS, else one per available CPU.

    No fixed cap: a GPU node's cores are what keeps its accelerator fed (Pillow's decoders and
    resizes, zlib, numpy and pycocotools release the GIL for their heavy parts)."""
    return configured if configured is not None else available_cpus()


class Usage:
    """How many requests hold a model (event loop only, so a plain counter); `idle()` returns
    once none does. A swapped-out model is closed only then, so a request that started on it
    finishes on it."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def acquire(self) -> None:
        self.count += 1
        self._idle.clear()

    def release(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def idle(self) -> None:
        await self._idle.wait()


@dataclass(frozen=True)
class LoadedModel:
    """The model being served: the artifact's Detector and the batcher that feeds its `infer`,
    where it was loaded from, and the sha256 of its manifest.json (which lists every file's
    sha256, so it names the exact files; name and version are only what the bake was told)."""

    detector: Detector
    batcher: MicroBatcher
    artifact: Path
    artifact_sha256: str
    admission: Admission | None = field(default=None, compare=False, repr=False)  # by expected wait
    usage: Usage = field(default_factory=Usage, compare=False, repr=False)

    @property
    def manifest(self) -> Manifest:
        return self.detector.manifest

    @property
    def backend(self) -> Backend:
        return self.detector.backend

    def ref(self) -> dict[str, str]:
        """How answers name the model that produced them."""
        m = self.detector.manifest
        return {"name": m.name, "version": m.version, "backbone": m.backbone.name,
                "artifact_sha256": self.artifact_sha256}


def shared_state(settings: Settings, metrics: Metrics) -> Any:
    """The link to the fleet's shared state (DAPO_STATE_URL), or None: everything in this process."""
    if not settings.state_url:
        return None
    from service.server.fleet.link import StateLink

    try:
        return StateLink(settings.state_url, settings.state_timeout_s, settings.state_retry_s, metrics)
    except ImportError as e:  # redis-py: the `fleet` extra
        raise RuntimeError(f"DAPO_STATE_URL is set but {e.name} is not installed: "
                           "pip install 'dapo-inspect[fleet]'") from e


def idempotency_store(settings: Settings, link: Any) -> IdempotencyStore:
    if link is None:
        return MemoryIdempotencyStore(settings.idempotency_ttl_s, settings.idempotency_max_entries)
    from service.server.fleet.idempotency import RedisIdempotencyStore

    return RedisIdempotencyStore(link, settings.idempotency_ttl_s, settings.idempotency_claim_ttl_s)


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    api_keys: ApiKeys
    admin_keys: ApiKeys  # POST /v1/model/reload; none configured = reload over HTTP off
    idempotency: IdempotencyStore
    quality: QualityMetrics  # the line's quality metrics, in metrics.registry
    loop: LineLoop  # sinks, samples, feedback: what happens after an answer
    link: Any = None  # service.server.fleet.link.StateLink when DAPO_STATE_URL is set
    model: LoadedModel | None = None  # replaced as a whole, never edited in place
    reloader: Reloader | None = None  # hot swaps (service.server.reload), set by the lifespan
    cpu_pool: ThreadPoolExecutor | None = None  # decode / preprocess / postprocess threads
    ready: bool = False
    inflight: int = 0  # /detect requests admitted and not yet answered (event-loop only)

    @classmethod
    def from_settings(cls, settings: Settings) -> "ServiceState":
        metrics = Metrics()
        link = shared_state(settings, metrics)
        state = cls(
            settings=settings,
            metrics=metrics,
            loop=LineLoop(settings, metrics.loop, link),
            api_keys=ApiKeys.from_settings(settings.api_keys, settings.api_keys_file),
            admin_keys=ApiKeys.from_settings(settings.admin_keys, settings.admin_keys_file),
            idempotency=idempotency_store(settings, link),
            quality=QualityMetrics(metrics.registry, QualityOptions.from_settings(settings)),
            link=link,
        )
        if link is not None:
            from service.server.fleet.drift import RedisDriftWindows

            state.quality.shared = RedisDriftWindows(link, settings.drift_window)
        return state

    @property
    def limits(self) -> ImageLimits:
        return ImageLimits(self.settings.max_pixels, self.settings.max_side)

    # read-only views of the current model (tests, logs); requests capture `model` instead
    @property
    def manifest(self) -> Manifest | None:
        return self.model.manifest if self.model is not None else None

    @property
    def backend(self) -> Backend | None:
        return self.model.backend if self.model is not None else None

    @property
    def batcher(self) -> MicroBatcher | None:
        return self.model.batcher if self.model is not None else None

    @property
    def serving(self) -> bool:
        """Ready and able to take work right now (what /readyz reports)."""
        return self.ready and self.model is not None and self.model.batcher.running
