"""The service on a free loopback port, for benchmarks and tests.

`Server` runs the real entry point (``python -m service.cli serve``) as a child process with
DAPO_* settings from ``env``, so what is measured or tested is what a deployment runs;
`serve_in_thread` runs an app object under uvicorn in this process (for tests that need to
reach into the app). Both wait on /readyz with `wait_ready`.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_kib(pid: int) -> int | None:
    """VmRSS of a process in KiB (Linux), None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def wait_ready(url: str, timeout: float = 120.0, alive: Callable[[], str | None] | None = None) -> None:
    """Poll `url`/readyz until 200; `alive` returns why the server is gone (None while it runs)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gone = alive() if alive else None
        if gone:
            raise RuntimeError(gone)
        try:
            if httpx.get(url + "/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s")


@contextmanager
def serve_in_thread(app, timeout: float = 60.0) -> Iterator[str]:
    """Run `app` under uvicorn in a thread on a free port; yields its base URL once ready."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout, alive=lambda: None if thread.is_alive() else "server thread exited")
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        if thread.is_alive():
            raise RuntimeError("the in-thread server did not stop within 30 s")


class Server:
    """Start on construction; `wait_ready()` (or `with`), then `stop()` sends SIGTERM."""

    def __init__(self, artifact: Path, env: dict[str, str] | None = None, port: int | None = None,
                 log_path: Path | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb") if log_path else None
        environ = {k: v for k, v in os.environ.items() if not k.startswith("DAPO_")} | (env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--artifact", str(artifact), "--host", "127.0.0.1",
             "--port", str(self.port)],
            env=environ, stdout=self._log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT if self._log else subprocess.PIPE)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 120.0) -> None:
        def gone() -> str | None:
            if self.proc.poll() is None:
                return None
            detail = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.stderr else \
                f"log: {self.log_path}"
            return f"server exited with {self.proc.returncode} before ready: {detail}"

        wait_ready(self.url, timeout, gone)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful: in-flight requests finish), kill after `timeout`; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log:
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "Server":
        self.wait_ready()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
