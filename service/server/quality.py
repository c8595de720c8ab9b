"""Quality metrics for the line: how the parts are doing, beside how the service is doing.

`QualityMetrics.observe(manifest, results, echo)` runs once per answered /detect request (a
replayed Idempotency-Key answer is not counted again) and updates, in the app's registry:

- `dapo_inspections_total{product, verdict}`: images inspected; verdict is `anomalous` or
  `normal` (the answer's `is_anomalous`). Reject rate = anomalous / all.
- `dapo_defects_total{product, defect_type}`: anomalous images on which the type was found
  (each type in the answer's `defect_types` counts once per image), for the defect mix.
- `dapo_anomaly_score{product}`: histogram of the image anomaly scores.
- `dapo_score_drift_psi{product}`, `dapo_score_mean_shift{product}`: drift of the last
  `drift_window` scores of the product against the baseline `dapo calibrate` stored in the
  manifest (`service.runtime.drift`); `dapo_score_drift_window_images{product}` says how full
  the window is. The drift gauges appear once `drift_min_images` scores are in the window,
  only for products with a baseline. The window counts images, not time (a line's rate
  varies), belongs to this process, and starts empty when the model changes. With
  DAPO_STATE_URL the window lives in Redis (`service.server.fleet.drift`) and is the fleet's:
  every replica pushes its scores there and sets its gauges from the shared window.

Cardinality stays bounded because every label value comes from a closed set: product = a
product of the manifest, `none` when the request named none (an unknown product is refused
with 422 before anything runs; anything else folds into `other`); defect_type = a word of the
vocabulary (else `other`). `station_id` becomes a label only when an allow-list is configured
(DAPO_QUALITY_STATIONS): listed stations keep their name, others read `other`, a request
without one `none`. Without an allow-list the label does not exist, so a client sending
arbitrary station ids cannot grow the number of series.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.runtime.artifact import Manifest, ScoreBaseline
from service.runtime.drift import drift_of
from service.server.settings import LABEL_NONE as NONE, LABEL_OTHER as OTHER, Settings

log = logging.getLogger("dapo.quality")
ANOMALOUS, NORMAL = "anomalous", "normal"
SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 20)) + (1.0,)  # scores are probabilities


@dataclass(frozen=True)
class QualityOptions:
    stations: tuple[str, ...] = ()  # allow-list for the station_id label; empty = no such label
    drift_window: int = 500  # the last N scores of a product the drift gauges describe
    drift_min_images: int = 50  # no drift value before this many scores are in the window

    @classmethod
    def from_settings(cls, settings: Settings) -> "QualityOptions":
        return cls(tuple(settings.quality_stations), settings.drift_window, settings.drift_min_images)


def fold(value: str | None, known: frozenset[str]) -> str:
    """The label value: the value when it is in the bounded set, else `other`; `none` if absent."""
    if value is None:
        return NONE
    return value if value in known else OTHER


@dataclass
class _ModelView:
    """What the metrics need from one manifest: its closed label sets and its baselines."""

    manifest: Manifest
    products: frozenset[str]
    defect_types: frozenset[str]
    baselines: dict[str, ScoreBaseline] = field(default_factory=dict)

    @classmethod
    def of(cls, manifest: Manifest) -> "_ModelView":
        baselines = {name: p.baseline for name, p in manifest.products.items() if p.baseline is not None}
        return cls(manifest, frozenset(manifest.products), frozenset(manifest.defect_names), baselines)


class QualityMetrics:
    """The line's quality metrics in a given registry (the app's), fed by `observe`."""

    def __init__(self, registry: CollectorRegistry, options: QualityOptions | None = None) -> None:
        self.options = options or QualityOptions()
        self._stations = frozenset(self.options.stations)
        station = ["station_id"] if self._stations else []
        r = registry
        self.inspections = Counter("dapo_inspections_total", "Images inspected, by product and verdict",
                                   ["product", *station, "verdict"], registry=r)
        self.defects = Counter("dapo_defects_total",
                               "Anomalous images on which a defect type was found, by product and type",
                               ["product", *station, "defect_type"], registry=r)
        self.scores = Histogram("dapo_anomaly_score", "Image anomaly scores by product", ["product"],
                                buckets=SCORE_BUCKETS, registry=r)
        window = f"the last {self.options.drift_window} scores"
        self.psi = Gauge("dapo_score_drift_psi",
                         f"Population stability index of {window} vs the calibration baseline", ["product"],
                         registry=r)
        self.mean_shift = Gauge("dapo_score_mean_shift",
                                f"Mean of {window} minus the calibration mean, in calibration standard deviations",
                                ["product"], registry=r)
        self.window_images = Gauge("dapo_score_drift_window_images", "Scores in the drift window", ["product"],
                                   registry=r)
        self._view: _ModelView | None = None
        self._windows: dict[str, deque[float]] = {}
        self.shared = None  # fleet.drift.RedisDriftWindows when DAPO_STATE_URL is set
        self._pushes: set[asyncio.Task] = set()

    def observe(self, manifest: Manifest, results: Iterable[Mapping[str, Any]], echo: Mapping[str, str]) -> None:
        """Count one answered request's results (`echo`: its product / station_id fields)."""
        view = self._view_of(manifest)
        product = fold(echo.get("product"), view.products)
        station = [fold(echo.get("station_id"), self._stations)] if self._stations else []
        scores: list[float] = []
        for result in results:
            score = float(result["anomaly_score"])
            anomalous = bool(result["is_anomalous"])
            self.inspections.labels(product, *station, ANOMALOUS if anomalous else NORMAL).inc()
            if anomalous:
                for defect in result.get("defect_types", []):
                    self.defects.labels(product, *station, fold(defect["name"], view.defect_types)).inc()
            self.scores.labels(product).observe(score)
            if product in view.baselines:
                self._window(product).append(score)
                scores.append(score)
        if product in view.baselines:
            if self.shared is not None:
                self._share(product, view.baselines[product], scores)
            else:
                self._update_drift(product, view.baselines[product])

    def _share(self, product: str, baseline: ScoreBaseline, scores: list[float]) -> None:
        """Push to the fleet's window in the background (never delays or fails the answer)."""
        async def push() -> None:
            try:
                window = await self.shared.push(product, baseline, scores)
            except Exception as e:  # StateUnavailable: counted by the link; the gauges keep their value
                log.debug("drift window not shared: %s", e)
                return
            self._set_drift(product, baseline, window)

        task = asyncio.get_running_loop().create_task(push())
        self._pushes.add(task)
        task.add_done_callback(self._pushes.discard)

    def _view_of(self, manifest: Manifest) -> _ModelView:
        """The view of this manifest; a new model starts new drift windows (new baselines)."""
        if self._view is None or self._view.manifest is not manifest:
            self._view = _ModelView.of(manifest)
            self._windows.clear()
            for gauge in (self.psi, self.mean_shift, self.window_images):
                gauge.clear()
        return self._view

    def _window(self, product: str) -> deque[float]:
        if product not in self._windows:
            self._windows[product] = deque(maxlen=self.options.drift_window)
        return self._windows[product]

    def _update_drift(self, product: str, baseline: ScoreBaseline) -> None:
        self._set_drift(product, baseline, self._windows[product])

    def _set_drift(self, product: str, baseline: ScoreBaseline, window: Iterable[float]) -> None:
        window = list(window)
        self.window_images.labels(product).set(len(window))
        if len(window) < min(self.options.drift_min_images, self.options.drift_window):
            return
        drift = drift_of(baseline, np.asarray(window, dtype=np.float64))
        self.psi.labels(product).set(drift.psi)
        self.mean_shift.labels(product).set(drift.mean_shift)
