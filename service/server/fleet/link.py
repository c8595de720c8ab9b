"""The app's connection to the shared state (Redis, redis-py's asyncio client), with outage
accounting: every call has a deadline; the first failure starts an outage (one log line,
`dapo_state_outages_total` + 1, `dapo_state_up` 0); during it calls fail at once for
`retry_s` (no request waits on a dead server), then one call probes; its success ends the
outage (one log line). redis-py is imported only here, only when DAPO_STATE_URL is set.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

log = logging.getLogger("dapo.fleet")
T = TypeVar("T")


class StateUnavailable(RuntimeError):
    """The shared state did not answer in time (503 `state_unavailable`, with Retry-After)."""


class StateLink:
    def __init__(self, url: str, timeout_s: float, retry_s: float, metrics: Any, prefix: str = "dapo:"):
        import redis.asyncio as aioredis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url, self.timeout_s, self.retry_s, self.metrics, self.prefix = url, timeout_s, retry_s, metrics, prefix
        # no client-side retries: the deadline is ours, and an outage must fail fast
        self.client = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                              retry=Retry(NoBackoff(), 0), health_check_interval=30)
        self.down_since: float | None = None
        self._probe_after = 0.0
        metrics.state_up.set(1)

    async def call(self, op: str, fn: Callable[[Any], Awaitable[T]]) -> T:
        """`fn(client)` under the deadline; StateUnavailable when Redis is down or slow."""
        from redis.exceptions import RedisError

        if self.down_since is not None and time.monotonic() < self._probe_after:
            raise StateUnavailable(f"shared state unavailable ({op}); retry")
        try:
            result = await asyncio.wait_for(fn(self.client), self.timeout_s)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            self._failed(op, e)
            raise StateUnavailable(f"shared state unavailable ({op}): {type(e).__name__}") from e
        if self.down_since is not None:
            self._recovered()
        return result

    def _failed(self, op: str, e: BaseException) -> None:
        self.metrics.state_errors.labels(op).inc()
        self._probe_after = time.monotonic() + self.retry_s
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.metrics.state_outages.inc()
            self.metrics.state_up.set(0)
            log.error("shared state unavailable: %s (%s); idempotent requests and feedback get 503 until it is "
                      "back", type(e).__name__, e, extra={"state_url": self.safe_url, "op": op})

    def _recovered(self) -> None:
        seconds = time.monotonic() - (self.down_since or time.monotonic())
        self.down_since = None
        self.metrics.state_up.set(1)
        log.info("shared state back", extra={"state_url": self.safe_url, "outage_s": round(seconds, 3)})

    @property
    def safe_url(self) -> str:
        """The URL without a password (for logs)."""
        head, sep, tail = self.url.rpartition("@")
        return f"{self.url.split('://')[0]}://***@{tail}" if sep else self.url

    async def close(self) -> None:
        await self.client.aclose()
