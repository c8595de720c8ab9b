"""The layering is real: import-linter's contracts hold (and catch a violation), and the serving
commands start without importing `training/` or torch."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports")
needs_linter = pytest.mark.skipif(LINT is None, reason="import-linter not installed (the dev extra has it)")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the packages under `root`, with `root`'s pyproject contracts."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


@needs_linter
def test_the_import_contracts_hold():
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "service must not import training KEPT" in proc.stdout
    assert "runtime must not import the HTTP layer (nor FastAPI, Starlette, uvicorn) KEPT" in proc.stdout
    assert "Contracts: 6 kept, 0 broken." in proc.stdout


@needs_linter
@pytest.mark.parametrize("module, line, contract", [
    ("service/runtime/scoring.py", "import training.metrics", "service must not import training"),
    ("service/runtime/postprocess.py", "from fastapi import HTTPException",
     "runtime must not import the HTTP layer (nor FastAPI, Starlette, uvicorn)"),
    ("service/runtime/imaging.py", "from service.server.settings import Settings",
     "runtime must not import the HTTP layer (nor FastAPI, Starlette, uvicorn)"),
    ("training/evaluate.py", "from service.server.app import create_app",
     "training uses the runtime, never the HTTP layer"),
    ("service/server/routes.py", "import torch", "serving code imports torch only in the torch backend"),
    ("service/server/line/samples.py", "from service.server.batching import QueueFull",
     "the line loop never imports the compute path"),
])
def test_a_planted_violation_breaks_its_contract(tmp_path, module, line, contract):
    """The same contracts on a copy of the tree with one forbidden import added."""
    for name in ("service", "training"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # planted\n")
    proc = lint_imports(tmp_path)
    assert proc.returncode != 0, proc.stdout
    assert f"{contract} BROKEN" in proc.stdout, proc.stdout
    assert f"{module[:-3].replace('/', '.')} ->" in proc.stdout  # the report names the offending module


# --- the CLI in a fresh interpreter --------------------------------------------------------
PROBE = """
import json, sys
from service.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('training', 'torch', 'open_clip'))
print('\\nLOADED ' + json.dumps(loaded))
"""


def modules_loaded_by(*argv: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "usage: dapo" in proc.stdout, proc.stdout  # the help really was printed
    return json.loads(proc.stdout.rsplit("LOADED ", 1)[1])


@pytest.mark.parametrize("argv", [("serve", "--help"), ("detect", "--help"), ("--help",)])
def test_serving_commands_import_neither_training_nor_torch(argv):
    assert modules_loaded_by(*argv) == []


def test_the_probe_sees_a_training_subcommand_load_training():
    """The same probe on `dapo bake --help` does see training/ (so the check above can fail);
    the argument adders still need no torch."""
    loaded = modules_loaded_by("bake", "--help")
    assert "training.commands" in loaded and not [m for m in loaded if m.split(".")[0] == "torch"]
