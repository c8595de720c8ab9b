"""Prometheus metrics, one CollectorRegistry per app.

A registry per app (not the global default) keeps several apps in one process (tests, or an
embedding host) from double-registering or mixing their numbers. Names follow Prometheus
conventions (base units, `_total` counters); the endpoint label is the route template, never
the raw path, so label cardinality stays bounded.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
QUEUE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RELOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class Metrics:
    """Every metric the service exports; also the batcher's observer."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("dapo_requests_total", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("dapo_request_duration_seconds", "HTTP request latency by endpoint and status",
                                 ["endpoint", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("dapo_queue_wait_seconds", "Time an image waited for its batch to start",
                                    buckets=QUEUE_BUCKETS, registry=r)
        self.inference = Histogram("dapo_inference_seconds", "Backend time per batch",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("dapo_batch_size", "Images per backend call",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.images = Counter("dapo_images_processed_total", "Images that went through the backend", registry=r)
        self.queue_depth = Gauge("dapo_queue_depth", "Images waiting for a batch", registry=r)
        # deadlines (service.server.deadlines / admission): what the encoder did for nobody
        self.dropped = Counter("dapo_images_dropped_total",
                               "Images not answered, by cause: deadline / disconnected (taken out of the line, never "
                               "encoded), late (encoded, deadline passed before the answer), abandoned (encoded, caller left)",
                               ["cause"], registry=r)
        self.delivered = Counter("dapo_images_delivered_total",
                                 "Images in 200 answers sent before the deadline to a caller still connected",
                                 registry=r)
        self.goodput = Gauge("dapo_goodput_ratio",
                             "Images delivered / images encoded since start (1 = no encoder work wasted)",
                             registry=r)
        self.promised = Gauge("dapo_admission_promised_images",
                              "Images of refused requests expected back at their Retry-After", registry=r)
        self.in_flight = Gauge("dapo_requests_in_flight", "HTTP requests being served", registry=r)
        # model lifecycle (hot swap: service.server.reload)
        self.reloads = Counter("dapo_model_reloads_total", "Model reloads by result (ok, failed)", ["result"],
                               registry=r)
        self.reload_seconds = Histogram("dapo_model_reload_duration_seconds",
                                        "Load + verify + warm-up time of a reload, by result", ["result"],
                                        buckets=RELOAD_BUCKETS, registry=r)
        self.reload_last_failed = Gauge("dapo_model_reload_last_failed",
                                        "1 when the latest reload failed (the previous model still serves)",
                                        registry=r)
        self.model_info = Gauge("dapo_model_info", "The serving model (value 1)",
                                ["name", "version", "artifact_sha256"], registry=r)
        self.precision_info = Gauge("dapo_precision_info",
                                    "The serving backend's precision and the CPU's ISA (value 1); with "
                                    "DAPO_PRECISION=auto, the one it picked", ["backend", "precision", "isa"],
                                    registry=r)
        self.models_loaded = Gauge("dapo_models_loaded",
                                   "Models in memory: 1, or 2 while a replaced one finishes its requests",
                                   registry=r)
        self._encoded = self._delivered = 0  # goodput's terms (the counters above, as plain numbers)
        self.loop = LoopMetrics(r)  # sinks, kept samples, operator feedback
        # the shared state of a fleet (DAPO_STATE_URL; service.server.fleet.link)
        self.state_up = Gauge("dapo_state_up", "1 while the shared state (Redis) answers; 0 during an outage",
                              registry=r)
        self.state_outages = Counter("dapo_state_outages_total", "Outages of the shared state (Redis)", registry=r)
        self.state_errors = Counter("dapo_state_errors_total", "Calls to the shared state that failed or timed out",
                                    ["op"], registry=r)

    # --- batcher hooks (service.server.batching.BatchObserver) ---------------------------------
    def observe_batch(self, size: int, inference_s: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(inference_s)
        self.images.inc(size)
        self._encoded += size
        self._update_goodput()

    def observe_dropped(self, cause: str, images: int) -> None:
        self.dropped.labels(cause).inc(images)

    def observe_delivered(self, images: int) -> None:
        self.delivered.inc(images)
        self._delivered += images
        self._update_goodput()

    def _update_goodput(self) -> None:
        if self._encoded:
            self.goodput.set(self._delivered / self._encoded)

    def observe_queue_wait(self, seconds: float) -> None:
        self.queue_wait.observe(max(seconds, 0.0))

    def set_queue_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    # --- HTTP hooks ---------------------------------------------------------------------
    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint, str(status)).observe(seconds)

    # --- model lifecycle -----------------------------------------------------------------
    def observe_reload(self, result: str, seconds: float) -> None:
        self.reloads.labels(result).inc()
        self.reload_seconds.labels(result).observe(seconds)
        self.reload_last_failed.set(1 if result == "failed" else 0)

    def set_model(self, ref: dict[str, str]) -> None:
        """dapo_model_info names the serving model only (the replaced one's series is dropped)."""
        self.model_info.clear()
        self.model_info.labels(ref["name"], ref["version"], ref["artifact_sha256"]).set(1)

    def set_precision(self, info: dict) -> None:
        """dapo_precision_info names the serving backend's precision only."""
        self.precision_info.clear()
        self.precision_info.labels(info["backend"], info["precision"], info["isa"]).set(1)

    def render(self) -> bytes:
        """The Prometheus text exposition of this app's registry."""
        return generate_latest(self.registry)


class LoopMetrics:
    """What happens after an answer: result sinks, samples kept by policy, operator feedback.

    Label values are bounded: `sink` is mqtt or webhook, `rule` a rule kind, `reason` an errno
    name, `product` a product of the manifest (others are counted as "other").
    """

    def __init__(self, r: CollectorRegistry) -> None:
        self.sink_delivered = Counter("dapo_sink_delivered_total", "Results a sink confirmed (PUBACK, HTTP 2xx)",
                                      ["sink"], registry=r)
        self.sink_dropped = Counter("dapo_sink_dropped_total",
                                    "Results dropped (the oldest) because a sink's queue was full", ["sink"], registry=r)
        self.sink_rejected = Counter("dapo_sink_rejected_total",
                                     "Results the receiver refused for good (HTTP 4xx other than 408/425/429)",
                                     ["sink"], registry=r)
        self.sink_retries = Counter("dapo_sink_retries_total", "Delivery attempts that failed and were retried",
                                    ["sink"], registry=r)
        self.sink_queue = Gauge("dapo_sink_queue_depth", "Results waiting in a sink's queue", ["sink"], registry=r)
        self.sink_up = Gauge("dapo_sink_up", "1 while the sink's last delivery attempt succeeded", ["sink"], registry=r)
        self.samples_written = Counter("dapo_samples_written_total", "Samples written, by rule (or feedback)",
                                       ["rule"], registry=r)
        self.samples_deleted = Counter("dapo_samples_deleted_total", "Samples deleted by cap or retention",
                                       ["reason"], registry=r)
        self.samples_dropped = Counter("dapo_samples_dropped_total",
                                       "Samples not written because the writer's queue was full", registry=r)
        self.samples_errors = Counter("dapo_samples_errors_total", "Sample writes that failed (disk full, permission)",
                                      ["reason"], registry=r)
        self.samples_swept = Counter("dapo_samples_swept_total",
                                     "Incomplete samples (a crash mid-write) removed at start", registry=r)
        self.feedback = Counter("dapo_feedback_total", "Operator feedback on answers, by product and verdict",
                                ["product", "verdict"], registry=r)
