"""A real MQTT broker for tests: Debian's mosquitto on a loopback port, plus a paho subscriber.

The broker persists its state (a persistent subscriber session survives a broker restart, so
messages published while the subscriber is reconnecting are still delivered to it, as on a
real plant broker). `stop()` / `start()` restart it on the same port.
"""
from __future__ import annotations

import getpass
import json
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from service.server.local_server import free_port

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
SKIP_REASON = "mosquitto not installed (apt-get install -y mosquitto mosquitto-clients)"


def wait_port(port: int, up: bool, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                if up:
                    return
        except OSError:
            if not up:
                return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} not {'open' if up else 'closed'} after {timeout} s")


class Mosquitto:
    """`mosquitto -c conf` on 127.0.0.1:port; `extra` lines go into the listener's config."""

    def __init__(self, folder: Path, extra: list[str] | None = None, port: int | None = None):
        assert MOSQUITTO is not None, SKIP_REASON
        self.folder, self.port = Path(folder), port or free_port()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.conf = self.folder / "mosquitto.conf"
        # `user`: mosquitto started as root drops to user "mosquitto", which cannot read the
        # test's private temp folder; stay the user who runs the tests
        lines = [f"user {getpass.getuser()}", f"listener {self.port} 127.0.0.1", "persistence true",
                 f"persistence_location {self.folder}/", f"log_dest file {self.folder}/mosquitto.log",
                 *(extra or ["allow_anonymous true"])]
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> "Mosquitto":
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port, up=True)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        wait_port(self.port, up=False)

    def log(self) -> str:
        path = self.folder / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool

    def json(self) -> dict:
        return json.loads(self.payload)


@dataclass
class Subscriber:
    """A paho client with a persistent session (clean_session=False), QoS 1, collecting messages."""

    port: int
    topics: list[str]
    client_id: str = "dapo-test-subscriber"
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    messages: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        import paho.mqtt.client as mqtt

        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=False)
        if self.username:
            c.username_pw_set(self.username, self.password)
        if self.tls_ca:
            c.tls_set(ca_certs=self.tls_ca)
        c.reconnect_delay_set(1, 1)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_subscribe = lambda *a: self._subscribed.set()
        self.client = c

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, client, userdata, msg):
        with self._cond:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._cond.notify_all()

    def __enter__(self) -> "Subscriber":
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "subscription not acknowledged"
        return self

    def __exit__(self, *exc) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def wait_for(self, predicate, timeout: float = 10.0) -> list[Received]:
        """Block until predicate(messages) is true; the messages so far (AssertionError on timeout)."""
        with self._cond:
            ok = self._cond.wait_for(lambda: predicate(self.messages), timeout)
            snapshot = list(self.messages)
        assert ok, f"timed out; got {[(m.topic, m.payload[:80]) for m in snapshot]}"
        return snapshot

    def results(self) -> list[Received]:
        with self._cond:
            return [m for m in self.messages if m.topic.endswith("/result")]
