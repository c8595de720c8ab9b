"""`dapo ensure-artifact` (compose's one-shot `init`): a verified artifact is kept untouched, a
missing one is built from its recipe, a corrupt one is refused (naming the file), and a build
that cannot fetch its weights fails with advice and leaves nothing behind."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import main
from service.runtime.artifact import load_manifest, sha256_file

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file's sha256 and mtime: 'untouched' means exactly these."""
    return {p.name: (sha256_file(p), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def ensure_cli(capsys, *argv: str) -> tuple[int, dict | None, str]:
    rc = main(["ensure-artifact", *argv])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if out.strip() else None), err


def test_present_and_verified_is_left_alone(demo_artifact, tmp_path, capsys):
    folder = tmp_path / "models" / "demo"
    shutil.copytree(demo_artifact, folder)
    before = snapshot(folder)
    rc, out, err = ensure_cli(capsys, str(folder))
    assert rc == 0, err
    assert out["action"] == "present" and out["name"] == "dapo-demo"
    assert snapshot(folder) == before


def test_corrupt_is_refused_naming_the_file_then_force_rebuilds(demo_artifact, tmp_path, capsys):
    folder = tmp_path / "models" / "demo"
    shutil.copytree(demo_artifact, folder)
    onnx = folder / "encoder.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped: only the sha256 can tell
    onnx.write_bytes(bytes(data))
    before = snapshot(folder)

    rc, out, err = ensure_cli(capsys, str(folder))
    assert rc == 1 and out is None
    assert "encoder.onnx" in err and "sha256" in err and "--force" in err
    assert snapshot(folder) == before  # never silently replaced

    rc, out, err = ensure_cli(capsys, str(folder), "--force")
    assert rc == 0, err
    assert out["action"] == "built"
    load_manifest(folder, verify=True)  # every sha256 matches again
    assert sorted(p.name for p in folder.parent.iterdir()) == ["demo"]  # no temporary folder left


def test_missing_demo_is_built_over_an_empty_bind_mount_leftover(tmp_path, capsys):
    folder = tmp_path / "models" / "demo"
    folder.mkdir(parents=True)  # what Docker leaves when it bind-mounts a path that did not exist
    rc, out, err = ensure_cli(capsys, str(folder))
    assert rc == 0, err
    assert out["action"] == "built" and out["name"] == "dapo-demo"
    manifest = load_manifest(folder, verify=True)
    assert manifest.provenance["kind"] == "demo"
    # the serving container runs as another uid than the one that baked: everything readable
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o644}
    assert sorted(p.name for p in folder.parent.iterdir()) == ["demo"]

    rc, out, _ = ensure_cli(capsys, str(folder))  # the next `compose up`: verified, not rebuilt
    assert rc == 0 and out["action"] == "present"


def test_missing_without_a_recipe_says_how_to_make_it(tmp_path, capsys):
    folder = tmp_path / "models" / "mvtec-v2"
    rc, out, err = ensure_cli(capsys, str(folder))
    assert rc == 1 and out is None
    assert "no recipe" in err and "--checkpoint" in err and "/models/mvtec-v2" in err
    assert not folder.exists()
    rc, _, err = ensure_cli(capsys, str(tmp_path / "models" / "demo"), "--recipe", "none")
    assert rc == 1 and "no artifact" in err


def test_baseline_without_network_fails_with_advice_and_leaves_nothing(tmp_path):
    """The real recipe (OpenAI ViT-L/14@336), with the Hugging Face hub unreachable and an empty
    cache: the weights fetch fails first, within seconds, and the models folder stays empty."""
    models = tmp_path / "models"
    models.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "service.cli", "ensure-artifact", str(models / "baseline")],
                          cwd=tmp_path, env=env, check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "cannot download the ViT-L-14-336-quickgelu/openai weights" in proc.stderr
    assert "DAPO_ARTIFACT_NAME=demo" in proc.stderr and "model_artifacts/" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(models.iterdir()) == []


@pytest.mark.parametrize("name", ["demo", "baseline", "dapo-mvtec"])
def test_recipe_is_chosen_by_folder_name(name):
    from training.provision import RECIPES, recipe_for

    chosen = recipe_for(Path("/models") / name)
    assert chosen is RECIPES.get(name)
