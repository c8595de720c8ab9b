"""The MQTT result sink against a real broker: Debian's mosquitto on a loopback port.

Shown here: each /detect result arrives once, on the topic its echo fields name, with the API's
own result (minus masks) as payload; /detect does not slow down while the broker is stopped;
delivery resumes when it is back, the newest results survive and the drop-oldest counter
equals what was lost; presence is a retained "online" and an "offline" last will; TLS and
credentials work (and wrong credentials are an outage, not a crash).
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from broker_util import MOSQUITTO, SKIP_REASON, Mosquitto, Subscriber
from loop_util import detect, metric, png, timed_detect, wait_until, without_images

if MOSQUITTO is None:
    pytest.skip(SKIP_REASON, allow_module_level=True)
pytest.importorskip("paho.mqtt.client", reason="paho-mqtt not installed (pip install 'dapo-inspect[sinks]')")

from service.server.answers import Answer, ResultMessage  # noqa: E402
from service.server.app import create_app  # noqa: E402
from service.server.metrics import Metrics  # noqa: E402
from service.server.settings import Settings  # noqa: E402
from service.server.line.sinks.mqtt import MqttOptions, MqttTransport  # noqa: E402
from service.server.line.sinks.outbox import Outbox, OutboxOptions  # noqa: E402

QUEUE = 5
CLIENT_ID = "dapo-test-line"
STATUS = f"dapo/status/{CLIENT_ID}"


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    b = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def app(demo_artifact, broker):
    settings = Settings(artifact=demo_artifact, mqtt_url=broker.url, mqtt_client_id=CLIENT_ID,
                        mqtt_queue_size=QUEUE, mqtt_reconnect_max_s=1, sink_backoff_initial_s=0.05,
                        sink_backoff_max_s=0.2)
    with TestClient(create_app(settings, configure_logs=False)) as client:
        yield client


def mqtt_client_of(app):
    return app.app.state.service.loop.outboxes[0].transport.client


def barrier(app, sub) -> str:
    """Publish one more result and wait until it arrives; returns its id.

    The outbox sends in order over one connection (QoS 1, in order per client), so anything
    it sent before this marker (a duplicate, a late result) has arrived once the marker has:
    a condition to wait for, instead of a fixed sleep that a busy machine can outlast."""
    body = detect(app, [png(999)], product="disc", station_id="st-barrier")
    marker = f"{body['answer_id']}:0"  # the dedupe key names the answer (docs/fleet.md)
    sub.wait_for(lambda m: any(x.topic.endswith("/result") and x.json()["id"] == marker for x in m), timeout=20)
    return marker


def test_each_result_arrives_once_on_its_topic_with_the_api_result(app, broker):
    with Subscriber(broker.port, ["dapo/+/+/result"], client_id="sub-once") as sub:
        a = detect(app, [png(1), png(2)], product="disc", station_id="st-1", part_id="p-9")
        b = detect(app, [png(3)], station_id="line/2+#")  # no product; reserved characters in a level
        expected = {}
        for body, topic in ((a, "dapo/st-1/disc/result"), (b, "dapo/line_2__/_/result")):
            for i, result in enumerate(body["results"]):
                expected[f"{body['answer_id']}:{i}"] = (topic, body, i, result)
        sub.wait_for(lambda m: len(m) >= 3)
        marker = barrier(app, sub)  # a duplicate would have come before it
        got = [m for m in sub.results() if m.json()["id"] != marker]
    assert sorted(m.json()["id"] for m in got) == sorted(expected)  # each result once, nothing else
    for m in got:
        doc = m.json()
        topic, body, i, result = expected[doc["id"]]
        assert m.topic == topic
        assert doc["request_id"] == body["request_id"] and doc["index"] == i
        assert doc["model"] == body["model"]
        assert doc["result"] == without_images(result)  # the API's own result, masks left out
        assert "mask" in result and "mask" not in doc["result"]
    assert metric(app, "dapo_sink_delivered_total", sink="mqtt") >= 3

    # presence: a late subscriber gets the retained "online"
    with Subscriber(broker.port, [STATUS], client_id="sub-status") as sub:
        [status] = sub.wait_for(lambda m: len(m) >= 1)
    assert (status.payload, status.retain) == (b"online", True)


def test_broker_down_does_not_slow_detect_and_drops_only_the_oldest(app, broker):
    with Subscriber(broker.port, ["dapo/+/+/result"], client_id="sub-outage") as sub:
        up = [timed_detect(app, png(100 + i), product="disc", station_id="st-2") for i in range(8)]
        sub.wait_for(lambda m: len(m) >= 8)
        dropped_before = metric(app, "dapo_sink_dropped_total", sink="mqtt")

        broker.stop()
        wait_until(lambda: not mqtt_client_of(app).is_connected())
        down = [timed_detect(app, png(200 + i), product="disc", station_id="st-2") for i in range(12)]
        sent_down = [f"{body['answer_id']}:0" for _, body in down]
        dropped = metric(app, "dapo_sink_dropped_total", sink="mqtt") - dropped_before
        assert metric(app, "dapo_sink_up", sink="mqtt") == 0.0
        assert metric(app, "dapo_sink_queue_depth", sink="mqtt") == QUEUE

        broker.start()
        messages = sub.wait_for(lambda m: len(m) >= 8 + QUEUE, timeout=20)
        marker = barrier(app, sub)  # anything sent after the outage has come before it
        received_down = [m.json()["id"] for m in sub.results()[8:] if m.json()["id"] != marker]

    t_up, t_down = [t for t, _ in up], [t for t, _ in down]
    # /detect never waits on the sink: same latency with the broker gone (a blocked publish would
    # cost seconds); the precise figure is the bench's (bench/loop_overhead.py)
    assert statistics.median(t_down) <= 2 * statistics.median(t_up) + 0.05, (t_up, t_down)
    assert max(t_down) < 2.0, t_down
    # delivery resumed: the newest QUEUE results, once each; the rest were dropped, and counted
    assert len(messages) >= 8 + QUEUE
    assert received_down == sent_down[-QUEUE:]
    lost = set(sent_down) - set(received_down)
    assert dropped == len(lost) == len(sent_down) - QUEUE
    assert metric(app, "dapo_sink_up", sink="mqtt") == 1.0


def test_last_will_says_offline_when_the_process_dies(broker):
    client_id = "dapo-will-test"
    code = (
        "import os, time\n"
        "from service.server.settings import Settings\n"
        "from service.server.line.sinks.mqtt import MqttOptions, MqttTransport\n"
        f"t = MqttTransport(MqttOptions.from_settings(Settings(mqtt_url='{broker.url}', mqtt_client_id='{client_id}')))\n"
        "t.start()\n"
        "import sys\n"
        "sys.stdin.read()\n"  # until the test has seen "online" (it closes our stdin)
        "os._exit(0 if t.client.is_connected() else 3)\n")  # no DISCONNECT packet: the broker fires the will
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with Subscriber(broker.port, [f"dapo/status/{client_id}"], client_id="sub-will") as sub:
        child = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE)
        try:
            sub.wait_for(lambda m: len(m) >= 1, timeout=60)  # the retained "online", from the connect callback
        finally:
            child.stdin.close()
        assert child.wait(60) == 0
        messages = sub.wait_for(lambda m: len(m) >= 2)
    assert [m.payload for m in messages] == [b"online", b"offline"]
    with Subscriber(broker.port, [f"dapo/status/{client_id}"], client_id="sub-will-late") as late:
        [kept] = late.wait_for(lambda m: len(m) >= 1)
    assert (kept.payload, kept.retain) == (b"offline", True)


# --- TLS and credentials --------------------------------------------------------------------------
def make_certificates(folder: Path) -> dict[str, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 (openssl CLI)."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=dapo-test-ca")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "1", "-extfile", "san.ext")
    return {name: folder / f"{name}" for name in ("ca.crt", "server.crt", "server.key")}


@pytest.mark.skipif(not Path("/usr/bin/mosquitto_passwd").exists() or not Path("/usr/bin/openssl").exists(),
                    reason="needs mosquitto_passwd and openssl")
def test_tls_with_credentials_from_a_file(tmp_path):
    certs = make_certificates(tmp_path)
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(tmp_path / "passwd"), "line", "s3cret"], check=True)
    (tmp_path / "passwd").chmod(0o600)
    broker = Mosquitto(tmp_path / "broker", extra=[
        f"cafile {certs['ca.crt']}", f"certfile {certs['server.crt']}", f"keyfile {certs['server.key']}",
        "allow_anonymous false", f"password_file {tmp_path / 'passwd'}"]).start()
    (tmp_path / "good").write_text("s3cret\n")
    (tmp_path / "bad").write_text("wrong\n")
    answer = Answer("req-tls", {"name": "m", "version": "1", "backbone": "b"}, (("a.png", b""),),
                    ({"anomaly_score": 0.7, "is_anomalous": True, "threshold": 0.5, "mask": {"format": "rle"}},),
                    {"product": "disc", "station_id": "st-tls"})
    try:
        with Subscriber(broker.port, ["dapo/#"], client_id="sub-tls", username="line", password="s3cret",
                        tls_ca=str(certs["ca.crt"])) as sub:
            for password_file, delivered in (("bad", False), ("good", True)):
                settings = Settings(mqtt_url=f"mqtts://127.0.0.1:{broker.port}", mqtt_ca_file=certs["ca.crt"],
                                    mqtt_username="line", mqtt_password_file=tmp_path / password_file,
                                    mqtt_client_id=f"dapo-tls-{password_file}", mqtt_reconnect_max_s=1)
                metrics = Metrics()
                outbox = Outbox(MqttTransport(MqttOptions.from_settings(settings)),
                                OutboxOptions(backoff_initial_s=0.05, backoff_max_s=0.1, drain_s=0.2), metrics.loop)
                outbox.start()
                outbox.offer(ResultMessage(answer, 0))
                def value(name: str, registry=metrics.registry) -> float:
                    return registry.get_sample_value(name, {"sink": "mqtt"}) or 0.0

                if delivered:
                    wait_until(lambda: value("dapo_sink_delivered_total") == 1)
                else:  # refused by the broker: an outage (retries), never a delivery
                    wait_until(lambda: value("dapo_sink_retries_total") >= 2)
                    assert value("dapo_sink_delivered_total") == 0 and value("dapo_sink_up") == 0
                outbox.stop()
            # the condition asserted below, not a neighbouring event: the result AND the good
            # client's "offline" (published as its outbox stops, possibly after the result arrives)
            messages = sub.wait_for(lambda m: any(x.topic.endswith("/result") for x in m)
                                    and b"offline" in {x.payload for x in m if x.topic == "dapo/status/dapo-tls-good"})
    finally:
        broker.stop()
    results = [m for m in messages if m.topic.endswith("/result")]
    assert [m.topic for m in results] == ["dapo/st-tls/disc/result"]
    doc = results[0].json()
    assert doc["id"] == f"{answer.answer_id}:0" and doc["request_id"] == "req-tls" and doc["result"] == {"anomaly_score": 0.7, "is_anomalous": True,
                                                           "threshold": 0.5}
    assert {m.payload for m in messages if m.topic == "dapo/status/dapo-tls-good"} >= {b"online", b"offline"}
