"""Schemathesis against the app's own /openapi.json (ASGI, in process, real demo artifact).

Schemathesis reads the schema FastAPI publishes and generates requests for every operation,
valid ones and (in its default mode) schema-violating ones. Checked on every answer: no 5xx,
documented status code, documented content type and, for documented answers, the body schema.
Bounded: a few dozen examples per operation, so the file runs in seconds.

Needs `schemathesis` (dev extra: "schemathesis>=4.0,<5"); skipped where it is not installed.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

schemathesis = pytest.importorskip("schemathesis")

from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from service.server.app import create_app  # noqa: E402
from service.server.settings import Settings  # noqa: E402


@pytest.fixture(scope="module")
def api_schema(demo_artifact):
    app = create_app(Settings(artifact=demo_artifact, max_batch_size=4, max_queue_delay_ms=2, warmup=False),
                     configure_logs=False)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")
SEEN: dict[tuple[str, str], dict[int, int]] = {}  # (method, path) -> status -> count


@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_and_never_5xx(case):
    response = case.call()
    counts = SEEN.setdefault((case.method, case.path), {})
    counts[response.status_code] = counts.get(response.status_code, 0) + 1
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
    case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                             content_type_conformance, response_schema_conformance])
    if response.status_code >= 400 and case.path != "/metrics":
        body = response.json()
        assert set(body) == {"error"} and {"code", "message", "request_id"} <= set(body["error"])


def test_every_operation_was_exercised():
    """The run above really reached each operation (a schema-loading slip would skip them all)."""
    paths = {path for _, path in SEEN}
    assert {"/detect", "/readyz", "/livez", "/v1/model", "/metrics"} <= paths, SEEN
    assert sum(SEEN[("POST", "/detect")].values()) >= 10, SEEN
    print("schemathesis status counts:", {f"{m} {p}": c for (m, p), c in sorted(SEEN.items())})
