"""Security audit of the serving path: no unsafe deserialisation, keys safe, inputs never paths,
limits before reads, CORS off by default, dependencies bounded."""
from __future__ import annotations

import ast
import asyncio
import io
import json
import logging
import sys
import tomllib
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from packaging.requirements import Requirement

from robust_util import assert_envelope, png_bytes
from service.server.app import create_app
from service.server.logs import JsonFormatter
from service.server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SERVICE = ROOT / "service"


# --- 1. no pickle on the serving path ----------------------------------------------------------
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "jsonpickle"}
UNSAFE_CALLS = {"torch.load", "torch.jit.load", "torch.export.load", "torch.package.PackageImporter",
                "pandas.read_pickle", "pd.read_pickle", "numpy.load", "np.load", "yaml.load", "yaml.unsafe_load"}


def dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def unsafe_uses(source: str, filename: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in UNSAFE_MODULES:
                found.append(f"from {node.module} import ...")
            found += [f"from {node.module} import {a.name}" for a in node.names
                      if f"{node.module}.{a.name}" in UNSAFE_CALLS]
        elif isinstance(node, ast.Call):
            name = dotted(node.func)
            if name in UNSAFE_CALLS:
                found.append(f"{name}(...)")
            if any(k.arg in ("allow_pickle", "weights_only") for k in node.keywords):
                found.append(f"{name}(allow_pickle/weights_only=...)")
        if hasattr(node, "lineno") and found and not found[-1].startswith(f"{filename}:"):
            found[-1] = f"{filename}:{node.lineno}: {found[-1]}"
    return found


def test_audit_detector_catches_what_it_should():
    bad = "import pickle\nfrom joblib import load\nimport torch\ntorch.load('x')\nnp.load('a', allow_pickle=True)\n"
    assert len(unsafe_uses(bad, "bad.py")) == 5


def test_no_unsafe_deserialisation_in_service():
    files = sorted(SERVICE.rglob("*.py"))
    assert len(files) > 10
    found = [hit for f in files for hit in unsafe_uses(f.read_text(), str(f.relative_to(ROOT)))]
    assert not found, found


def test_serving_does_not_import_training_or_pickle_users():
    """The app's import closure: no training/, no pickle-based loaders imported by our code."""
    code = ("import sys; import service.server.app, service.runtime.backends.ort_backend, service.server.routes; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('training', 'joblib', 'dill', 'cloudpickle')))")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


# --- 2. API keys: constant-time comparison, never logged ---------------------------------------
def test_api_keys_compared_with_compare_digest():
    from service.server import auth

    tree = ast.parse(Path(auth.__file__).read_text())
    check = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "check")
    calls = {dotted(n.func) for n in ast.walk(check) if isinstance(n, ast.Call)}
    assert "hmac.compare_digest" in calls
    compares = [n for n in ast.walk(check) if isinstance(n, ast.Compare)
                and any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in n.ops)]
    assert not compares, "keys must not be compared with ==/in (timing)"


SECRET = "sk-line3-" + uuid.uuid4().hex
NEAR_MISS = SECRET[:-1] + ("0" if SECRET[-1] != "0" else "1")


class LogCapture:
    """Every record of the service's loggers (and the root), formatted as the service does."""

    NAMES = ["", "dapo", "uvicorn", "uvicorn.error", "uvicorn.access"]

    def __init__(self):
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(JsonFormatter())
        self.handler.setLevel(logging.DEBUG)
        self.loggers = [logging.getLogger(n) for n in self.NAMES]
        self.saved = [(lg.level, lg.disabled, lg.propagate, list(lg.handlers)) for lg in self.loggers]

    def attach(self) -> None:
        """(Re)attach after anything that replaced the handlers (configure_logging does)."""
        for lg in self.loggers:
            if self.handler not in lg.handlers:
                lg.addHandler(self.handler)
            lg.setLevel(logging.DEBUG)

    def restore(self) -> None:
        for lg, (level, disabled, propagate, handlers) in zip(self.loggers, self.saved):
            lg.handlers = handlers
            lg.setLevel(level)
            lg.disabled, lg.propagate = disabled, propagate

    def text(self) -> str:
        return self.stream.getvalue()


@pytest.fixture()
def log_capture():
    cap = LogCapture()
    cap.attach()
    yield cap
    cap.restore()


def test_api_key_never_appears_in_logs_metrics_or_answers(demo_artifact, log_capture):
    class FailingOnce:
        def __init__(self):
            from service.runtime.artifact import load_manifest
            from service.runtime.backends import create_backend

            self.inner = create_backend(demo_artifact, load_manifest(demo_artifact))
            self.name, self.provider = self.inner.name, self.inner.provider
            self.fail = True

        def run(self, pixel_values, allowed):
            if self.fail:
                self.fail = False
                raise RuntimeError("device lost")
            return self.inner.run(pixel_values, allowed)

    settings = Settings(artifact=demo_artifact, api_keys=f"{SECRET},other-key", warmup=False, log_level="DEBUG")
    assert SECRET not in repr(settings) and SECRET not in str(settings.model_dump())
    app = create_app(settings, backend=FailingOnce(), configure_logs=True)
    log_capture.attach()  # configure_logs replaced the dapo handlers: add ours back
    bodies = []
    files = [("image", ("x.png", png_bytes(), "image/png"))]
    with TestClient(app, raise_server_exceptions=False) as c:
        for key in (SECRET, NEAR_MISS, SECRET + " ", SECRET.upper()):
            for path, kw in (("/detect", {"files": files}), ("/detect?threshold=7", {"files": files}),
                             ("/detect", {"content": b"x", "headers": {"Content-Type": "text/plain"}})):
                r = c.post(path, headers={"X-API-Key": key, "Idempotency-Key": "idem-1"} | kw.pop("headers", {}),
                           **kw)
                bodies.append(r.text + json.dumps(dict(r.headers)))
            bodies.append(c.get("/v1/model", headers={"X-API-Key": key}).text)
        bodies.append(c.get("/metrics").text)
    logs = log_capture.text()
    assert '"logger": "dapo.access"' in logs and '"status": 401' in logs  # the access log was captured
    assert "inference failed" in logs  # as was the failure path (with its traceback)
    for secret in (SECRET, NEAR_MISS, SECRET.upper(), SECRET[5:]):
        assert secret not in logs
        assert not any(secret in b for b in bodies)


# --- 3. form fields and filenames are never paths ------------------------------------------------
_AUDIT = {"marker": None, "hits": []}


def _audit_hook(event: str, args: tuple) -> None:
    marker = _AUDIT["marker"]
    if marker is None or event not in ("open", "os.listdir", "os.scandir", "os.remove", "os.rename", "os.mkdir",
                                       "shutil.copyfile", "os.chmod", "subprocess.Popen", "os.system"):
        return
    if any(marker in str(a) for a in args):
        _AUDIT["hits"].append((event, args))


def test_form_fields_and_filenames_never_reach_the_filesystem(demo_artifact, tmp_path):
    sys.addaudithook(_audit_hook)  # cannot be removed; inert while marker is None
    marker = "m" + uuid.uuid4().hex
    target = tmp_path / marker
    target.write_text("secret")
    values = [str(target), f"../../{marker}", f"/etc/{marker}/../passwd", f"file://{target}", f"$(cat {target})"]
    app = create_app(Settings(artifact=demo_artifact, warmup=False), configure_logs=False)
    with TestClient(app) as c:
        _AUDIT["marker"], _AUDIT["hits"] = marker, []
        try:
            for v in values:
                r = c.post("/detect?mask_format=png&overlay=true", data={"part_id": v, "station_id": v, "recipe_id": v},
                           files=[("image", (v, png_bytes(), "image/png"))])
                assert r.status_code == 200, r.text
                assert r.json()["results"][0]["part_id"] == v
                assert_envelope(c.post("/detect", data={"product": v}, files=[("image", (v, png_bytes(), "x"))]),
                                {422})
        finally:
            _AUDIT["marker"] = None
    assert not _AUDIT["hits"], _AUDIT["hits"]
    assert target.read_text() == "secret"


# --- 4. limits and auth before the body is read ---------------------------------------------------
async def asgi_call(app, headers: list[tuple[bytes, bytes]], path: str = "/detect") -> tuple[int, bool, bytes]:
    """Call the app with a body that is never sent; return (status, body_was_read, response body)."""
    read = False

    async def receive():
        nonlocal read
        read = True
        return {"type": "http.request", "body": b"x" * 1024, "more_body": True}

    status, chunks = 0, []

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    await asyncio.wait_for(app(scope, receive, send), 10)
    return status, read, b"".join(chunks)


def test_limits_and_auth_are_enforced_before_reading_the_body(demo_artifact):
    app = create_app(Settings(artifact=demo_artifact, api_keys="k1", max_body_bytes=1_000_000, warmup=False),
                     configure_logs=False)
    mp = (b"content-type", b"multipart/form-data; boundary=b")
    with TestClient(app):  # lifespan up; the raw ASGI calls below run on their own loop
        cases = [
            ([(b"content-length", b"1000000000000"), mp, (b"x-api-key", b"k1")], 413),
            ([(b"content-length", b"-5"), mp, (b"x-api-key", b"k1")], 400),
            ([(b"content-length", b"12abc"), mp, (b"x-api-key", b"k1")], 400),
            ([(b"content-length", b"5000"), mp], 401),  # auth first: an anonymous caller uploads nothing
            ([(b"content-length", b"5000"), mp, (b"x-api-key", b"wrong")], 401),
            ([(b"content-length", b"5000"), (b"content-type", b"application/json"), (b"x-api-key", b"k1")], 415),
        ]
        for headers, expected in cases:
            status, read, body = asyncio.run(asgi_call(app, headers))
            assert status == expected, (headers, status, body)
            assert not read, f"{headers}: body was read before answering {status}"
            assert set(json.loads(body)) == {"error"}


def test_oversized_body_without_content_length_is_cut_while_streaming(demo_artifact):
    """Chunked upload (no Content-Length) of up to 100 MB: refused after ~the limit was received.

    Raw ASGI, because TestClient buffers a generator body completely before calling the app."""
    app = create_app(Settings(artifact=demo_artifact, max_body_bytes=100_000, warmup=False), configure_logs=False)
    chunks = {"n": 0}

    async def run() -> tuple[int, bytes]:
        head = b'--b\r\nContent-Disposition: form-data; name="image"; filename="s.png"\r\n\r\n'
        status, out = 0, []

        async def receive():
            chunks["n"] += 1
            if chunks["n"] > 10_000:
                return {"type": "http.request", "body": b"", "more_body": False}
            return {"type": "http.request", "body": head if chunks["n"] == 1 else b"\x00" * 10_000, "more_body": True}

        async def send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                out.append(message.get("body", b""))

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/detect", "raw_path": b"/detect", "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"multipart/form-data; boundary=b"), (b"transfer-encoding", b"chunked")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
        await asyncio.wait_for(app(scope, receive, send), 30)
        return status, b"".join(out)

    with TestClient(app):
        status, body = asyncio.run(run())
    assert status == 413, body
    assert json.loads(body)["error"]["code"] == "payload_too_large"
    assert chunks["n"] <= 12  # 100 KB limit / 10 KB chunks: stopped right after crossing it


# --- 5. CORS off by default -----------------------------------------------------------------------
def test_cors_is_off_by_default(demo_artifact):
    app = create_app(Settings(artifact=demo_artifact, warmup=False), configure_logs=False)
    assert Settings(artifact=demo_artifact).cors_origins == []
    with TestClient(app) as c:
        origin = {"Origin": "http://evil.example"}
        for r in (c.get("/livez", headers=origin), c.get("/v1/model", headers=origin),
                  c.post("/detect", headers=origin, files=[("image", ("x.png", png_bytes(), "image/png"))]),
                  c.options("/detect", headers={**origin, "Access-Control-Request-Method": "POST"})):
            assert not any(h.lower().startswith("access-control-") for h in r.headers), dict(r.headers)


# --- 6. dependencies bounded ------------------------------------------------------------------------
def all_requirements() -> list[tuple[str, str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [("dependencies", r) for r in project.get("dependencies", [])]
    for extra, items in project.get("optional-dependencies", {}).items():
        reqs += [(f"[{extra}]", r) for r in items]
    return reqs


def test_every_dependency_has_a_lower_and_an_upper_bound():
    problems = []
    reqs = all_requirements()
    assert len(reqs) > 10
    for where, text in reqs:
        req = Requirement(text)
        if req.name.replace("_", "-").lower() == "dapo-inspect":  # self-references between extras
            continue
        ops = {spec.operator for spec in req.specifier}
        lower = ops & {">=", ">", "~=", "=="}
        upper = ops & {"<", "<=", "~=", "=="}
        if not lower or not upper:
            problems.append(f"{where}: {text!r} needs a lower (>=) and an upper (<) bound")
    assert not problems, problems
