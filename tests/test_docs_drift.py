"""The docs cannot drift from the product: routes, settings, metrics and error codes.

Each check compares what the running product has with what the docs say, and each is also run
on a planted omission (a route removed from the doc, a new setting, a new metric, a new error
code) to show that it fails then. Fixes are named in the failure messages:
- a route: document it in docs/api.md as `METHOD /path` (its body, answers and error codes);
- a setting: `python -m service.server.settings_doc --write` (regenerates docs/settings.md);
- a metric: a row in docs/api.md's `<!-- table: metrics -->` table;
- an error code: add it to service.server.errors.ERROR_CODES and a row to docs/api.md's error table.
"""
from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient
from pydantic import Field

from service.server import settings_doc
from service.server.app import create_app
from service.server.errors import ERROR_CODES
from service.server.settings import Settings
from drift_util import (API_MD, SETTINGS_MD, code_literals, documented_codes, error_code_problems,
                       metric_families, service_sources, settings_problems, undocumented_metrics,
                       undocumented_routes)
from image_util import gradient_png

REGENERATE = f"run `{settings_doc.COMMAND}` and commit docs/settings.md"


@pytest.fixture(scope="module")
def api_doc() -> str:
    return API_MD.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def openapi() -> dict:
    return create_app(Settings(), configure_logs=False).openapi()


# --- routes ------------------------------------------------------------------------------
def test_every_route_is_documented(openapi, api_doc):
    missing = undocumented_routes(openapi, api_doc)
    assert not missing, f"routes in /openapi.json that docs/api.md does not document as `METHOD /path`: {missing}"


def test_a_route_removed_from_the_doc_is_caught(openapi, api_doc):
    planted = api_doc.replace("`POST /v1/feedback`", "`POST /v1/feedbacks`")
    assert planted != api_doc
    assert undocumented_routes(openapi, planted) == ["POST /v1/feedback"]


def test_a_new_route_is_caught(api_doc):
    app = create_app(Settings(), configure_logs=False)
    app.add_api_route("/v1/planted", lambda: {}, methods=["DELETE"], operation_id="planted")
    assert undocumented_routes(app.openapi(), api_doc) == ["DELETE /v1/planted"]


# --- settings ----------------------------------------------------------------------------
def test_settings_table_is_current():
    current = SETTINGS_MD.read_text(encoding="utf-8") if SETTINGS_MD.exists() else ""
    assert current == settings_doc.render(), f"docs/settings.md is not what Settings says: {REGENERATE}"


def test_every_setting_is_listed_with_its_default():
    problems = settings_problems(SETTINGS_MD.read_text(encoding="utf-8"))
    assert not problems, f"{problems}: {REGENERATE}"
    assert len(Settings.model_fields) >= 60


def test_a_new_setting_is_caught():
    class Planted(Settings):
        planted_knob_s: float = Field(default=2.5, description="a knob nobody documented")
        undescribed: int = 7

    doc = SETTINGS_MD.read_text(encoding="utf-8")
    problems = settings_problems(doc, Planted)
    assert problems == ["DAPO_PLANTED_KNOB_S (default 2.5) is not in the settings table",
                        "DAPO_UNDESCRIBED (default 7) is not in the settings table",
                        "DAPO_UNDESCRIBED has no description: give the field `Field(description=...)` in Settings"]
    assert settings_doc.render(Planted) != doc
    assert "| `DAPO_PLANTED_KNOB_S` | `2.5` | a knob nobody documented |" in settings_doc.render(Planted)


def test_a_changed_default_is_caught():
    doc = SETTINGS_MD.read_text(encoding="utf-8").replace("| `DAPO_MAX_FILES` | `16` |", "| `DAPO_MAX_FILES` | `8` |")
    assert settings_problems(doc) == ["DAPO_MAX_FILES (default 16) is not in the settings table"]


def test_settings_doc_check_command(tmp_path):
    stale = tmp_path / "settings.md"
    stale.write_text("# Settings\n")
    assert settings_doc.main(["--check", "--out", str(stale)]) == 1
    assert settings_doc.main(["--write", "--out", str(stale)]) == 0
    assert settings_doc.main(["--check", "--out", str(stale)]) == 0


# --- metrics -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_app(demo_artifact, tmp_path_factory):
    """The real app on the demo artifact with every optional part on: feedback (SQLite),
    samples by policy, a webhook sink (to a closed loopback port: results queue), quality
    stations. One /detect has run, so every labelled family has a series."""
    tmp = tmp_path_factory.mktemp("drift")
    settings = Settings(artifact=demo_artifact, warmup=False, max_batch_size=2, feedback_db=str(tmp / "fb.sqlite"),
                        samples_dir=tmp / "samples", samples_policy=json.dumps({"*": [{"kind": "all"}]}),
                        webhook_url="http://127.0.0.1:9/results", quality_stations=["line-1"])
    app = create_app(settings, configure_logs=False)
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the app did not become ready"
            time.sleep(0.05)
        r = client.post("/detect", files={"image": ("a.png", gradient_png(0, 64, 48), "image/png")},
                        data={"station_id": "line-1"})
        assert r.status_code == 200, r.text
        yield app, client


def test_every_metric_family_is_documented(full_app, api_doc):
    _, client = full_app
    exposition = client.get("/metrics").text
    assert len(metric_families(exposition)) >= 30
    missing = undocumented_metrics(exposition, api_doc)
    assert not missing, f"/metrics families that docs/api.md's metrics table does not list: {missing}"


def test_a_new_metric_is_caught(full_app, api_doc):
    from prometheus_client import Gauge

    app, client = full_app
    registry = app.state.service.metrics.registry
    planted = Gauge("dapo_planted_things", "a family nobody documented", registry=registry)
    try:
        assert undocumented_metrics(client.get("/metrics").text, api_doc) == ["dapo_planted_things"]
    finally:
        registry.unregister(planted)


# --- error codes -------------------------------------------------------------------------
def test_every_error_code_is_registered_and_documented(api_doc):
    literals = code_literals(service_sources())
    problems = error_code_problems(literals, ERROR_CODES, api_doc)
    assert not problems, problems
    assert len(documented_codes(api_doc)) >= 30


def test_a_new_error_code_is_caught(api_doc):
    sources = service_sources()
    sources["service/server/planted.py"] = (
        "from service.server.errors import ApiError\n"
        "def brew(kind):\n"
        "    code = 'teapot' if kind else 'kettle'\n"
        "    raise ApiError(418, code, 'short and stout')\n")
    problems = error_code_problems(code_literals(sources), ERROR_CODES, api_doc)
    assert problems == ["kettle (at service/server/planted.py:4) is not in service.server.errors.ERROR_CODES",
                        "teapot (at service/server/planted.py:4) is not in service.server.errors.ERROR_CODES"]
    registered = ERROR_CODES | {"teapot", "kettle"}
    assert error_code_problems(code_literals(sources), registered, api_doc) == [
        "kettle is not in docs/api.md's error table (a row `| <status> | `kettle` | <cause> |`)",
        "teapot is not in docs/api.md's error table (a row `| <status> | `teapot` | <cause> |`)"]


def test_an_error_code_removed_from_the_doc_is_caught(api_doc):
    lines = [line for line in api_doc.splitlines() if "| `feedback_expired` |" not in line]
    problems = error_code_problems(code_literals(service_sources()), ERROR_CODES, "\n".join(lines))
    assert problems == ["feedback_expired is not in docs/api.md's error table "
                        "(a row `| <status> | `feedback_expired` | <cause> |`)"]


def test_the_scan_follows_codes_through_names_and_defaults():
    """The scanner sees the codes the service gives indirectly, so the registry check is real."""
    literals = code_literals(service_sources())
    assert "invalid_image" in literals  # ImageError's default `code`
    assert {"queue_full", "inference_failed", "retry", "unavailable"} <= set(literals)  # a dict lookup
    assert {"not_found", "method_not_allowed"} <= set(literals)  # _STATUS_CODES through `code = ...`
