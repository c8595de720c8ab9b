"""Scale-out with Ray Serve: the SAME FastAPI app (`service.server.app.create_app`) as N replicas.

Each replica is a Ray actor that builds the app itself (`serve.ingress` with a builder
function, evaluated in the replica) and Ray Serve runs the app's lifespan there: every replica
verifies and loads the artifact, builds its own backend, runs its warm-up and starts its own
micro-batcher, exactly as `dapo serve` does in one process. Ray's HTTP proxy spreads requests
over the replicas (power of two choices on their queue lengths); inside a replica the images
of concurrent requests are still micro-batched. Each answer carries `X-Replica` (the replica
that served it), added in this mode only.

Three ways in:
  - `dapo serve --ray [--replicas N|auto] [--gpus-per-replica F]`: local Ray (or the cluster
    named by RAY_ADDRESS), proxy on DAPO_HOST:DAPO_PORT, blocks until Ctrl-C.
  - `serve run deploy/ray_serve.yaml` / `serve deploy deploy/ray_serve.yaml`: the config file
    names `service.server.ray_serve:app_builder`; its `deployments:` section overrides the options.
  - `build_app(settings, ...)` then `serve.run(...)` from Python (tests).

Every DAPO_* setting applies per replica (batch size, queue bound, limits, keys, ...). State that
must be the fleet's (idempotency records, the recent answers feedback refers to, drift windows)
goes to Redis with DAPO_STATE_URL, and verdicts to PostgreSQL with DAPO_FEEDBACK_DB
(docs/fleet.md): without them a retry or a verdict that reaches another replica fails. The
artifact path must exist on every node that runs a replica (a shared volume or a baked
image). /metrics through the proxy answers for whichever replica took that request: scrape the
replicas, or use Ray's own metrics, for a total.

New model without downtime: deploy again with the new artifact (`artifact:` in the config file
and `serve deploy`, or `serve.run(build_app(new_settings, ...))`). Serve gives the new
deployment a new version and rolls the replicas over: it stops at most max(1, 20%) of the old
ones at a time (each finishes its in-flight requests first, graceful_shutdown_timeout_s) and
starts their replacements, which load, verify and warm up (TensorRT engines included) before
taking traffic; the proxy only routes to running replicas, so no request fails
(tests/test_ray_serve.py measures it under continuous load). No extra accelerator is needed: a
replacement takes the place of a stopped replica. In one process, POST /v1/model/reload swaps
the model instead.

Needs the `ray` extra: pip install 'dapo-inspect[ray]' (ray[serve] >= 2.47, for builder
functions in `serve.ingress`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.server.middleware import HttpMiddleware
from service.server.settings import Settings

log = logging.getLogger("dapo.ray")

DEPLOYMENT_NAME = "DapoInspect"
APP_NAME = "dapo"
REPLICA_HEADER = "X-Replica"


class ReplicaHeaderMiddleware(HttpMiddleware):
    """Adds `X-Replica: <replica id>` to every answer (ray mode only)."""

    def __init__(self, app: ASGIApp):
        super().__init__(app)
        self._replica: str | None = None

    def replica(self) -> str:
        if self._replica is None:
            from ray import serve
            from ray.serve.exceptions import RayServeException

            try:
                self._replica = serve.get_replica_context().replica_tag
            except RayServeException:  # not inside a replica (should not happen in ray mode)
                self._replica = f"pid-{os.getpid()}"
        return self._replica

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_replica(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append(REPLICA_HEADER, self.replica())
            await send(message)

        await self.app(scope, receive, send_with_replica)


def replica_settings(settings: Settings) -> Settings:
    """The settings with every file path made absolute (replicas do not share the driver's cwd)."""
    return settings.model_copy(update={name: value.resolve() for name, value in settings
                                       if isinstance(value, Path)})


def build_asgi_app(settings: Settings):
    """What each replica serves: the service app plus the replica header."""
    from service.server.app import create_app

    app = create_app(settings)
    app.add_middleware(ReplicaHeaderMiddleware)  # outermost: on every answer, errors included
    return app


def deployment_options(settings: Settings, *, replicas: int | str = 1, num_gpus: float = 0.0,
                       num_cpus: float = 1.0, min_replicas: int = 1, max_replicas: int = 4,
                       target_ongoing_requests: float | None = None,
                       max_ongoing_requests: int | None = None) -> dict[str, Any]:
    """`@serve.deployment` options. `replicas="auto"` turns on Serve's autoscaler.

    Each replica micro-batches on its own, so a replica should be offered enough concurrent
    requests to fill a batch: max_ongoing_requests defaults to the app's own queue bound (beyond
    it the app would answer 503 anyway) and the autoscaling target to two batches in flight.
    """
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "max_ongoing_requests": max_ongoing_requests or settings.max_queue_size,
        "graceful_shutdown_timeout_s": settings.graceful_timeout_s,
        # how often a stopping replica checks that its last request has finished (Serve's default,
        # 2 s, adds up to 2 s per replica to every rolling update for no benefit)
        "graceful_shutdown_wait_loop_s": 0.25,
        "health_check_period_s": 10,
    }
    if replicas == "auto":
        options["num_replicas"] = "auto"
        options["autoscaling_config"] = {
            "min_replicas": min_replicas,
            "max_replicas": max_replicas,
            "target_ongoing_requests": target_ongoing_requests or 2 * settings.max_batch_size,
            "upscale_delay_s": 10,
            "downscale_delay_s": 300,
        }
    else:
        options["num_replicas"] = int(replicas)
    return options


def build_app(settings: Settings, **options: Any):
    """A Ray Serve application serving `create_app(settings)` (options: `deployment_options`)."""
    from ray import serve

    settings = replica_settings(settings)

    def asgi_app():  # runs inside each replica, which then runs the app's lifespan
        return build_asgi_app(settings)

    ingress = serve.deployment(serve.ingress(asgi_app)(), **deployment_options(settings, **options))
    return ingress.bind()


def app_builder(args: dict[str, Any]):
    """`import_path` target for a Serve config file (`deploy/ray_serve.yaml`).

    `args` are Settings fields (`artifact`, `backend`, `max_batch_size`, ...); DAPO_* variables
    apply too. Replica counts, resources and autoscaling come from the file's `deployments:`.
    """
    return build_app(Settings(**(args or {})))


def serve_forever(settings: Settings, *, replicas: int | str = 1, num_gpus: float = 0.0) -> int:
    """`dapo serve --ray`: start (or join) Ray, run the app behind Serve's proxy, block.

    Ctrl-C or SIGTERM (docker stop) deletes the application, which lets every replica finish
    its in-flight requests (graceful_shutdown_timeout_s) before the Ray this command started
    is shut down; a cluster joined through RAY_ADDRESS keeps running.
    """
    import signal

    import ray
    from ray import serve

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)  # also when started in the background (SIGINT ignored)
    joined = bool(os.environ.get("RAY_ADDRESS"))
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        log.info("ray serve", extra={"replicas": replicas, "gpus_per_replica": num_gpus,
                                     "url": f"http://{settings.host}:{settings.port}"})
        serve.run(build_app(settings, replicas=replicas, num_gpus=num_gpus), name=APP_NAME, route_prefix="/",
                  blocking=True)
    except KeyboardInterrupt:
        log.info("ray serve: stopping (in-flight requests finish first)")
    finally:
        try:
            serve.delete(APP_NAME)
            if not joined:
                serve.shutdown()
        finally:
            if not joined:
                ray.shutdown()
    return 0
