"""What the fleet's shared state costs /detect: the /detect / encoder ratio with DAPO_STATE_URL
(a local redis-server) against without it, feedback on in both (target: with / without <= 1.02),
and the Redis memory that 1000 recent answers take (INFO memory, used_memory).

Two real server processes (`dapo serve`), one per configuration, take single-image requests in
alternating blocks, each paired with a bare ONNX encoder run on the same image (as
`bench/loop_overhead.py` and `dapo bench --mode e2e` do), so drift on a shared machine hits both
alike. With the state URL each answer is also stored in Redis (image bytes included) before it
is sent, and its scores pushed to the drift window.

    python bench/fleet_overhead.py --artifact DIR [--blocks 10] [--block 6] [--answers 1000]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from loop_overhead import encoder_and_images, run_blocks, summarise  # bench/ is on sys.path when a bench script runs
from service.bench import test_images
from service.server.local_server import Server, free_port


def start_redis() -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                             "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, port


def interleaved(artifact: Path, envs: dict[str, dict[str, str]], blocks: int, block: int, fmt: str) -> dict:
    """Blocks of `block` requests alternate between the servers; ratios /detect over encoder."""
    import httpx


    images, mime, pixels, allowed, encoder = encoder_and_images(artifact, fmt)
    names = list(envs)
    servers = {k: Server(artifact, env) for k, env in envs.items()}
    try:
        for s in servers.values():
            s.wait_ready(900)  # a large artifact on a busy machine: verify + load + warm-up
        clients = {k: httpx.Client(base_url=s.url, timeout=120) for k, s in servers.items()}
        for client in clients.values():
            for data in images[:2]:
                client.post("/detect", files={"image": ("warm", data, mime)}, data={"product": "x"})
        times, per_block = run_blocks(clients, tuple(names), encoder, pixels, allowed, images, mime, blocks, block)
        for client in clients.values():
            client.close()
    finally:
        for s in servers.values():
            s.stop()
    return summarise(times, per_block, *names)


def redis_memory_per_1000(artifact: Path, env: dict[str, str], redis_port: int, answers: int, fmt: str) -> dict:
    """used_memory growth per 1000 answers kept for feedback (and the image bytes among it)."""
    import httpx
    import redis

    r = redis.Redis(port=redis_port)
    r.flushall()
    images = test_images(16, 640, 480, fmt=fmt)
    before = r.info("memory")["used_memory"]
    with Server(artifact, env) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        image_bytes = 0
        for i in range(answers):
            data = images[i % len(images)]
            client.post("/detect", files={"image": ("part", data, f"image/{fmt.lower()}")}).raise_for_status()
            image_bytes += len(data)
    after = r.info("memory")["used_memory"]
    kept = r.zcard("dapo:ring")
    return {"answers_kept": kept, "used_memory_per_1000_answers_mib": round((after - before) / kept * 1000 / 2**20, 2),
            "image_bytes_per_1000_answers_mib": round(image_bytes / answers * 1000 / 2**20, 2),
            "overhead_per_answer_bytes": round(((after - before) - image_bytes * kept / answers) / kept)}


def state_wait_ms(redis_port: int, calls: int, fmt: str) -> dict:
    """What one answer waits for Redis (event-loop wall time, in this process): storing it for
    feedback (a 640x480 upload), and an Idempotency-Key's claim + stored answer."""
    import asyncio

    from service.server.answers import Answer
    from service.server.fleet.idempotency import RedisIdempotencyStore
    from service.server.fleet.link import StateLink
    from service.server.fleet.recent import RedisRecent
    from service.server.idempotency import StoredResponse
    from service.server.metrics import Metrics

    data = test_images(1, 640, 480, fmt=fmt)[0]
    result = {"anomaly_score": 0.31, "is_anomalous": False, "threshold": 0.5, "defect_types": [], "regions": [],
              "width": 640, "height": 480}

    async def run() -> dict:
        link = StateLink(f"redis://127.0.0.1:{redis_port}/0", 1.0, 1.0, Metrics(), prefix="bench:")
        recent = RedisRecent(link, 3600, 2**30)
        idem = RedisIdempotencyStore(link, 600, 120)
        body = StoredResponse(200, b"x" * 2000)

        async def produce():
            return body

        try:
            t = time.perf_counter()
            for i in range(calls):
                await recent.remember(Answer(f"r{i}", {"name": "m"}, (("p.jpg", data),), (result,), {}))
            remember = (time.perf_counter() - t) / calls
            t = time.perf_counter()
            for i in range(calls):
                await idem.run(f"k{i}", "fp", produce)
            claim = (time.perf_counter() - t) / calls
        finally:
            await link.close()
        return {"remember_ms": round(1000 * remember, 3), "idempotency_claim_and_store_ms": round(1000 * claim, 3)}

    return asyncio.run(run())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifact", required=True)
    p.add_argument("--blocks", type=int, default=10, help="0: only the memory figure")
    p.add_argument("--block", type=int, default=6, help="requests per block")
    p.add_argument("--format", default="JPEG")
    p.add_argument("--answers", type=int, default=1000, help="answers for the Redis memory figure (0: skip)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dapo-fleet-bench-"))
    redis_proc, redis_port = start_redis()
    artifact = Path(args.artifact)
    local = {"DAPO_FEEDBACK_DB": str(work / "local.sqlite3"), "DAPO_LOG_LEVEL": "WARNING"}
    shared = {"DAPO_FEEDBACK_DB": str(work / "shared.sqlite3"), "DAPO_LOG_LEVEL": "WARNING",
              "DAPO_STATE_URL": f"redis://127.0.0.1:{redis_port}/0"}
    try:
        out = {}
        if args.blocks:
            out["e2e"] = interleaved(artifact, {"local": local, "state_url": shared}, args.blocks, args.block,
                                     args.format)
        out["state_wait"] = state_wait_ms(redis_port, 300, args.format)
        if args.answers:
            out["redis_memory"] = redis_memory_per_1000(artifact, shared, redis_port, args.answers, args.format)
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
