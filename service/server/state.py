"""What a running app holds: settings, the artifact, the backend, the batcher, the stores.

One object on `app.state.service`, created by `create_app` and filled in by the lifespan, so
routes never reach for module globals and several apps can live in one process.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from service.runtime.artifact import Manifest
from service.runtime.backends.base import Backend
from service.server.batching import MicroBatcher
from service.server.loop import LineLoop
from service.server.metrics import Metrics
from service.server.security import ApiKeys, IdempotencyStore
from service.server.settings import Settings


def cpu_workers() -> int:
    """Threads for decode/preprocess/postprocess: the CPUs this process may use, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    api_keys: ApiKeys
    idempotency: IdempotencyStore
    loop: LineLoop  # sinks, samples, feedback: what happens after an answer
    manifest: Manifest | None = None
    backend: Backend | None = None
    batcher: MicroBatcher | None = None
    cpu_pool: ThreadPoolExecutor | None = None  # decode / preprocess / postprocess threads
    ready: bool = False
    inflight: int = 0  # /detect requests admitted and not yet answered (event-loop only)

    @classmethod
    def from_settings(cls, settings: Settings) -> "ServiceState":
        metrics = Metrics()
        return cls(
            settings=settings,
            metrics=metrics,
            loop=LineLoop(settings, metrics.loop),
            api_keys=ApiKeys.from_settings(settings.api_keys, settings.api_keys_file),
            idempotency=IdempotencyStore(settings.idempotency_ttl_s, settings.idempotency_max_entries),
        )

    @property
    def serving(self) -> bool:
        """Ready and able to take work right now (what /readyz reports)."""
        return self.ready and self.batcher is not None and self.batcher.running
