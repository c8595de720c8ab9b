"""What closing the loop costs /detect: the /detect / encoder ratio with two sinks and a sample
policy on, against all of it off (target: on / off <= 1.02).

`dapo bench --mode e2e` (service.bench.bench_e2e: a real server process, single-image requests,
each interleaved with the bare encoder on the same image) is run alternately with and without
the loop's settings, `--repeats` times each, so machine drift hits both alike. "On" is: an MQTT
sink to a local mosquitto, a webhook sink to a local HTTP receiver (a separate process, 200 to
everything), a sample policy, and feedback (the recent-answers ring). Receivers count what they
got, so the figures also say whether everything was delivered.

    python bench/loop_overhead.py --artifact /tmp/vitb16 [--repeats 3] [--images 16] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from service.bench import bench_e2e
from service.server.local_server import free_port

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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifact", required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--format", default="JPEG")
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
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    try:
        for _ in range(args.repeats):
            for name, env in (("off", {}), ("on", on)):
                runs[name].append(bench_e2e(Path(args.artifact), args.images, rounds=args.rounds, fmt=args.format,
                                            server_env=env))
        time.sleep(1.0)
        import httpx

        webhook_got = int(httpx.get(f"http://127.0.0.1:{hook_port}/").text)
    finally:
        counter.close()
        receiver.terminate()
        broker.terminate()
    ratio = {k: statistics.median(r["ratio_detect_over_encoder"] for r in v) for k, v in runs.items()}
    pairs = {k: statistics.median(r["ratio_median_of_pairs"] for r in v) for k, v in runs.items()}
    sent = sum(r["requests"] + 2 for r in runs["on"])  # + the 2 warm-up requests per run
    print(json.dumps({
        "artifact": args.artifact, "upload": runs["off"][0]["upload"], "repeats": args.repeats,
        "requests_per_run": runs["off"][0]["requests"],
        "encoder_ms_per_image": {k: [r["encoder_ms_per_image"] for r in v] for k, v in runs.items()},
        "detect_ms_per_image": {k: [r["detect_ms_per_image"] for r in v] for k, v in runs.items()},
        "ratio_detect_over_encoder": {k: [r["ratio_detect_over_encoder"] for r in v] for k, v in runs.items()},
        "median_ratio": ratio, "on_over_off": round(ratio["on"] / ratio["off"], 4),
        "median_of_pairs": pairs, "on_over_off_pairs": round(pairs["on"] / pairs["off"], 4),
        "delivered": {"sent": sent, "mqtt": counter.count, "webhook": webhook_got},
        "samples_written": sum(1 for _ in (work / "samples").rglob("*.json")),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
