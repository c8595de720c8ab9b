"""What closing the loop costs /detect: the /detect / encoder ratio with two sinks and a sample
policy on, against all of it off (target: on / off <= 1.02).

Two real server processes (`dapo serve`), one with the loop off, one with it on, take
single-image requests in alternating blocks, each request paired with a bare ONNX encoder run on
the same image (as `dapo bench --mode e2e` does), so drift on a shared machine hits both alike.
"On" is: an MQTT sink to a local mosquitto, a webhook sink to a local HTTP receiver (a separate
process answering 200), a sample policy, and feedback (the recent-answers ring). Also printed:
the server process's CPU time per request (all threads, the sinks' included) on vs off, the
cost of the route's one `after_detect` call, and what the receivers got (all delivered?).

    python bench/loop_overhead.py --artifact DIR [--blocks 20] [--block 8]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from service.bench import test_images
from service.runtime.detector import Upload
from service.server.local_server import Server, free_port

POLICY = {"*": [{"kind": "near_threshold", "band": 0.05}, {"kind": "every_nth", "n": 10}]}
RECEIVER = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
count = 0
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        global count
        self.rfile.read(int(self.headers["Content-Length"])); count += 1
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def do_GET(self):
        body = str(count).encode(); self.send_response(200)
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def start_broker(folder: Path) -> tuple[subprocess.Popen, int]:
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = folder / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    proc = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, port


class MqttCounter:
    """Counts result messages on the broker (paho subscriber)."""

    def __init__(self, port: int):
        import paho.mqtt.client as mqtt

        self.count, self._lock = 0, threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_connect = lambda c, *a: c.subscribe("dapo/+/+/result", qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, *args) -> None:
        with self._lock:
            self.count += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def cpu_s(pid: int) -> float:
    """utime + stime of a process, seconds (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu_per_request(artifact: Path, env: dict[str, str], n: int, fmt: str) -> float:
    """CPU milliseconds the server process spends per sequential single-image /detect, all
    threads included (the sinks' and the sample writer's too). Less sensitive than wall time
    to other load on a shared machine."""
    import httpx

    images = test_images(8, 640, 480, fmt=fmt)
    mime = f"image/{fmt.lower()}"
    with Server(artifact, env) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        for data in images[:2]:
            client.post("/detect", files={"image": ("warm", data, mime)}).raise_for_status()
        time.sleep(0.5)
        start = cpu_s(server.pid)
        for i in range(n):
            client.post("/detect", files={"image": ("part", images[i % len(images)], mime)}).raise_for_status()
        time.sleep(1.0)  # let the sinks and the writer finish their share
        return round(1000 * (cpu_s(server.pid) - start) / n, 3)


def one_answer() -> tuple[list, list[dict]]:
    """A real 640x480 JPEG upload and a plausible result (what the hook gets from /detect)."""
    uploads = [Upload("p.jpg", test_images(1, 640, 480, fmt="JPEG")[0])]
    results = [{"anomaly_score": 0.31, "is_anomalous": False, "threshold": 0.5, "defect_types": [], "regions": [],
                "width": 640, "height": 480, "timing_ms": {"decode": 1.0}, "product": "x"}]
    return uploads, results


def loop_of(env: dict[str, str]):
    from service.server.line.loop import LineLoop
    from service.server.metrics import Metrics
    from service.server.settings import Settings

    loop = LineLoop(Settings(**{k[len("DAPO_"):].lower(): v for k, v in env.items()}), Metrics().loop)
    loop.start()
    return loop


def hook_us(env: dict[str, str], calls: int = 2000) -> float:
    """CPU microseconds one `after_detect` costs the event loop's thread, everything configured
    (thread CPU time: on a shared machine wall time would mostly measure waiting for a core)."""
    loop = loop_of(env)
    uploads, results = one_answer()
    t = time.thread_time()
    for i in range(calls):
        loop.after_detect(f"r{i}", {"name": "m", "version": "1", "backbone": "b"}, uploads, results, {"product": "x"})
    elapsed = time.thread_time() - t
    loop.stop()
    return round(1e6 * elapsed / calls, 2)


def background_cpu_ms(env: dict[str, str], delivered, n: int = 300) -> float:
    """CPU milliseconds (this process, all threads) per answer for everything the loop does after
    it: JSON, MQTT publish + PUBACK, signed webhook POST, sample policy (writes included).
    `delivered()` counts what the receivers got; CPU time is far less disturbed by other load
    on the machine than wall time."""
    loop = loop_of(env)
    uploads, results = one_answer()
    start_count = delivered()
    t = time.process_time()
    for i in range(n):
        loop.after_detect(f"cpu{i}", {"name": "m", "version": "1", "backbone": "b"}, uploads, results,
                          {"product": "x"})
        time.sleep(0.002)  # a line's pace, not a burst: nothing is dropped
    while delivered() - start_count < 2 * n:
        time.sleep(0.01)
    used = time.process_time() - t
    loop.stop()
    return round(1000 * used / n, 3)


def interleaved(artifact: Path, on: dict[str, str], blocks: int, block: int, fmt: str) -> dict:
    """Both servers up at once; blocks of `block` single-image requests alternate between them
    (off, on, on, off, ...), each request paired with a bare-encoder run on the same image, so
    machine drift hits both configurations alike. Ratios: /detect over encoder time."""
    import httpx


    images, mime, pixels, allowed, encoder = encoder_and_images(artifact, fmt)
    with Server(artifact, {}) as off_server, Server(artifact, on) as on_server:
        clients = {"off": httpx.Client(base_url=off_server.url, timeout=120),
                   "on": httpx.Client(base_url=on_server.url, timeout=120)}
        for client in clients.values():
            for data in images[:2]:
                client.post("/detect", files={"image": ("warm", data, mime)}).raise_for_status()
        times, per_block = run_blocks(clients, ("off", "on"), encoder, pixels, allowed, images, mime, blocks, block)
        for client in clients.values():
            client.close()
    return summarise(times, per_block, "off", "on")


def encoder_and_images(artifact: Path, fmt: str) -> tuple:
    """16 test images (bytes, mime), their encoder inputs, an all-allowed mask and a warmed bare
    ONNX Runtime encoder: what the interleaved blocks pair each /detect with."""
    import numpy as np
    from PIL import Image

    from service.runtime.artifact import load_manifest
    from service.runtime.backends import create_backend
    from service.runtime.imaging import preprocess

    manifest = load_manifest(artifact)
    images = test_images(16, 640, 480, fmt=fmt)
    mime = f"image/{fmt.lower()}"
    pixels = [preprocess(Image.open(io.BytesIO(b)).convert("RGB"), manifest.image_size, manifest.mean,
                         manifest.std)[None] for b in images]
    allowed = np.ones((1, len(manifest.vocabulary)), bool)
    encoder = create_backend(artifact, manifest, backend="onnxruntime")
    encoder.run(pixels[0], allowed)
    return images, mime, pixels, allowed, encoder


def run_blocks(clients: dict, names: tuple[str, str], encoder, pixels: list, allowed, images: list[bytes],
               mime: str, blocks: int, block: int) -> tuple[dict, dict]:
    """Blocks of `block` single-image requests alternating between the two servers (a, b, b, a,
    ...), each paired with a bare-encoder run on the same image: machine drift hits both alike.
    Returns per-name encoder and /detect times, and each block's /detect-over-encoder ratio."""
    times: dict[str, dict[str, list[float]]] = {k: {"enc": [], "det": []} for k in names}
    per_block: dict[str, list[float]] = {k: [] for k in names}
    k = 0
    for b in range(blocks):
        for name in (names if b % 2 == 0 else names[::-1]):
            enc_t, det_t = [], []
            for _ in range(block):
                i = k % len(images)
                k += 1
                t = time.perf_counter()
                encoder.run(pixels[i], allowed)
                enc_t.append(time.perf_counter() - t)
                t = time.perf_counter()
                clients[name].post("/detect", files={"image": ("part", images[i], mime)}).raise_for_status()
                det_t.append(time.perf_counter() - t)
            times[name]["enc"] += enc_t
            times[name]["det"] += det_t
            per_block[name].append(sum(det_t) / sum(enc_t))
    return times, per_block


def summarise(times: dict, per_block: dict, a: str, b: str) -> dict:
    """/detect over encoder per configuration, and b's ratio over a's (whole run and median block)."""
    ratio = {k: sum(v["det"]) / sum(v["enc"]) for k, v in times.items()}
    median = {k: statistics.median(v) for k, v in per_block.items()}
    return {"requests_per_config": len(times[b]["det"]),
            "encoder_ms_per_image": {k: round(1000 * statistics.mean(v["enc"]), 2) for k, v in times.items()},
            "detect_ms_per_image": {k: round(1000 * statistics.mean(v["det"]), 2) for k, v in times.items()},
            "ratio_detect_over_encoder": {k: round(v, 3) for k, v in ratio.items()},
            f"{b}_over_{a}": round(ratio[b] / ratio[a], 4),
            "median_block_ratio": {k: round(v, 3) for k, v in median.items()},
            f"{b}_over_{a}_median_block": round(median[b] / median[a], 4)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifact", required=True)
    p.add_argument("--blocks", type=int, default=20)
    p.add_argument("--block", type=int, default=8, help="requests per block")
    p.add_argument("--format", default="JPEG")
    p.add_argument("--cpu-requests", type=int, default=60, help="requests per server for the CPU-time figure")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dapo-loop-bench-"))
    broker, mqtt_port = start_broker(work)
    hook_port = free_port()
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(hook_port)])
    time.sleep(0.5)
    counter = MqttCounter(mqtt_port)
    on = {"DAPO_MQTT_URL": f"mqtt://127.0.0.1:{mqtt_port}", "DAPO_MQTT_RATE_PER_S": "1000",
          "DAPO_WEBHOOK_URL": f"http://127.0.0.1:{hook_port}/hook", "DAPO_WEBHOOK_SECRET": "bench-secret",
          "DAPO_WEBHOOK_RATE_PER_S": "1000", "DAPO_SAMPLES_DIR": str(work / "samples"),
          "DAPO_SAMPLES_POLICY": json.dumps(POLICY), "DAPO_FEEDBACK_DB": str(work / "feedback.sqlite3")}
    artifact = Path(args.artifact)
    try:
        e2e = interleaved(artifact, on, args.blocks, args.block, args.format)
        cpu = {"off": [], "on": []}
        for _ in range(2):
            for name, env in (("off", {}), ("on", on)):
                cpu[name].append(server_cpu_per_request(artifact, env, args.cpu_requests, args.format))
        closed = free_port()  # the hook only queues: receivers that are not there cost it the same
        hook = hook_us({**on, "DAPO_MQTT_URL": f"mqtt://127.0.0.1:{closed}",
                        "DAPO_WEBHOOK_URL": f"http://127.0.0.1:{closed}/hook",
                        "DAPO_SAMPLES_DIR": str(work / "hook-samples"), "DAPO_FEEDBACK_DB": str(work / "hook.sqlite3")})
        import httpx

        def got() -> int:
            return counter.count + int(httpx.get(f"http://127.0.0.1:{hook_port}/").text)

        background = background_cpu_ms({**on, "DAPO_SAMPLES_DIR": str(work / "cpu-samples")}, got)
        time.sleep(1.0)
        webhook_got = int(httpx.get(f"http://127.0.0.1:{hook_port}/").text)
    finally:
        counter.close()
        receiver.terminate()
        broker.terminate()
    sent = e2e["requests_per_config"] + 2 + sum(args.cpu_requests + 2 for _ in cpu["on"]) + 300
    print(json.dumps({
        "artifact": args.artifact, "upload": f"640x480 {args.format}", "policy": POLICY, **e2e,
        "server_cpu_ms_per_request": cpu,
        "cpu_on_over_off": round(statistics.mean(cpu["on"]) / statistics.mean(cpu["off"]), 4),
        "after_detect_us_per_call": hook,
        "background_cpu_ms_per_answer": background,
        "delivered": {"sent": sent, "mqtt": counter.count, "webhook": webhook_got},
        "samples_written": sum(1 for _ in (work / "samples").rglob("*.json")),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
