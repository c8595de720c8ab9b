"""Schemathesis against the app's own /openapi.json (ASGI, in process, real demo artifact).

Schemathesis reads the schema FastAPI publishes and generates requests for every operation,
valid ones and (in its default mode) schema-violating ones. Checked on every answer: no 5xx,
documented status code, documented content type and, for documented answers, the body schema;
and `positive_data_acceptance`: a request the schema calls valid must not be refused as
malformed (400/413/415/422). The schema states every structural constraint the service checks
(an `image` is required, `product` has 1..256 characters, the Idempotency-Key's characters...).
What no schema can state is the data a request must name that the server holds: the bytes of an
`image` must decode as a picture, `product` and `defect_types` must name the served model's
products and words (GET /v1/model lists them), and an Idempotency-Key must not be reused for a
different request. A positive case gets those from the served model (`with_server_data`)
before it is sent; everything else is as generated.
Bounded: a few dozen examples per operation, so the file runs in seconds.

Needs `schemathesis` (dev extra: "schemathesis>=4.0,<5"); skipped where it is not installed.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

schemathesis = pytest.importorskip("schemathesis")

from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

import uuid  # noqa: E402

from schemathesis import GenerationMode  # noqa: E402

from image_util import gradient_png  # noqa: E402
from service.runtime.artifact import load_manifest  # noqa: E402
from service.server.app import create_app  # noqa: E402
from service.server.settings import Settings  # noqa: E402

SERVER_DATA: dict[str, list[str]] = {}  # the served model's products and defect words


@pytest.fixture(scope="module")
def api_schema(demo_artifact, tmp_path_factory):
    feedback_db = tmp_path_factory.mktemp("schemathesis") / "feedback.sqlite"  # so /v1/feedback reads its body
    app = create_app(Settings(artifact=demo_artifact, max_batch_size=4, max_queue_delay_ms=2, warmup=False,
                              feedback_db=str(feedback_db)), configure_logs=False)
    manifest = load_manifest(demo_artifact, verify=False)
    SERVER_DATA["products"] = sorted(manifest.products)
    SERVER_DATA["words"] = [v.name for v in manifest.vocabulary if v.id != 0]
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def with_server_data(case) -> None:
    """A positive /detect case, given what only the server knows (see the module docstring)."""
    if case.meta is None or not case.meta.generation.mode.is_positive or case.path != "/detect":
        return
    if isinstance(case.body, dict):
        count = min(len(case.body.get("image") or [None]), 2)
        case.body["image"] = [gradient_png(i, 40 + 8 * i, 32) for i in range(count)]
        if "product" in case.body:
            if SERVER_DATA["products"]:
                case.body["product"] = SERVER_DATA["products"][len(case.body["product"]) % len(SERVER_DATA["products"])]
            else:
                del case.body["product"]
    if case.query and "defect_types" in case.query:
        case.query["defect_types"] = SERVER_DATA["words"][len(case.query["defect_types"]) % len(SERVER_DATA["words"])]
    if case.headers and "idempotency-key" in {k.lower() for k in case.headers}:
        case.headers = {k: (uuid.uuid4().hex if k.lower() == "idempotency-key" else v) for k, v in case.headers.items()}
    if case.headers and "x-deadline-ms" in {k.lower() for k in case.headers}:
        # a budget of a few ms is a valid header whose documented answer is 504 deadline_exceeded
        # (tests/test_deadlines.py); here it gets a budget that an answer can meet
        case.headers = {k: ("60000" if k.lower() == "x-deadline-ms" else v) for k, v in case.headers.items()}


SEEN: dict[tuple[str, str], dict[int, int]] = {}  # (method, path) -> status -> count
POSITIVE = [0]  # positive cases run (negative mode falls back to one where nothing can be violated)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          positive_data_acceptance]


def check_case(case) -> None:
    with_server_data(case)
    response = case.call()
    counts = SEEN.setdefault((case.method, case.path), {})
    counts[response.status_code] = counts.get(response.status_code, 0) + 1
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
    case.validate_response(response, checks=CHECKS)
    if response.status_code >= 400 and case.path != "/metrics":
        body = response.json()
        assert set(body) == {"error"} and {"code", "message", "request_id"} <= set(body["error"])


# Schemathesis as a library (operation strategies driven by hypothesis) rather than its pytest
# plugin's lazy fixture, whose node renaming pytest 9 no longer allows.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_api_conforms_and_never_5xx(api_schema, mode):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 7
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and not _can_violate(operation):
            continue  # nothing in the request that a schema constrains

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case) -> None:
            assert case.meta is not None  # else positive_data_acceptance would skip
            if case.meta.generation.mode is GenerationMode.POSITIVE:
                POSITIVE[0] += 1
            check_case(case)

        run()


def _can_violate(operation) -> bool:
    definition = operation.definition.raw
    return bool(definition.get("parameters") or definition.get("requestBody"))


def test_every_operation_was_exercised():
    """The run above really reached each operation (a schema-loading slip would skip them all)."""
    paths = {path for _, path in SEEN}
    assert {"/detect", "/readyz", "/livez", "/v1/model", "/metrics", "/v1/feedback", "/v1/model/reload"} <= paths, SEEN
    assert sum(SEEN[("POST", "/detect")].values()) >= 10, SEEN
    assert SEEN[("POST", "/detect")].get(200, 0) >= 5, SEEN  # positive cases really got answers
    assert POSITIVE[0] >= 7 * 5, POSITIVE
    print("schemathesis status counts:", {f"{m} {p}": c for (m, p), c in sorted(SEEN.items())})
