"""Real servers for the fleet tests: Debian's redis-server and PostgreSQL on loopback ports, in
temporary folders, started and stopped by the tests themselves.

PostgreSQL refuses to run as root: when the tests run as root, initdb and pg_ctl run as the
`postgres` user (Debian's package creates it) through runuser, in a folder that user owns.
"""
from __future__ import annotations

import getpass
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from broker_util import wait_port
from service.server.local_server import free_port

REDIS_SERVER = shutil.which("redis-server")
REDIS_SKIP = "redis-server not installed (apt-get install -y redis-server)"
_PG_BINS = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
PG_BIN = Path(_PG_BINS[-1]).parent if _PG_BINS else (Path(shutil.which("initdb")).parent if shutil.which("initdb")
                                                     else None)
PG_SKIP = "postgresql not installed (apt-get install -y postgresql)"


class Redis:
    """`redis-server` on 127.0.0.1:port, no persistence; stop()/start() keep the port."""

    def __init__(self, port: int | None = None, maxmemory_mb: int | None = None):
        assert REDIS_SERVER is not None, REDIS_SKIP
        self.port = port or free_port()
        self.maxmemory_mb = maxmemory_mb
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "Redis":
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--protected-mode", "no", "--loglevel", "warning"]
        if self.maxmemory_mb:
            args += ["--maxmemory", f"{self.maxmemory_mb}mb"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, up=True)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None
            wait_port(self.port, up=False)

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)


class Postgres:
    """A throwaway cluster (initdb, trust auth on loopback) on 127.0.0.1:port."""

    def __init__(self):
        assert PG_BIN is not None, PG_SKIP
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="dapo-pg-"))
        self.data = self.root / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # postgres will not run as root
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.user = "postgres" if self.as_user else getpass.getuser()

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> "Postgres":
        if not self.data.exists():
            self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", self.user, "--no-sync")
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=on"
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.root / "pg.log"),
                  "-w", "start")
        wait_port(self.port, up=True)
        return self

    def stop(self) -> None:
        subprocess.run([*self.as_user, str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.02):
    """Poll until `predicate()` is truthy (its value), or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
