"""The OpenAPI schema as integrators use it: generate a typed client and drive the service with it.

`openapi-python-client` (dev extra) generates a client from the running service's
/openapi.json; the test imports it and calls `detect` with the API key set once on the client
(the `ApiKey` security scheme), then follows the answer's OpenAPI link to `submitFeedback`.
The generated names (`detect`, `submit_feedback`, `DetectBody`, `FeedbackIn`...) come from the
stable operation ids and component names, so a renamed one fails here as it would break an
integrator's build.
The server is the real entry point (`dapo serve`) in a child process on a loopback port.
"""
from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from image_util import gradient_png
from service.server.local_server import Server

pytest.importorskip("openapi_python_client", reason="needs openapi-python-client (dev extra)")

KEY = "client-test-key"
PACKAGE = "dapo_generated_client"


def resolve(expression: object, answer: dict) -> object:
    """An OpenAPI link value: `$response.body#/<json pointer>` read from the answer, or a literal."""
    if isinstance(expression, str) and expression.startswith("$response.body#"):
        value: object = answer
        for part in expression.split("#", 1)[1].strip("/").split("/"):
            value = value[int(part)] if isinstance(value, list) else value[part]  # type: ignore[index]
        return value
    if isinstance(expression, dict):
        return {k: resolve(v, answer) for k, v in expression.items()}
    return expression


@pytest.fixture(scope="module")
def served(demo_artifact, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("oapc")
    env = {"DAPO_API_KEYS": KEY, "DAPO_FEEDBACK_DB": str(tmp / "feedback.sqlite"),
           "DAPO_SAMPLES_DIR": str(tmp / "samples"), "DAPO_WARMUP": "false", "DAPO_MAX_BATCH_SIZE": "2"}
    with Server(demo_artifact, env, log_path=tmp / "server.log") as server:
        yield server.url, tmp


@pytest.fixture(scope="module")
def client_package(served):
    url, tmp = served
    spec = httpx.get(url + "/openapi.json", timeout=10).json()
    (tmp / "openapi.json").write_text(json.dumps(spec))
    out = tmp / "gen" / PACKAGE
    exe = shutil.which("openapi-python-client", path=str(Path(sys.executable).parent)) or "openapi-python-client"
    done = subprocess.run([exe, "generate", "--path", str(tmp / "openapi.json"), "--output-path", str(out),
                           "--meta", "none"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    sys.path.insert(0, str(out.parent))
    try:
        yield spec, importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(out.parent))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def test_generated_client_detects_then_gives_feedback(served, client_package):
    url, _ = served
    spec, pkg = client_package
    detect = importlib.import_module(f"{PACKAGE}.api.default.detect")
    submit_feedback = importlib.import_module(f"{PACKAGE}.api.default.submit_feedback")
    models = importlib.import_module(f"{PACKAGE}.models")
    types = importlib.import_module(f"{PACKAGE}.types")

    body = models.DetectBody(image=[types.File(payload=gradient_png(3, 64, 48), file_name="part.png",
                                              mime_type="image/png")], part_id="P-1")

    # without the key: the service's own 401 envelope, through the generated error model
    anonymous = pkg.Client(base_url=url)
    refused = detect.sync_detailed(client=anonymous, body=body)
    assert refused.status_code == 401
    assert refused.parsed.error.code == "unauthorized"

    # the key set once, on the client (the ApiKey security scheme: header X-API-Key)
    client = pkg.AuthenticatedClient(base_url=url, token=KEY, prefix="", auth_header_name="X-API-Key")
    answer = detect.sync(client=client, body=body)
    assert isinstance(answer, models.DetectResponse), answer
    result = answer.results[0]
    assert result.filename == "part.png" and (result.width, result.height) == (64, 48)
    assert result.part_id == "P-1" and 0.0 <= result.anomaly_score <= 1.0

    # follow the answer's OpenAPI link to submitFeedback
    link = spec["paths"]["/detect"]["post"]["responses"]["200"]["links"]["submitFeedback"]
    assert link["operationId"] == "submitFeedback"
    linked = resolve(link["requestBody"], answer.to_dict())
    assert linked == {"answer_id": answer.answer_id, "index": 0}
    verdict = "false_positive" if result.is_anomalous else "correct"  # both mean: this part is good
    feedback = models.FeedbackIn.from_dict({**linked, "verdict": verdict, "note": "generated client"})
    stored = submit_feedback.sync_detailed(client=client, body=feedback)
    assert stored.status_code == 201, stored.content
    assert isinstance(stored.parsed, models.FeedbackOut)
    assert (stored.parsed.request_id, stored.parsed.index, stored.parsed.label) == (answer.request_id, 0, "good")
    assert stored.parsed.sample and Path(stored.parsed.sample).is_file()

    again = submit_feedback.sync_detailed(client=client, body=feedback)
    assert again.status_code == 409 and again.parsed.error.code == "duplicate_feedback"
