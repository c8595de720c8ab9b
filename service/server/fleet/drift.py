"""The per-product drift window in Redis, so the drift gauges describe the fleet's last N
scores, not one replica's share: RPUSH + LTRIM keep the newest N, LRANGE reads them back (one
round trip, a pipeline). The key names the product and the baseline it is compared with (a
new calibration starts a new window, as a model swap does in one process).
"""
from __future__ import annotations

import hashlib

from service.runtime.artifact import ScoreBaseline
from service.server.fleet.link import StateLink


def window_key(prefix: str, product: str, baseline: ScoreBaseline) -> str:
    digest = hashlib.sha256(baseline.model_dump_json().encode()).hexdigest()[:16]
    return f"{prefix}drift:{product}:{digest}"


class RedisDriftWindows:
    def __init__(self, link: StateLink, size: int):
        self.link, self.size = link, size

    async def push(self, product: str, baseline: ScoreBaseline, scores: list[float]) -> list[float]:
        """Append this request's scores; the window (oldest first) after them."""
        key = window_key(self.link.prefix, product, baseline)

        async def run(c):
            async with c.pipeline(transaction=True) as pipe:
                pipe.rpush(key, *[repr(float(s)) for s in scores])
                pipe.ltrim(key, -self.size, -1)
                pipe.lrange(key, 0, -1)
                return await pipe.execute()

        *_, window = await self.link.call("drift", run)
        return [float(v) for v in window]
