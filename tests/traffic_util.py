"""Background /detect traffic for the update-under-load tests (hot reload, Ray rolling update)."""
from __future__ import annotations

import threading


class BackgroundClients:
    """`clients` threads, each running `self.client_loop(stop)` from the start of the with-block
    until its end (`stop` is set then); subclasses post requests and record the answers."""

    def __init__(self, clients: int, join_timeout_s: float = 60.0):
        self.join_timeout_s = join_timeout_s
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self.client_loop, args=(self._stop,), daemon=True)
                         for _ in range(clients)]

    def client_loop(self, stop: threading.Event) -> None:
        raise NotImplementedError

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.join_timeout_s)
