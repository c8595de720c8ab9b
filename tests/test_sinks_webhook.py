"""The webhook result sink against a real local HTTP endpoint that fails the first attempts.

Shown here: retries with backoff until the endpoint accepts, each result accepted once, every
attempt byte-identical and correctly signed (HMAC-SHA256 recomputed here with the secret);
a 4xx refusal is not retried; the rate limit spaces deliveries; with the endpoint gone the
queue keeps the newest results, counts the dropped ones, and delivers the rest when it is back.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient

from loop_util import detect, metric, png, wait_until, without_images

pytest.importorskip("urllib3", reason="urllib3 not installed (pip install 'dapo-inspect[sinks]')")

from service.server.answers import Answer, ResultMessage  # noqa: E402
from service.server.app import create_app  # noqa: E402
from service.server.metrics import Metrics  # noqa: E402
from service.server.settings import Settings  # noqa: E402
from service.server.line.sinks.outbox import Outbox, OutboxOptions  # noqa: E402
from service.server.line.sinks.webhook import WebhookOptions, WebhookTransport  # noqa: E402

SECRET = b"line-7-webhook-secret"
FAILURES = 2  # the endpoint answers 503 to the first FAILURES attempts of each result
RATE = 20.0


@dataclass
class Attempt:
    key: str
    headers: dict[str, str]
    body: bytes
    status: int
    at: float


@dataclass
class Endpoint:
    """A real HTTP server on 127.0.0.1: 503 for the first `failures` attempts of a result, then
    200; 400 for results whose part_id is "reject"."""

    failures: int = FAILURES
    port: int = 0
    attempts: list[Attempt] = field(default_factory=list)
    _seen: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                key = self.headers.get("X-Dapo-Delivery", "")
                endpoint._seen[key] += 1
                doc = json.loads(body)
                if doc["result"].get("part_id") == "reject":
                    status = 400
                elif endpoint._seen[key] <= endpoint.failures:
                    status = 503
                else:
                    status = 200
                endpoint.attempts.append(Attempt(key, dict(self.headers), body, status, time.monotonic()))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def accepted(self) -> list[Attempt]:
        return [a for a in self.attempts if a.status == 200]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def endpoint():
    e = Endpoint()
    yield e
    e.close()


@pytest.fixture(scope="module")
def app(demo_artifact, endpoint):
    settings = Settings(artifact=demo_artifact, webhook_url=endpoint.url, webhook_secret=SECRET.decode(),
                        webhook_rate_per_s=RATE, sink_backoff_initial_s=0.02, sink_backoff_max_s=0.1)
    with TestClient(create_app(settings, configure_logs=False)) as client:
        yield client


def test_retried_until_accepted_once_each_and_signed(app, endpoint):
    retries = metric(app, "dapo_sink_retries_total", sink="webhook")
    delivered = metric(app, "dapo_sink_delivered_total", sink="webhook")
    a = detect(app, [png(1), png(2)], product="disc", part_id="p-1")
    b = detect(app, [png(3)], station_id="st-4")
    expected = {f"{body['answer_id']}:{i}": (body, r) for body in (a, b) for i, r in enumerate(body["results"])}
    wait_until(lambda: {x.key for x in endpoint.accepted()} >= set(expected))
    # nothing more can come once the outbox counts them delivered (it retries only what is not):
    # that condition, not a fixed sleep
    wait_until(lambda: metric(app, "dapo_sink_delivered_total", sink="webhook") >= delivered + len(expected))

    mine = [x for x in endpoint.attempts if x.key in expected]
    per_key = defaultdict(list)
    for attempt in mine:
        per_key[attempt.key].append(attempt)
    for key, attempts in per_key.items():
        assert [x.status for x in attempts] == [503] * FAILURES + [200]  # retried, then accepted once
        assert len({x.body for x in attempts}) == 1  # every retry is the same bytes
        for x in attempts:
            want = "sha256=" + hmac.new(SECRET, x.body, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(x.headers["X-Dapo-Signature-256"], want)
            assert x.headers["Idempotency-Key"] == key and x.headers["Content-Type"] == "application/json"
        doc = json.loads(attempts[0].body)
        body, result = expected[key]
        assert doc["id"] == key and doc["model"] == body["model"]
        assert doc["result"] == without_images(result)
    assert set(per_key) == set(expected)
    assert metric(app, "dapo_sink_retries_total", sink="webhook") - retries == FAILURES * len(expected)
    assert metric(app, "dapo_sink_delivered_total", sink="webhook") - delivered == len(expected)


def test_a_refused_result_is_not_retried(app, endpoint):
    before = metric(app, "dapo_sink_rejected_total", sink="webhook")
    refused = detect(app, [png(4)], part_id="reject")
    after = detect(app, [png(5)], part_id="fine")
    keys = (f"{refused['answer_id']}:0", f"{after['answer_id']}:0")
    wait_until(lambda: any(x.key == keys[1] and x.status == 200 for x in endpoint.attempts))
    assert [x.status for x in endpoint.attempts if x.key == keys[0]] == [400]
    assert metric(app, "dapo_sink_rejected_total", sink="webhook") == before + 1


def test_rate_limit_spaces_deliveries(app, endpoint):
    body = detect(app, [png(10 + i) for i in range(6)], part_id="burst")
    keys = {f"{body['answer_id']}:{i}" for i in range(6)}
    wait_until(lambda: {x.key for x in endpoint.accepted()} >= keys)
    times = sorted(x.at for x in endpoint.attempts if x.key in keys)
    # 6 results x (FAILURES + 1) attempts, each attempt takes a token: at least (n - 1) / RATE seconds
    assert len(times) == 6 * (FAILURES + 1)
    assert times[-1] - times[0] >= (len(times) - 1) / RATE * 0.9


def test_endpoint_down_keeps_the_newest_and_counts_the_dropped():
    """No app needed: the outbox and the webhook transport, an endpoint that is not there yet."""
    probe = Endpoint(failures=0)
    port = probe.port
    probe.close()  # the port is free again: connection refused until the endpoint comes back
    metrics = Metrics()
    transport = WebhookTransport(WebhookOptions(f"http://127.0.0.1:{port}/hook", SECRET, timeout_s=2.0))
    outbox = Outbox(transport, OutboxOptions(queue_size=3, rate_per_s=1000.0, backoff_initial_s=0.05,
                                             backoff_max_s=0.05, drain_s=0.5), metrics.loop)
    outbox.start()
    answers = [Answer(f"r{i}", {"name": "m", "version": "1", "backbone": "b"}, (("a.png", b""),),
                      ({"anomaly_score": 0.1, "is_anomalous": False, "threshold": 0.5},), {},
                      answer_id=f"r{i}") for i in range(10)]
    t0 = time.perf_counter()
    for a in answers:
        outbox.offer(ResultMessage(a, 0))
    offer_s = time.perf_counter() - t0

    def value(name: str) -> float:
        return metrics.registry.get_sample_value(name, {"sink": "webhook"}) or 0.0

    wait_until(lambda: value("dapo_sink_retries_total") >= 2)
    wait_until(lambda: outbox.depth == 3)
    back = Endpoint(failures=0, port=port)
    try:
        wait_until(lambda: len(back.accepted()) == 3)
        wait_until(lambda: value("dapo_sink_delivered_total") == 3)  # the outbox has seen the 200s
        outbox.stop()
    finally:
        back.close()
    assert [x.key for x in back.accepted()] == ["r7:0", "r8:0", "r9:0"]  # the newest, in order, once
    assert value("dapo_sink_dropped_total") == 7 == len(answers) - len(back.accepted())
    assert value("dapo_sink_delivered_total") == 3
    assert offer_s < 0.05  # offering never waits on the endpoint
