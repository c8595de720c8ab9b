"""Reference banks per product: built by `dapo calibrate --references`, verified like every
artifact file, fused when serving, off with references=false (service.runtime.references)."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.runtime.artifact import ArtifactError, load_manifest
from service.runtime.backends.torch_backend import TorchSearch
from service.runtime.detector import Detector
from service.runtime.references import FUSED_SCALE, OrtSearch, squash
from service.server.app import create_app
from service.server.settings import Settings
from training.references import (
    ReferenceOptions,
    greedy_coreset,
    product_references,
    search_for,
)

K = 4
LIMIT = 120  # below 4 x 49 patches of the tiny 7x7 grid: the coreset must act


def wood(textures: Path, kind: str = "good") -> list[Path]:
    return sorted((textures / "wood" / kind).glob("*.png"))


@pytest.fixture(scope="module")
def banked(demo_artifact, textures, tmp_path_factory) -> Path:
    """A copy of the demo artifact with a wood bank, made by the CLI as a user would."""
    folder = tmp_path_factory.mktemp("banked") / "art"
    shutil.copytree(demo_artifact, folder)
    data = tmp_path_factory.mktemp("good")
    (data / "wood" / "good").mkdir(parents=True)
    for p in wood(textures)[:8]:
        shutil.copy(p, data / "wood" / "good" / p.name)
    run = subprocess.run([sys.executable, "-m", "service.cli", "calibrate", "--artifact", str(folder), "--data",
                          str(data), "--layout", "folder", "--references", str(K), "--coreset-limit", str(LIMIT)],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    table = json.loads(run.stdout)
    assert table["wood"]["references"] == K and table["wood"]["images"] == 8 and table["wood"]["bank_patches"] == LIMIT
    return folder


def images(textures: Path) -> list[Image.Image]:
    paths = wood(textures, "scratch") + wood(textures)[8:12]
    return [Image.open(p).convert("RGB") for p in paths]


def test_bank_is_an_artifact_file_with_its_sha256_and_the_product_is_added(banked, demo_artifact):
    m = load_manifest(banked)
    info = m.products["wood"].references
    assert "wood" not in load_manifest(demo_artifact).products  # calibrate added the product
    assert info is not None and info.file in m.files and (banked / info.file).is_file()
    assert info.images == K and info.patches == LIMIT and m.schema_version == 3
    assert 0.0 < m.products["wood"].image_threshold < 1.0 and m.products["wood"].pixel_threshold is not None


def test_a_tampered_bank_refuses_to_load_naming_the_file(banked, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(banked, bad)
    bank = bad / load_manifest(banked).products["wood"].references.file
    data = bytearray(bank.read_bytes())
    data[-5] ^= 0xFF  # same size: only the sha256 can tell
    bank.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"wood\.safetensors: sha256 .* refusing to load"):
        Detector.load(bad)
    bank.unlink()
    with pytest.raises(ArtifactError, match="wood.safetensors: file listed in the manifest is missing"):
        Detector.load(bad)


def test_references_false_gives_the_scores_and_maps_of_the_artifact_without_a_bank(banked, demo_artifact, textures):
    with_bank, without = Detector.load(banked), Detector.load(demo_artifact)
    imgs = images(textures)
    off = with_bank.predict(imgs, with_bank.policy("wood", references=False))
    plain = without.predict(imgs, without.policy())
    on = with_bank.predict(imgs, with_bank.policy("wood"))
    for a, b in zip(off, plain, strict=True):
        assert a.scores.anomaly_score == b.scores.anomaly_score
        np.testing.assert_array_equal(a.scores.anomaly_map, b.scores.anomaly_map)
        np.testing.assert_array_equal(a.scores.type_scores, b.scores.type_scores)
    # and with the bank the answer does change (so the comparison above can fail)
    assert any(abs(a.scores.anomaly_score - b.scores.anomaly_score) > 1e-3 for a, b in zip(on, off))


def test_fused_scores_rank_scratches_above_fresh_good_parts(banked, textures):
    det = Detector.load(banked)
    n_bad = len(wood(textures, "scratch"))
    scores = [r.scores.anomaly_score for r in det.predict(images(textures), det.policy("wood"))]
    bad, good = scores[:n_bad], scores[n_bad:]
    assert min(bad) > max(good), (bad, good)


def test_a_reference_never_scores_itself_at_zero(banked, textures):
    det = Detector.load(banked)
    imgs = [Image.open(p).convert("RGB") for p in wood(textures)[:K]]
    built = product_references(det, search_for(det), imgs, ReferenceOptions(K, coreset_limit=LIMIT))
    assert len(built.branches) == K
    for b in built.branches:  # leave-one-out: each reference against the others
        assert b.nn_global > 1e-4 and b.nn_patch_max > 1e-4 and float(b.nn_map.min()) > 0.0
    # against the whole bank, which holds its own patches, a reference's global distance is zero
    whole = det.references.branches(det.infer(np.stack([det.pixel_values(imgs[0])]), np.ones((1, len(det.class_names)), bool),
                                              features=True), det.references.banks["wood"], "global")
    assert whole.nn_global < 1e-3


def test_one_reference_uses_its_mirror_for_the_statistics(banked, textures):
    det = Detector.load(banked)
    imgs = [Image.open(p).convert("RGB") for p in wood(textures)[:3]]
    built = product_references(det, search_for(det), imgs, ReferenceOptions(1))
    assert built.bank.info.images == 1 and len(built.branches) == 2 + 2  # the image and its mirror, then 2 others
    assert built.bank.info.nn_global.std > 0 and built.bank.info.nn_patch_max.mean > 0


def nearest_distance(query: np.ndarray, bank: np.ndarray) -> float:
    """An independent nearest-neighbour distance, in float64."""
    return float(np.sqrt(((bank.astype(np.float64) - query.astype(np.float64)) ** 2).sum(1)).min())


def test_the_global_branch_searches_the_mean_of_the_patch_features(banked, textures):
    """What `dapo calibrate --references` writes by default: the bank's globals are each
    reference's L2-normalised mean patch feature, and a served image is searched with its own."""
    det = Detector.load(banked)
    bank = det.references.banks["wood"]
    assert bank.info.global_feature == "patch_mean"
    allowed = np.ones((1, len(det.class_names)), bool)
    refs = [Image.open(p).convert("RGB") for p in wood(textures)[:K]]
    for img, stored in zip(refs, bank.globals, strict=True):
        out = det.infer(det.pixel_values(img)[None], allowed, features=True)
        mean = out.patch_features[0].astype(np.float64).mean(0)
        np.testing.assert_allclose(stored, mean / np.linalg.norm(mean), atol=1e-5)
    probe = images(textures)[0]
    out = det.infer(det.pixel_values(probe)[None], allowed, features=True)
    mean = out.patch_features[0].astype(np.float64).mean(0)
    served = det.references.branches(out, bank, "global").nn_global
    assert served == pytest.approx(nearest_distance(mean / np.linalg.norm(mean), bank.globals), abs=1e-4)
    assert served > 1e-3  # a scratched image is not one of the references


def test_a_bank_written_before_the_descriptor_field_is_searched_with_the_class_token(banked, tmp_path, textures):
    """Manifests without `global_feature` hold class-token banks (built before the descriptor was
    measured): they are served as built; a patch-mean manifest over such a bank is refused."""
    old = tmp_path / "old"
    shutil.copytree(banked, old)
    data = tmp_path / "good"
    (data / "wood" / "good").mkdir(parents=True)
    for p in wood(textures)[:6]:
        shutil.copy(p, data / "wood" / "good" / p.name)
    run = subprocess.run([sys.executable, "-m", "service.cli", "calibrate", "--artifact", str(old), "--data", str(data),
                          "--layout", "folder", "--references", str(K), "--global-feature", "class_token"],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    manifest = json.loads((old / "manifest.json").read_text())
    assert manifest["products"]["wood"]["references"].pop("global_feature") == "class_token"
    (old / "manifest.json").write_text(json.dumps(manifest))
    det = Detector.load(old)
    bank = det.references.banks["wood"]
    assert bank.info.global_feature == "class_token"
    out = det.infer(det.pixel_values(images(textures)[0])[None], np.ones((1, len(det.class_names)), bool),
                    features=True)
    served = det.references.branches(out, bank, "global").nn_global
    assert served == pytest.approx(nearest_distance(out.global_feature[0], bank.globals), abs=1e-4)
    manifest["products"]["wood"]["references"]["global_feature"] = "patch_mean"  # a wrong manifest
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="are not patch means"):
        Detector.load(old)


def test_greedy_coreset_bounds_the_bank_and_covers_it_better_than_chance():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (400, 16)), rng.normal(8, 0.1, (5, 16))]).astype(np.float32)
    keep = greedy_coreset(x, 20, projection=16)
    assert len(keep) == 20 and len(set(keep)) == 20

    def radius(idx):
        return np.sqrt(((x[:, None] - x[idx][None]) ** 2).sum(-1)).min(1).max()

    random = [radius(rng.choice(len(x), 20, replace=False)) for _ in range(20)]
    assert radius(keep) < np.median(random) / 3  # random subsets mostly miss the far cluster
    assert any(k >= 400 for k in keep)  # the small far cluster is covered
    assert len(greedy_coreset(x, 1000)) == len(x)


def test_search_graph_and_torch_search_match_brute_force():
    rng = np.random.default_rng(1)
    q, b = rng.standard_normal((2, 49, 24), np.float32), rng.standard_normal((30, 24), np.float32)
    g, gb = rng.standard_normal((2, 8), np.float32), rng.standard_normal((3, 8), np.float32)
    d = np.sqrt(((q[:, :, None] - b[None, None]) ** 2).sum(-1)).min(-1)
    gd = np.sqrt(((g[:, None] - gb[None]) ** 2).sum(-1)).min(-1)
    for search in (OrtSearch(["CPUExecutionProvider"], 7, 112), TorchSearch("cpu", 7, 112)):
        pm, mx, gdist = search(q, b, g, gb)
        np.testing.assert_allclose(mx, d.max(-1), atol=1e-4)
        np.testing.assert_allclose(gdist, gd, atol=1e-4)
        np.testing.assert_allclose(pm[:, 0, 0], d[:, 0], atol=1e-4)  # align_corners: corners are patch values
        np.testing.assert_allclose(pm[:, -1, -1], d[:, -1], atol=1e-4)
        assert pm.shape == (2, 112, 112)


def test_torch_backend_fuses_like_onnxruntime(banked, textures):
    from service.runtime.detector import RuntimeOptions

    imgs = images(textures)[:3]
    a, b = Detector.load(banked), Detector.load(banked, RuntimeOptions(backend="torch", device="cpu"))
    for x, y in zip(a.predict(imgs, a.policy("wood")), b.predict(imgs, b.policy("wood"))):
        assert abs(x.scores.anomaly_score - y.scores.anomaly_score) < 1e-3
        assert np.abs(x.scores.anomaly_map - y.scores.anomaly_map).max() < 1e-3


def detect_on_and_off(artifact: Path, textures: Path, max_batch_size: int = 1) -> tuple[dict, dict, dict, dict]:
    """/detect of a wood scratch with the product's bank, with references=false, without a
    product; and /v1/model (the real app in process)."""
    buf = io.BytesIO()
    Image.open(wood(textures, "scratch")[0]).save(buf, "PNG")
    files = [("image", ("s.png", buf.getvalue(), "image/png"))]
    settings = Settings(artifact=artifact, max_batch_size=max_batch_size, max_queue_delay_ms=0, log_level="WARNING")
    with TestClient(create_app(settings, configure_logs=False)) as client:
        on = client.post("/detect", files=files, data={"product": "wood"}).json()["results"][0]
        off = client.post("/detect?references=false", files=files, data={"product": "wood"}).json()["results"][0]
        none = client.post("/detect", files=files).json()["results"][0]
        info = client.get("/v1/model").json()
    return on, off, none, info


def test_detect_says_whether_references_were_used_and_model_lists_bank_sizes(banked, textures):
    on, off, none, info = detect_on_and_off(banked, textures)
    assert on["references_used"] is True and off["references_used"] is False and none["references_used"] is False
    assert on["anomaly_score"] != off["anomaly_score"]
    assert info["products"]["wood"]["references"] == {"images": K, "patches": LIMIT}


@pytest.mark.parametrize("kind", ["softsign", "sigmoid"])
def test_squash_is_monotone_and_centred(kind):
    z = np.array([-10.0, 0.0, 2.0, 30.0])
    s = squash(z, kind)
    assert s[1] == 0.5 and np.all(np.diff(s) > 0) and s[-1] < 1.0 and s[0] > 0.0


def test_the_softsign_squash_keeps_far_out_pixels_apart_in_a_float32_map():
    """Why new banks squash by softsign: DAPO's map has a tiny std on good parts, so defect pixels
    reach z of hundreds; a sigmoid makes them all exactly 1.0 in the float32 map (ties that cost
    pixel AUROC), softsign keeps their order."""
    z = np.array([50.0, 100.0, 1000.0, 10000.0])
    assert np.all(np.diff(squash(z, "softsign").astype(np.float32)) > 0)
    assert np.all(squash(z, "sigmoid").astype(np.float32)[1:] == 1.0)
    with pytest.raises(ValueError, match="unknown squash"):
        squash(z, "tanh")


def test_a_bank_written_before_the_squash_field_is_served_with_the_sigmoid(banked, tmp_path, textures):
    """New banks say softsign; a manifest without the field (its thresholds were quantiles of
    sigmoid-squashed scores) is served with the sigmoid: the same fused z, squashed as it was built."""
    new = Detector.load(banked)
    assert new.references.banks["wood"].info.squash == "softsign"
    old = tmp_path / "old"
    shutil.copytree(banked, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["products"]["wood"]["references"].pop("squash")
    (old / "manifest.json").write_text(json.dumps(manifest))
    det = Detector.load(old)
    assert det.references.banks["wood"].info.squash == "sigmoid"
    imgs = images(textures)
    a = new.predict(imgs, new.policy("wood"))
    b = det.predict(imgs, det.policy("wood"))
    for x, y in zip(a, b, strict=True):  # one fused z behind both: invert each squash
        u = 2.0 * x.scores.anomaly_score - 1.0
        z_soft = FUSED_SCALE * u / (1.0 - abs(u))
        z_sig = FUSED_SCALE * np.log(y.scores.anomaly_score / (1.0 - y.scores.anomaly_score))
        assert z_soft == pytest.approx(z_sig, rel=1e-6, abs=1e-6)


def test_a_schema_2_manifest_is_upgraded_to_products_without_references(demo_artifact, tmp_path):
    folder = tmp_path / "v2"
    shutil.copytree(demo_artifact, folder)
    data = json.loads((folder / "manifest.json").read_text())
    data["schema_version"] = 2
    for product in data["products"].values():
        product.pop("references", None)
    (folder / "manifest.json").write_text(json.dumps(data))
    m = load_manifest(folder)
    assert m.schema_version == 3 and all(p.references is None for p in m.products.values())
    assert not Detector.load(folder).references


def test_eval_few_shot_reports_each_branch_and_the_fusion(banked, textures, tmp_path):
    out = tmp_path / "fs.json"
    run = subprocess.run([sys.executable, "-m", "service.cli", "eval", "--artifact", str(banked), "--data",
                          str(textures), "--layout", "folder", "--references", "0,2", "--quiet", "--json", str(out)],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    table = json.loads(out.read_text())["table"]
    assert set(table) == {"0", "2"} and set(table["0"]) == {"dapo"}
    assert set(table["2"]) == {"dapo", "nn_patch", "nn_global", "fused_max", "fused_mean"}
    assert 0.0 <= table["2"]["fused_max"]["image_auroc"] <= 1.0
    assert "fused_max" in run.stdout


def test_hot_reload_verifies_a_bank_like_every_file(banked, demo_artifact, textures, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(banked, bad)
    bank = bad / "references" / "wood.safetensors"
    data = bytearray(bank.read_bytes())
    data[-5] ^= 0xFF
    bank.write_bytes(bytes(data))
    admin = {"X-API-Key": "admin-key-for-references"}
    buf = io.BytesIO()
    Image.open(wood(textures, "scratch")[0]).save(buf, "PNG")
    files = [("image", ("s.png", buf.getvalue(), "image/png"))]
    settings = Settings(artifact=demo_artifact, max_batch_size=1, max_queue_delay_ms=0, log_level="WARNING",
                        admin_keys=[admin["X-API-Key"]])
    with TestClient(create_app(settings, configure_logs=False)) as client:
        r = client.post("/v1/model/reload", headers=admin, json={"artifact": str(bad)})
        assert r.status_code == 422 and "wood.safetensors" in r.json()["error"]["message"]
        r = client.post("/v1/model/reload", headers=admin, json={"artifact": str(banked)})
        assert r.status_code == 200, r.text
        result = client.post("/detect", files=files, data={"product": "wood"}, headers=admin).json()
    assert result["results"][0]["references_used"] is True
