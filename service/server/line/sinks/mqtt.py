"""MQTT result sink (paho-mqtt): each image's result published at QoS 1 on a templated topic.

- Topic: a template over the request's echo fields and the verdict, e.g.
  `dapo/{station_id}/{product}/result`; a missing field becomes "_", and characters MQTT
  reserves in topic levels (`/ + #`) become "_", so a part id can never add a level or a wildcard.
- Delivery: one message in flight; the outbox calls `deliver`, which returns once the broker's
  PUBACK arrived. Paho keeps an unacknowledged message across reconnects and resends it (DUP),
  so a message handed to paho is never handed over twice by us; while the broker is away
  nothing is handed over at all and results wait (bounded) in the outbox.
- Presence: a retained "online" on the status topic at every connect, and "offline" as the
  last will (the broker publishes it when the connection dies) and on a clean shutdown.
- TLS (`mqtts://`) with an optional CA file and client certificate; username and password
  from settings or a file (never in the URL, which gets logged).
"""
from __future__ import annotations

import logging
import socket
import string
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt

from service.server.answers import ResultMessage
from service.server.line.sinks import secret_from
from service.server.line.sinks.outbox import DELIVERED, Outcome, Status

log = logging.getLogger("dapo.sinks")

TOPIC_FIELDS = ("product", "part_id", "station_id", "recipe_id", "verdict")
STATUS_FIELDS = ("client_id",)
MISSING = "_"
ONLINE, OFFLINE = b"online", b"offline"
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
_RESERVED = str.maketrans({"/": "_", "+": "_", "#": "_", "\x00": "_"})


class TopicTemplate:
    """`str.format` placeholders limited to known fields, checked when the sink is configured."""

    def __init__(self, template: str, fields: tuple[str, ...]):
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        unknown = sorted(names - set(fields))
        if unknown or not template or any(c in template for c in "+#"):
            raise ValueError(f"MQTT topic template {template!r}: placeholders must be among {list(fields)}"
                             f"{f', not {unknown}' if unknown else ''}; no wildcards")
        self.template, self.fields = template, fields

    def render(self, values: dict[str, str | None]) -> str:
        return self.template.format_map({f: level(values.get(f)) for f in self.fields})


def level(value: str | None) -> str:
    """A value as one topic level."""
    return value.translate(_RESERVED) if value else MISSING


@dataclass(frozen=True)
class MqttOptions:
    host: str
    port: int
    tls: bool
    topic: str
    status_topic: str
    client_id: str
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: int = 30
    reconnect_max_s: int = 30

    @classmethod
    def from_settings(cls, s) -> "MqttOptions":
        url = urlsplit(s.mqtt_url)
        if url.scheme not in DEFAULT_PORTS or not url.hostname:
            raise ValueError(f"DAPO_MQTT_URL must look like mqtt://host:1883 or mqtts://host:8883, got {s.mqtt_url!r}")
        if url.username or url.password:
            raise ValueError("DAPO_MQTT_URL must not carry credentials: use DAPO_MQTT_USERNAME and "
                             "DAPO_MQTT_PASSWORD or DAPO_MQTT_PASSWORD_FILE")
        password = secret_from(s.mqtt_password, s.mqtt_password_file)
        client_id = s.mqtt_client_id or f"dapo-{socket.gethostname()}"
        status = TopicTemplate(s.mqtt_status_topic, STATUS_FIELDS).render({"client_id": client_id})
        TopicTemplate(s.mqtt_topic, TOPIC_FIELDS)  # fail at start-up, not at the first result
        return cls(url.hostname, url.port or DEFAULT_PORTS[url.scheme], url.scheme == "mqtts", s.mqtt_topic, status,
                   client_id, s.mqtt_username, password, s.mqtt_ca_file, s.mqtt_cert_file, s.mqtt_key_file,
                   s.mqtt_keepalive_s, s.mqtt_reconnect_max_s)


class MqttTransport:
    """A paho client with its own network thread; the outbox's worker calls `deliver`."""

    name = "mqtt"

    def __init__(self, options: MqttOptions):
        self.options = options
        self.topic = TopicTemplate(options.topic, TOPIC_FIELDS)
        self._acked: set[int] = set()
        self._acked_cond = threading.Condition()
        self._last_error = "not connected to the broker yet"
        self.client = self._make_client()

    def _make_client(self) -> mqtt.Client:
        o = self.options
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=o.client_id, clean_session=True,
                             protocol=mqtt.MQTTv311)
        if o.username is not None:
            client.username_pw_set(o.username, o.password)
        if o.tls:
            client.tls_set(ca_certs=str(o.ca_file) if o.ca_file else None,
                           certfile=str(o.cert_file) if o.cert_file else None,
                           keyfile=str(o.key_file) if o.key_file else None)
        client.will_set(o.status_topic, OFFLINE, qos=1, retain=True)
        client.reconnect_delay_set(1, o.reconnect_max_s)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        return client

    # --- paho callbacks (its network thread) -------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._last_error = f"broker refused the connection: {reason_code}"
            return
        client.publish(self.options.status_topic, ONLINE, qos=1, retain=True)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._last_error = f"disconnected from the broker: {reason_code}"

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._acked_cond:
            self._acked.add(mid)
            self._acked_cond.notify_all()

    # --- outbox side ---------------------------------------------------------------------------
    def start(self) -> None:
        o = self.options
        self.client.connect_async(o.host, o.port, o.keepalive_s)
        self.client.loop_start()  # retries the first connection too, with the reconnect backoff

    def deliver(self, message: ResultMessage, cancel: threading.Event) -> Outcome:
        if not self.client.is_connected():
            return Outcome(Status.RETRY, self._last_error)
        result = message.result
        values = {**message.answer.echo, "verdict": "anomalous" if result.get("is_anomalous") else "ok"}
        info = self.client.publish(self.topic.render(values), message.body, qos=1)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: paho sends it on reconnect
            return Outcome(Status.RETRY, f"publish failed: {mqtt.error_string(info.rc)}")
        with self._acked_cond:
            while info.mid not in self._acked:
                if cancel.is_set():
                    return Outcome(Status.RETRY, "shut down before the broker acknowledged")
                self._acked_cond.wait(0.25)
            self._acked.clear()  # only status messages can be left: one result is in flight at a time
        return DELIVERED

    def close(self) -> None:
        """A retained "offline" (a clean disconnect does not fire the will), then disconnect."""
        if self.client.is_connected():
            info = self.client.publish(self.options.status_topic, OFFLINE, qos=1, retain=True)
            with self._acked_cond:
                self._acked_cond.wait_for(lambda: info.mid in self._acked, timeout=2.0)
        self.client.disconnect()
        self.client.loop_stop()
