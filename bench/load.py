"""Load test: drive a real `dapo serve` past saturation and check it degrades the documented way.

    python bench/load.py                       # 60 s, demo artifact baked into a temp dir
    python bench/load.py --duration 300        # the 5-minute soak
    python bench/load.py --artifact model_artifacts/demo --concurrency 128 --json out.json

Starts the server as a subprocess on 127.0.0.1 (only ever localhost) with a small queue, runs
`--concurrency` httpx clients posting images for `--duration` seconds or `--max-requests`
requests (whichever comes first), samples the server's RSS (/proc/<pid>/status VmRSS) once a
second, then stops the server with SIGTERM and prints a JSON report:

    status counts (only 200 and 503 may appear; every 503 must carry Retry-After),
    p50/p95/p99/max latency of the accepted (200) requests and of the refusals (503),
    throughput, RSS at start, after warm-up, peak and at the end, its timeline, exit code.

Deadline mode (`--deadline-ms 5000`): every request carries `X-Deadline-Ms`, the clients give
up after `--client-timeout` seconds (a line moving on), and with `--polite` a refused part
(503) waits the Retry-After it was given and retries under the same Idempotency-Key, as
`service.client.DapoClient` does. The report then adds: goodput (images in 200s the clients
received / images the encoder encoded, from the server's own counter), p99 of the 200s, the
images dropped by cause, and for each 503 its Retry-After against the time after which a retry
of that part was accepted (`retry_after_check`). `--image-mp 5` uploads 5 MP JPEGs.

Exits 1 if any other status appears (the client's counts are reconciled with the app's own
/metrics counts: a connection error on a request the app never saw - uvicorn closing an idle
keep-alive connection that a CPU-starved client was about to reuse - is reported, not failed;
a request the app answered that the client never received is a failure), a 503 lacks Retry-After, nothing
was accepted, the server died, it did not exit 0 on SIGTERM, or RSS grew more than
`--rss-growth-mb` (default 50) between the end of the warm-up window and the end of the run.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from service.server.local_server import Server, rss_kib



def rss_mb(pid: int) -> float | None:
    kib = rss_kib(pid)
    return None if kib is None else kib / 1024.0


def images() -> list[tuple[str, bytes]]:
    """A few realistic uploads: a camera-sized JPEG, mid-size PNGs, a small one."""
    rng = np.random.default_rng(0)
    out = []
    for name, (w, h), fmt in (("cam.jpg", (640, 480), "JPEG"), ("part.png", (256, 256), "PNG"),
                              ("small.png", (96, 64), "PNG"), ("gray.jpg", (320, 240), "JPEG")):
        y, x = np.mgrid[0:h, 0:w]
        arr = np.stack([x % 256, y % 256, (x ^ y) % 256], -1).astype(np.uint8)
        arr[h // 3: h // 2, w // 3: w // 2] = rng.integers(0, 255, (h // 2 - h // 3, w // 2 - w // 3, 3))
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, fmt)
        out.append((name, buf.getvalue()))
    return out


def camera_images(megapixels: float) -> list[tuple[str, bytes]]:
    """Textured JPEGs of about `megapixels` MP at 4:3 (the shape of a line camera's frame)."""
    from service.bench import test_images

    w = int(round((megapixels * 1e6 * 4 / 3) ** 0.5))
    h = int(round(w * 3 / 4))
    return [(f"cam{i}.jpg", data) for i, data in enumerate(test_images(4, w, h, seed=1, fmt="JPEG"))]


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000.0, 2) if values else None


def server_latency(metrics_text: str) -> dict:
    """p50/p99 of /detect as the server measured it (its histogram), by status: excludes the
    client's own overhead, which on a small shared machine can dominate the client's figures."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name.endswith("_bucket") and "duration" in sample.name \
                    and sample.labels.get("endpoint", sample.labels.get("path", "")) == "/detect":
                buckets.setdefault(sample.labels.get("status", "?"), []).append(
                    (float(sample.labels["le"]), sample.value))
    out: dict = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "dapo_requests_total" and sample.labels.get("endpoint") == "/detect":
                out.setdefault("server_status_counts", {})[sample.labels["status"]] = int(sample.value)
            elif sample.name in ("dapo_images_processed_total", "dapo_images_delivered_total", "dapo_goodput_ratio"):
                out[sample.name] = sample.value
            elif sample.name == "dapo_images_dropped_total":
                out.setdefault("dapo_images_dropped_total", {})[sample.labels["cause"]] = int(sample.value)
            elif sample.name in ("dapo_queue_wait_seconds_sum", "dapo_queue_wait_seconds_count"):
                out[sample.name] = sample.value
    for status, rows in buckets.items():
        rows.sort()
        total = rows[-1][1]
        if not total:
            continue

        def q(p: float) -> float | None:
            for le, count in rows:
                if count >= p * total:
                    return None if le == float("inf") else round(le * 1000, 1)
            return None
        out.setdefault("duration_histogram", {})[status] = {"count": int(total), "p50_le_ms": q(0.5),
                                                            "p99_le_ms": q(0.99)}
    return out


class RssSampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MB)
        self._stop_event = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self._stop_event.is_set():
            value = rss_mb(self.pid)
            if value is not None:
                self.samples.append((round(time.monotonic() - self.t0, 1), round(value, 1)))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


async def drive(url: str, duration: float, max_requests: int, concurrency: int, timeout: float,
                deadline_ms: int | None = None, polite: bool = False,
                uploads: list[tuple[str, bytes]] | None = None) -> dict:
    """Closed loop: `concurrency` clients post back-to-back until the time or the count runs out.
    With `polite`, a 503 is followed by a wait of Retry-After and a retry of the same part."""
    import uuid

    uploads = uploads or images()
    retry_pairs: list[tuple[float, float]] = []  # (Retry-After given, seconds until a retry was accepted)
    unresolved_refusals = 0
    unresolved_at_end: list[int] = []
    counts: dict[str, int] = {}
    accepted: list[float] = []
    refused: list[float] = []
    missing_retry_after = 0
    stage_ms: dict[str, list[float]] = {}
    errors: dict[str, int] = {}
    error_samples: list[dict] = []
    started = time.monotonic()
    issued = 0
    deadline = time.monotonic() + duration
    # keepalive_expiry below uvicorn's 5 s keep-alive timeout: the client drops idle connections first
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=2.0)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        async def worker(k: int) -> None:
            nonlocal issued, missing_retry_after
            nonlocal unresolved_refusals
            i = k
            part_key, refusals = uuid.uuid4().hex, []  # this part's 503s: (Retry-After, when)
            while time.monotonic() < deadline and issued < max_requests:
                issued += 1
                name, data = uploads[i % len(uploads)]
                if not refusals:
                    i += 1
                headers = {}
                if deadline_ms:
                    headers["X-Deadline-Ms"] = str(deadline_ms)
                if polite:
                    headers["Idempotency-Key"] = part_key
                t0 = time.perf_counter()
                try:
                    r = await client.post("/detect", files=[("image", (name, data, "application/octet-stream"))],
                                          data={"part_id": f"load-{k}-{i}"}, headers=headers)
                except httpx.TimeoutException:
                    counts["client_timeout"] = counts.get("client_timeout", 0) + 1
                    unresolved_refusals += len(refusals)
                    part_key, refusals = uuid.uuid4().hex, []  # the line moved on: next part
                    continue
                except httpx.HTTPError as e:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                    if len(error_samples) < 5:
                        error_samples.append({"error": repr(e)[:200], "after_ms": round((time.perf_counter() - t0) * 1000, 1),
                                              "at_s": round(time.monotonic() - started, 2)})
                    counts["transport_error"] = counts.get("transport_error", 0) + 1
                    await asyncio.sleep(0.05)
                    continue
                seconds = time.perf_counter() - t0
                counts[str(r.status_code)] = counts.get(str(r.status_code), 0) + 1
                if r.status_code == 200:
                    accepted.append(seconds)
                    for key, ms in r.json()["results"][0].get("timing_ms", {}).items():
                        stage_ms.setdefault(key, []).append(ms)
                    retry_pairs.extend((after, t0 - when) for after, when in refusals)
                    part_key, refusals = uuid.uuid4().hex, []
                elif r.status_code == 503:
                    refused.append(seconds)
                    if "retry-after" not in r.headers:
                        missing_retry_after += 1
                    if polite and "retry-after" in r.headers:
                        after = float(r.headers["retry-after"])
                        refusals.append((after, time.perf_counter()))
                        await asyncio.sleep(after)
                    else:
                        await asyncio.sleep(0.002)  # impolite: we want pressure
                else:  # 504: the deadline passed; the line moves on to the next part
                    unresolved_refusals += len(refusals)
                    part_key, refusals = uuid.uuid4().hex, []
            unresolved_at_end.append(len(refusals))  # still refused when the run ended

        started = time.monotonic()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.monotonic() - started
    ratios = [waited / after for after, waited in retry_pairs if after > 0]
    return {
        "retry_after_check": {
            "refusals_with_accepted_retry": len(ratios), "refusals_never_accepted": unresolved_refusals,
            "refusals_pending_at_end": sum(unresolved_at_end),
            "within_2x": sum(1 for q in ratios if 0.5 <= q <= 2.0),
            "fraction_within_2x": round(sum(1 for q in ratios if 0.5 <= q <= 2.0) / len(ratios), 4) if ratios else None,
            "ratio_accepted_after_over_retry_after": {
                q: round(float(np.percentile(ratios, q)), 3) for q in (1, 50, 99)} if ratios else None,
            "retry_after_s": {q: float(np.percentile([a for a, _ in retry_pairs], q)) for q in (1, 50, 99)}
            if retry_pairs else None,
        } if polite else None,
        "requests": sum(counts.values()), "elapsed_s": round(elapsed, 2), "status_counts": dict(sorted(counts.items())),
        "transport_errors": errors, "transport_error_samples": error_samples, "missing_retry_after": missing_retry_after,
        "accepted_per_s": round(len(accepted) / elapsed, 1) if elapsed else None,
        "latency_ms_accepted": {"p50": percentile(accepted, 50), "p95": percentile(accepted, 95),
                                "p99": percentile(accepted, 99),
                                "max": round(max(accepted) * 1000, 2) if accepted else None},
        "latency_ms_refused": {"p50": percentile(refused, 50), "p99": percentile(refused, 99)},
        "server_stage_ms_accepted": {k: {"p50": round(float(np.percentile(v, 50)), 2),
                                         "p99": round(float(np.percentile(v, 99)), 2)} for k, v in stage_ms.items()},
    }


def run_load(artifact: Path | None = None, duration: float = 60.0, max_requests: int = 1_000_000,
             concurrency: int = 64, queue_size: int = 8, max_batch_size: int = 4, queue_delay_ms: float = 5.0,
             warmup_s: float = 10.0, rss_growth_mb: float = 50.0, request_timeout: float = 30.0,
             workdir: Path | None = None, max_inflight: int = 16, deadline_ms: int | None = None,
             polite: bool = False, image_mp: float | None = None,
             server_env: dict[str, str] | None = None) -> dict:
    """Run one load test and return the report (with `ok` and `failures`)."""
    tmp = tempfile.TemporaryDirectory(prefix="dapo-load-") if workdir is None else None
    work = Path(tmp.name) if tmp else Path(workdir)
    try:
        if artifact is None:
            from training.bake import bake_demo

            artifact = bake_demo(work / "demo").folder
        env = {"DAPO_MAX_QUEUE_SIZE": str(queue_size), "DAPO_MAX_FILES": str(min(queue_size, 16)),
               "DAPO_MAX_BATCH_SIZE": str(max_batch_size), "DAPO_MAX_QUEUE_DELAY_MS": str(queue_delay_ms),
               "DAPO_LOG_LEVEL": "WARNING", "DAPO_WARMUP": "true", "DAPO_API_KEYS": "",
               "DAPO_MAX_INFLIGHT_REQUESTS": str(max_inflight), **(server_env or {})}
        uploads = camera_images(image_mp) if image_mp else None
        server = Server(Path(artifact), env, log_path=work / "server.log")
        failures: list[str] = []
        try:
            server.wait_ready()
            pid = server.proc.pid
            rss_start = rss_mb(pid)
            sampler = RssSampler(pid)
            sampler.start()
            load = asyncio.run(drive(server.url, duration, max_requests, concurrency, request_timeout,
                                     deadline_ms, polite, uploads))
            time.sleep(1.0)  # let the last batches and buffers settle before the final sample
            sampler.stop()
            rss_end = rss_mb(pid)
            alive = server.proc.poll() is None
            ready_after = False
            server_side = {}
            if alive:
                try:
                    ready_after = httpx.get(server.url + "/readyz", timeout=5).status_code == 200
                    server_side = server_latency(httpx.get(server.url + "/metrics", timeout=5).text)
                except httpx.HTTPError:
                    ready_after = False
        finally:
            exit_code = server.stop(60)
        samples = sampler.samples if "sampler" in locals() else []
        after_warmup = [mb for t, mb in samples if t >= warmup_s]
        rss_warm = after_warmup[0] if after_warmup else (samples[-1][1] if samples else None)
        growth = round(rss_end - rss_warm, 1) if rss_end is not None and rss_warm is not None else None
        step = max(1, len(samples) // 60)
        report = {
            "config": {"duration_s": duration, "max_requests": max_requests, "concurrency": concurrency,
                       "max_queue_size": queue_size, "max_batch_size": max_batch_size,
                       "max_queue_delay_ms": queue_delay_ms, "max_inflight_requests": max_inflight,
                       "warmup_s": warmup_s, "rss_growth_bound_mb": rss_growth_mb, "deadline_ms": deadline_ms,
                       "client_timeout_s": request_timeout, "polite": polite, "image_mp": image_mp,
                       "server_env": server_env or {}},
            **load,
            "server_side": server_side,
            "rss_mb": {"start": round(rss_start, 1) if rss_start else None, "after_warmup": rss_warm,
                       "peak": max((mb for _, mb in samples), default=None),
                       "end": round(rss_end, 1) if rss_end else None, "growth_after_warmup": growth,
                       "timeline": samples[::step]},
            "server_alive_after_load": alive, "ready_after_load": ready_after, "exit_code_on_sigterm": exit_code,
        }
        counts = load["status_counts"]
        if deadline_ms:
            encoded = server_side.get("dapo_images_processed_total") or 0
            received = counts.get("200", 0)  # one image per request
            report["deadline"] = {
                "goodput": round(received / encoded, 4) if encoded else None,
                "server_goodput_ratio": server_side.get("dapo_goodput_ratio"),
                "images_encoded": encoded, "answers_received_in_time": received,
                "p99_ms_of_200": load["latency_ms_accepted"]["p99"],
                "p99_of_200_below_deadline": (load["latency_ms_accepted"]["p99"] or 0) < deadline_ms,
                "dropped_by_cause": server_side.get("dapo_images_dropped_total", {}),
                "mean_queue_wait_ms": round(1000 * server_side["dapo_queue_wait_seconds_sum"]
                                            / server_side["dapo_queue_wait_seconds_count"], 1)
                if server_side.get("dapo_queue_wait_seconds_count") else None,
            }
        allowed = ("200", "503", "504", "client_timeout") if deadline_ms else ("200", "503")
        other = {s: n for s, n in counts.items() if s not in (*allowed, "transport_error")}
        if other:
            failures.append(f"statuses other than 200/503: {other}")
        # Reconcile with what the app itself answered: a transport error is harmless only if the
        # request never reached the app (an idle keep-alive connection the server closed while a
        # starved client was about to reuse it); an answered request the client never got is a drop.
        served = dict(server_side.get("server_status_counts", {}))
        if deadline_ms:  # a client that timed out never reads its answer (499 if it left before the batch)
            served.pop("499", None)
        client_done = sum(counts.get(k, 0) for k in ("200", "503", "504"))
        report_served = {"app_answered": sum(served.values()), "client_received": client_done,
                         "transport_errors_never_reached_app": None}
        if served:
            if set(served) - set(allowed):
                failures.append(f"the app answered statuses other than {allowed}: {served}")
            dropped = sum(served.values()) - client_done - counts.get("client_timeout", 0)
            report_served["transport_errors_never_reached_app"] = (
                counts.get("transport_error", 0) if dropped == 0 else None)
            if dropped > 0 or (dropped != 0 and not deadline_ms):
                failures.append(f"{dropped} requests answered by the app never reached the client")
        elif counts.get("transport_error"):
            failures.append(f"{counts['transport_error']} transport errors and no server counts to reconcile")
        report["reconciliation"] = report_served
        if load["missing_retry_after"]:
            failures.append(f"{load['missing_retry_after']} responses 503 without Retry-After")
        if not load["status_counts"].get("200"):
            failures.append("no request was accepted")
        if not alive or not ready_after:
            failures.append("server not alive and ready after the load")
        if exit_code not in (0, -signal.SIGTERM):  # uvicorn re-raises SIGTERM after a graceful stop
            failures.append(f"server exit code on SIGTERM: {exit_code}")
        if growth is not None and growth > rss_growth_mb and duration > warmup_s:
            failures.append(f"RSS grew {growth} MB after warm-up (bound {rss_growth_mb} MB)")
        report["saturated"] = bool(load["status_counts"].get("503"))
        report["failures"] = failures
        report["ok"] = not failures
        if failures:
            report["server_log_tail"] = (work / "server.log").read_text(errors="replace")[-3000:]
        return report
    finally:
        if tmp is not None:
            tmp.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, help="artifact folder (default: bake the demo into a temp dir)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (300 for the soak)")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many requests")
    p.add_argument("--concurrency", type=int, default=64, help="concurrent clients (closed loop)")
    p.add_argument("--queue-size", type=int, default=8, help="server DAPO_MAX_QUEUE_SIZE (small: saturate)")
    p.add_argument("--max-batch-size", type=int, default=4)
    p.add_argument("--queue-delay-ms", type=float, default=5.0)
    p.add_argument("--max-inflight", type=int, default=16, help="server DAPO_MAX_INFLIGHT_REQUESTS (admission)")
    p.add_argument("--warmup-s", type=float, default=10.0, help="RSS baseline is taken after this many seconds")
    p.add_argument("--rss-growth-mb", type=float, default=50.0, help="fail if RSS grows more after warm-up")
    p.add_argument("--deadline-ms", type=int, help="X-Deadline-Ms on every request (deadline mode)")
    p.add_argument("--client-timeout", type=float, default=30.0, help="seconds a client waits for an answer")
    p.add_argument("--polite", action="store_true", help="on 503 wait Retry-After, retry the same part (same key)")
    p.add_argument("--image-mp", type=float, help="upload camera JPEGs of this many megapixels")
    p.add_argument("--server-env", action="append", default=[], metavar="DAPO_KEY=VALUE", help="extra server setting")
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.duration > 3600 or args.max_requests <= 0:
        p.error("--duration must be in (0, 3600] and --max-requests positive")
    report = run_load(args.artifact, args.duration, args.max_requests, args.concurrency, args.queue_size,
                      args.max_batch_size, args.queue_delay_ms, args.warmup_s, args.rss_growth_mb,
                      request_timeout=args.client_timeout, max_inflight=args.max_inflight,
                      deadline_ms=args.deadline_ms, polite=args.polite, image_mp=args.image_mp,
                      server_env=dict(item.split("=", 1) for item in args.server_env))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
