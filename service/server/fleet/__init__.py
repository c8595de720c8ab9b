"""State a fleet of replicas shares (`DAPO_STATE_URL=redis://host:6379/0`), so N replicas keep
the promises one process keeps:

- `idempotency.RedisIdempotencyStore`: Idempotency-Key records (claim with SET NX PX, stored
  answer with a TTL): a retry is replayed whichever replica it reaches, and of two concurrent
  requests with one key exactly one runs;
- `recent.RedisRecent`: the recent answers (image bytes included) that operator feedback refers
  to, under a byte bound (evicted -> 410), so a verdict may reach any replica;
- `drift.RedisDriftWindows`: the per-product score window the drift gauges describe, so PSI
  is the fleet's, not one replica's share of it.

`link.StateLink` is the one asyncio Redis client of an app: every call has a deadline, and an
outage is one metric increment and one log line; while it lasts calls fail at once with
`StateUnavailable` (503 `state_unavailable` + Retry-After where an answer depends on it;
/detect without a key keeps serving). Without DAPO_STATE_URL none of this is imported.
"""
