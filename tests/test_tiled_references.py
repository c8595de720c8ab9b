"""A tiled product's reference bank (issue 23, item 2): built from its good parts' tiles by
`dapo calibrate --tile PX --references K`, refused when the product's tiling no longer matches it,
fused on the stitched map when serving, off with references=false, leave-one-out in calibration."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_references import detect_on_and_off  # the tests import each other flat

from service.runtime.artifact import Tiling, read_manifest, write_manifest
from service.runtime.detector import Detector, ImageLimits, Upload
from training.references import (
    ReferenceOptions,
    encode_good,
    image_branches,
    product_references,
    reference_policy,
    search_for,
)

K = 4
TILE = 32  # the textures are 64 px: 2 x 2 tiles, each seen at the encoder's S
LIMIT = 150  # below 4 images x 4 tiles x 49 patches: the coreset must act
LIMITS = ImageLimits(max_pixels=1 << 24, max_side=1 << 14)


def wood(textures: Path, kind: str = "good") -> list[Path]:
    return sorted((textures / "wood" / kind).glob("*.png"))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def good_dir(textures, tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("good")
    (data / "wood" / "good").mkdir(parents=True)
    for p in wood(textures)[:8]:
        shutil.copy(p, data / "wood" / "good" / p.name)
    return data


@pytest.fixture(scope="module")
def tiled_banked(demo_artifact, good_dir, tmp_path_factory) -> Path:
    """The demo artifact with a tiled wood product and its bank of tiles, made by the CLI."""
    folder = tmp_path_factory.mktemp("tiled-banked") / "art"
    shutil.copytree(demo_artifact, folder)
    run = cli("calibrate", "--artifact", str(folder), "--data", str(good_dir), "--layout", "folder",
              "--references", str(K), "--coreset-limit", str(LIMIT), "--tile", str(TILE))
    assert run.returncode == 0, run.stderr
    table = json.loads(run.stdout)
    assert table["wood"]["tiling"] == Tiling(tile=TILE).model_dump()
    assert table["wood"]["references"] == K and table["wood"]["bank_patches"] == LIMIT
    return folder


def uploads(textures: Path) -> list[Upload]:
    paths = wood(textures, "scratch") + wood(textures)[8:12]
    return [Upload(p.name, p.read_bytes()) for p in paths]


def without_bank(folder: Path, dest: Path) -> Path:
    """The same artifact, the same tiling, no bank (its file unlisted and removed)."""
    shutil.copytree(folder, dest)
    manifest = read_manifest(dest)
    info = manifest.products["wood"].references
    manifest.files.pop(info.file)
    (dest / info.file).unlink()
    manifest.products["wood"] = manifest.products["wood"].model_copy(update={"references": None})
    write_manifest(dest, manifest)
    return dest


def test_the_bank_is_built_from_tiles_and_the_product_keeps_its_tiling(tiled_banked):
    m = read_manifest(tiled_banked)
    wood_entry = m.products["wood"]
    assert wood_entry.tiling == Tiling(tile=TILE)
    assert wood_entry.references.tile == TILE and wood_entry.references.patches == LIMIT
    assert m.provenance["calibration"]["tiling"] == Tiling(tile=TILE).model_dump()
    assert Detector.load(tiled_banked).references.banks["wood"].patches.shape[0] == LIMIT


@pytest.mark.parametrize("tiling", [Tiling(tile=48), None])
def test_a_bank_whose_tiling_no_longer_matches_refuses_to_load(tiled_banked, tmp_path, tiling):
    folder = tmp_path / "changed"
    shutil.copytree(tiled_banked, folder)
    manifest = read_manifest(folder)
    manifest.products["wood"] = manifest.products["wood"].model_copy(update={"tiling": tiling})
    write_manifest(folder, manifest)
    with pytest.raises(ValueError, match=r"'wood'.*built from tiles of 32 px.*calibrate --references again"):
        Detector.load(folder)


def test_references_false_gives_the_tiled_answer_of_the_artifact_without_a_bank(tiled_banked, textures, tmp_path):
    banked, plain = Detector.load(tiled_banked), Detector.load(without_bank(tiled_banked, tmp_path / "plain"))
    items = uploads(textures)
    on = banked.predict(items, banked.policy("wood"), limits=LIMITS)
    off = banked.predict(items, banked.policy("wood", references=False), limits=LIMITS)
    alone = plain.predict(items, plain.policy("wood"), limits=LIMITS)
    side = round(64 * 112 / TILE)  # stitched at the tiles' map density
    for a, b in zip(off, alone, strict=True):
        assert a.scores.anomaly_score == b.scores.anomaly_score
        assert a.scores.anomaly_map.shape == (side, side)
        np.testing.assert_array_equal(a.scores.anomaly_map, b.scores.anomaly_map)
    assert all(r.scores.anomaly_map.shape == (side, side) for r in on)
    assert any(abs(a.scores.anomaly_score - b.scores.anomaly_score) > 1e-3 for a, b in zip(on, off))


def test_detect_on_a_tiled_product_says_references_were_used(tiled_banked, textures):
    on, off, none, info = detect_on_and_off(tiled_banked, textures, max_batch_size=4)
    assert on["references_used"] is True and off["references_used"] is False and none["references_used"] is False
    assert on["anomaly_score"] != off["anomaly_score"]
    assert info["products"]["wood"]["references"] == {"images": K, "patches": LIMIT}


def test_a_tiled_reference_never_scores_itself_at_zero(tiled_banked, good_dir):
    det = Detector.load(tiled_banked)
    opts = ReferenceOptions(K, coreset_limit=LIMIT, tiling=Tiling(tile=TILE))
    encoded = encode_good(det, wood(good_dir)[:K], opts)
    assert all(len(e.outputs) == 1 + 4 for e in encoded)  # the whole image, then its 2 x 2 tiles
    built = product_references(det, search_for(det), wood(good_dir)[:K], opts, encoded=encoded)
    assert len(built.branches) == K
    for b in built.branches:  # each reference's tiles against the other references' tiles
        assert b.nn_global > 1e-4 and b.nn_patch_max > 1e-4 and float(b.nn_map.min()) > 0.0
    # against the whole bank (which holds its own tiles' patches) its distances collapse
    whole = image_branches(det, det.references, encoded[0], det.references.banks["wood"],
                           reference_policy(det, opts.tiling))
    assert whole.nn_global < 1e-3 and whole.nn_patch_max < built.branches[0].nn_patch_max


def test_a_plain_calibration_of_a_banked_product_is_refused_and_changes_nothing(tiled_banked, good_dir, tmp_path):
    folder = tmp_path / "art"
    shutil.copytree(tiled_banked, folder)
    before = (folder / "manifest.json").read_bytes()
    run = cli("calibrate", "--artifact", str(folder), "--data", str(good_dir), "--layout", "folder")
    assert run.returncode != 0 and "calibrate it with --references 4" in run.stderr
    assert (folder / "manifest.json").read_bytes() == before


def test_eval_few_shot_runs_through_the_tiled_path(demo_artifact, textures, tmp_path):
    out = tmp_path / "fs.json"
    run = cli("eval", "--artifact", str(demo_artifact), "--data", str(textures), "--layout", "folder",
              "--references", "0,2", "--tile", str(TILE), "--map-size", "64", "--quiet", "--json", str(out))
    assert run.returncode == 0, run.stderr
    table = json.loads(out.read_text())["table"]
    assert set(table) == {"0", "2"} and set(table["2"]) == {"dapo", "nn_patch", "nn_global", "fused_max", "fused_mean"}
    assert 0.0 <= table["2"]["fused_max"]["image_auroc"] <= 1.0
    refused = cli("eval", "--artifact", str(demo_artifact), "--data", str(textures), "--layout", "folder",
                  "--tile", str(TILE))
    assert refused.returncode != 0 and "--tile applies to the few-shot protocol" in refused.stderr
