"""The Grafana dashboard and the Prometheus config of the compose profile `monitoring`.

The dashboard JSON must parse and cover what a supervisor looks at; every metric it names must
be one the service exports; and every query in it must return data from a REAL Prometheus
(Debian's `prometheus`; CI installs it, the test skips saying so when it is absent) that scrapes
the real service on loopback, with deploy/prometheus/prometheus.yml as its configuration (only
the target and the scrape interval changed). Grafana itself is not in Debian and there is no
Docker engine here, so the panels are not rendered; their PromQL is what is checked.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import threading
import time
from itertools import cycle
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from quality_util import good_images
from service.server.app import create_app
from service.server.local_server import free_port, serve_in_thread
from service.server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "dapo-line-quality.json"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
# What Grafana puts in place of its variables; "All" is ".*" (the dashboard's allValue).
GRAFANA_VARIABLES = {"$product": ".*", "$station": ".*", "$__rate_interval": "10s", "$__range": "1m"}
SCRAPE_S = 1

needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None,
                                      reason="prometheus not installed (CI: apt-get install -y prometheus)")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target, Grafana's variables filled in as for "All"."""
    out = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, replacement in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
                expr = expr.replace(name, replacement)
            assert "$" not in expr, f"{panel['title']}: unknown variable in {expr}"
            out.append((panel["title"], expr))
    return out


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bdapo_[a-z_]+\b", expr))


def test_dashboard_parses_and_covers_the_line():
    dash = dashboard()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("reject rate", "defect mix", "score distribution", "drift", "latency", "throughput"):
        assert topic in titles, topic
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("product", "station"):
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24
    assert len(queries()) >= 15


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus():
    datasource = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    scrape = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"]["scrape_interval"]
    assert datasource["jsonData"]["timeInterval"] == scrape  # $__rate_interval needs the scrape interval
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "dapo.yml").read_text())["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_every_metric_the_dashboard_names_is_exported(wood_artifact, textures):
    settings = Settings(artifact=wood_artifact, drift_window=16, drift_min_images=8, quality_stations="line-1")
    with TestClient(create_app(settings, configure_logs=False)) as client:
        files = [("image", (p.name, p.read_bytes(), "image/png")) for p in good_images(textures, "wood")[:8]]
        r = client.post("/detect", files=files, data={"product": "wood", "station_id": "line-1"},
                        params={"threshold": 0.0})
        assert r.status_code == 200
        exported = {s.name for f in text_string_to_metric_families(client.get("/metrics").text) for s in f.samples}
    named = set().union(*(metric_names(expr) for _, expr in queries()))
    assert named and named <= exported, sorted(named - exported)
    for variable in dashboard()["templating"]["list"][1:]:
        assert metric_names(variable["query"]["query"]) <= exported


def test_prometheus_config_is_valid():
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (CI: apt-get install -y prometheus)")
    proc = subprocess.run(["promtool", "check", "config", str(PROMETHEUS_CONFIG)], check=False, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- every query against a real Prometheus -------------------------------------------------------
class Traffic(threading.Thread):
    """Keeps /detect busy (good wood, carpet, forced rejects, two stations) until stopped."""

    def __init__(self, url: str, textures: Path):
        super().__init__(daemon=True)
        self.url, self.stop, self.errors, self.sent = url, threading.Event(), [], 0
        wood, carpet = good_images(textures, "wood"), good_images(textures, "carpet")
        self.requests = cycle([
            (wood[:4], {"product": "wood", "station_id": "line-1"}, {}),
            (carpet[:4], {"product": "wood", "station_id": "line-2"}, {}),
            (wood[4:8], {"product": "wood", "station_id": "line-2"}, {"threshold": 0.0}),  # rejects
            (wood[8:10], {"product": "disc", "station_id": "line-9"}, {"threshold": 0.0}),
        ])

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                paths, data, params = next(self.requests)
                files = [("image", (p.name, p.read_bytes(), "image/png")) for p in paths]
                r = client.post("/detect", files=files, data=data, params=params)
                if r.status_code != 200:
                    self.errors.append(r.text)
                self.sent += 1
                time.sleep(0.05)


class Prometheus:
    """`prometheus` on a loopback port with deploy/prometheus/prometheus.yml aimed at `target`."""

    def __init__(self, target: str, workdir: Path):
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = f"{SCRAPE_S}s"
        job = next(j for j in config["scrape_configs"] if j["job_name"] == "dapo")
        job["static_configs"] = [{"targets": [target], "labels": {"deployment": "test"}}]
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until /-/ready says 200: while it starts (TSDB, rules), Prometheus answers every API
        call with a plain-text 503 "Service Unavailable", not a query result."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited: {Path(self.log.name).read_text()[-2000:]}"
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready after {timeout:.0f} s")

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def wait(self, expr: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited: {Path(self.log.name).read_text()[-2000:]}"
            try:
                if self.query(expr):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"no data for {expr} after {timeout:.0f} s")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@needs_prometheus
def test_every_dashboard_query_returns_data_from_a_real_prometheus(wood_artifact, textures, tmp_path):
    settings = Settings(artifact=wood_artifact, drift_window=16, drift_min_images=8, quality_stations="line-1,line-2")
    with serve_in_thread(create_app(settings, configure_logs=False)) as url:
        traffic = Traffic(url, textures)
        traffic.start()
        prometheus = Prometheus(url.removeprefix("http://"), tmp_path)
        try:
            # several scrapes with traffic in between, so rates and quantiles have two points
            prometheus.wait("count_over_time(dapo_score_drift_psi[1m]) >= 3")
            prometheus.wait(f'rate(dapo_defects_total[{GRAFANA_VARIABLES["$__rate_interval"]}]) > 0')
            answers = {(title, expr): prometheus.query(expr) for title, expr in queries()}
            up = prometheus.query('up{job="dapo"}')
            products = httpx.get(f"{prometheus.url}/api/v1/label/product/values",
                                 params={"match[]": "dapo_inspections_total"}, timeout=10).json()["data"]
            stations = httpx.get(f"{prometheus.url}/api/v1/label/station_id/values",
                                 params={"match[]": "dapo_inspections_total"}, timeout=10).json()["data"]
        finally:
            traffic.stop.set()
            traffic.join(30)
            prometheus.close()
    assert not traffic.errors, traffic.errors[:3]
    assert [s["value"][1] for s in up] == ["1"]
    empty = [title for (title, _), result in answers.items() if not result]
    assert not empty, f"panels without data: {empty}"
    for (title, expr), result in answers.items():
        values = [float(s["value"][1]) for s in result]
        assert any(math.isfinite(v) for v in values), f"{title}: {expr} -> {values}"
    # the variables' options: every product and folded station the traffic produced
    assert {"wood", "disc"} <= set(products)
    assert set(stations) == {"line-1", "line-2", "other"}
    # the drift panel shows the wood product's PSI (carpet mixed into wood: a shift)
    drift = answers[next(k for k in answers if "dapo_score_drift_psi" in k[1])]
    assert [s["metric"]["product"] for s in drift] == ["wood"] and float(drift[0]["value"][1]) > 0.25
