"""The recent answers feedback refers to, in Redis: any replica can take a verdict on an answer
any replica gave (`service.server.line.recent.RecentStore`).

One blob per answer (a JSON head: ids, model, echo fields, results without heatmap/overlay
PNGs; then the upload bytes), PX = the feedback window. A sorted set (answer id by time) and a
hash of sizes keep the byte bound (`DAPO_FEEDBACK_RING_MB`, the fleet's total): one Lua
script stores an answer and evicts the oldest until within the window and the bound, leaving a
tombstone per evicted id so a late verdict is told 410, not 404. `rid:<request id>` is the set
of answers given under a caller's X-Request-ID (two or more: the verdict must name its
answer_id). Keys are built inside the script: a standalone Redis (or a primary with
replicas), not Redis Cluster.
"""
from __future__ import annotations

import time

import orjson

from service.server.answers import IMAGE_FIELDS, Answer
from service.server.fleet.link import StateLink
from service.server.line.recent import Ambiguous, Expired, UnknownRequest

FORGOTTEN_S = 24 * 3600  # how long tombstones and request-id sets outlive an answer
KEPT_FIELDS_DROPPED = IMAGE_FIELDS - {"mask"}  # feedback needs the mask (labelled samples), not the PNGs

_PUT = """
local ring, sizes, total_key, rid = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, blob, now, window, max_bytes, prefix, forget = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]),
  tonumber(ARGV[5]), ARGV[6], ARGV[7]
redis.call('SET', prefix .. 'ans:' .. id, blob, 'PX', window)
redis.call('ZADD', ring, now, id)
redis.call('HSET', sizes, id, #blob)
local total = redis.call('INCRBY', total_key, #blob)
redis.call('SADD', rid, id)
redis.call('PEXPIRE', rid, forget)
local horizon = now - window
while true do
  local oldest = redis.call('ZRANGE', ring, 0, 0, 'WITHSCORES')
  if #oldest == 0 then break end
  if tonumber(oldest[2]) > horizon and total <= max_bytes then break end
  local old = oldest[1]
  redis.call('ZREM', ring, old)
  total = redis.call('DECRBY', total_key, tonumber(redis.call('HGET', sizes, old) or '0'))
  redis.call('HDEL', sizes, old)
  redis.call('DEL', prefix .. 'ans:' .. old)
  redis.call('SET', prefix .. 'gone:' .. old, '1', 'PX', forget)
end
return total
"""


def encode_answer(answer: Answer) -> bytes:
    head = {"request_id": answer.request_id, "answer_id": answer.answer_id, "model": answer.model,
            "echo": answer.echo, "inspected_at": answer.inspected_at,
            "results": [{k: v for k, v in r.items() if k not in KEPT_FIELDS_DROPPED} for r in answer.results],
            "files": [[name, len(data)] for name, data in answer.files]}
    return b"".join([orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY), b"\n", *(d for _, d in answer.files)])


def decode_answer(blob: bytes) -> Answer:
    cut = blob.index(b"\n")
    head = orjson.loads(blob[:cut])
    files, at = [], cut + 1
    for name, size in head["files"]:
        files.append((name, blob[at:at + size]))
        at += size
    return Answer(head["request_id"], head["model"], tuple(files), tuple(head["results"]), head["echo"],
                  head["inspected_at"], head["answer_id"])


class RedisRecent:
    def __init__(self, link: StateLink, window_s: float, max_bytes: int):
        self.link, self.window_ms, self.max_bytes = link, int(window_s * 1000), max_bytes
        p = link.prefix
        self._ring, self._sizes, self._total = f"{p}ring", f"{p}ring:sizes", f"{p}ring:bytes"

    async def remember(self, answer: Answer) -> None:
        blob = encode_answer(answer)
        keys = [self._ring, self._sizes, self._total, f"{self.link.prefix}rid:{answer.request_id}"]
        args = [answer.answer_id, blob, int(time.time() * 1000), self.window_ms, self.max_bytes,
                self.link.prefix, FORGOTTEN_S * 1000]
        await self.link.call("recent", lambda c: c.eval(_PUT, len(keys), *keys, *args))

    async def by_answer(self, answer_id: str) -> Answer:
        p = self.link.prefix

        async def fetch(c):
            async with c.pipeline(transaction=False) as pipe:
                pipe.get(f"{p}ans:{answer_id}")
                pipe.exists(f"{p}gone:{answer_id}")
                pipe.zscore(self._ring, answer_id)
                return await pipe.execute()

        blob, gone, in_ring = await self.link.call("recent", fetch)
        if blob is not None:
            return decode_answer(blob)
        if gone or in_ring is not None:  # evicted, or past the window (its key expired)
            raise Expired(answer_id)
        raise UnknownRequest(answer_id)

    async def by_request(self, request_id: str) -> Answer:
        ids = sorted(i.decode() for i in await self.link.call(
            "recent", lambda c: c.smembers(f"{self.link.prefix}rid:{request_id}")))
        if len(ids) > 1:
            raise Ambiguous(request_id, ids)
        if not ids:
            raise UnknownRequest(request_id)
        return await self.by_answer(ids[0])

    def close(self) -> None:
        pass
