"""The synthetic data set: deterministic by seed, every defect type present, masks that match
their images, splits for distribution shift and zero-shot defects, readable by the loaders."""
import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from training.data import AnomalyDataset, load_folder
from training.synth import (
    DEFECTS, PRODUCT_MAKERS, PRODUCTS, _rng, generate, load_split, render, synth_main,
)

SMALL = dict(n_per_class=2, size=48, products=["wood", "metal", "disc"], defects=list(DEFECTS),
             holdout_product="metal", holdout_defect="crack")


def digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, seed=7, **SMALL)
    return root


def test_deterministic_by_seed(synth_root, tmp_path):
    generate(tmp_path / "again", seed=7, **SMALL)
    assert digest(tmp_path / "again") == digest(synth_root)
    generate(tmp_path / "other", seed=8, **SMALL)
    assert digest(tmp_path / "other") != digest(synth_root)
    # a product's images do not depend on which other products are generated
    a, ma = render("disc", "hole", 7, 1, 48)
    b = np.asarray(Image.open(synth_root / "disc" / "hole" / "001.png"))
    np.testing.assert_array_equal(a, b)


def test_all_defect_types_present_with_matching_masks(synth_root):
    for product in SMALL["products"]:
        for defect in DEFECTS:
            if product == "metal" and defect == "crack":
                assert not (synth_root / product / defect).exists()
                continue
            imgs = sorted((synth_root / product / defect).glob("*.png"))
            assert len(imgs) == 2, (product, defect)
            for p in imgs:
                m = synth_root / product / "ground_truth" / defect / f"{p.stem}_mask.png"
                im, mk = Image.open(p), Image.open(m)
                assert im.size == mk.size == (48, 48) and im.mode == "RGB" and mk.mode == "L"
                arr = np.asarray(mk)
                assert set(np.unique(arr)) == {0, 255}
        assert len(list((synth_root / product / "good").glob("*.png"))) == 4


@pytest.mark.parametrize("product", PRODUCTS)
def test_defect_changes_exactly_the_masked_pixels(product):
    # re-render the defect-free base from the same generator: the defect touches only masked
    # pixels, and visibly changes every one of them
    for defect in DEFECTS:
        img, mask = render(product, defect, 3, 0, 40)
        base, _, _ = PRODUCT_MAKERS[product](_rng(3, product, defect, 0), 40)
        base = (np.clip(np.clip(base, 0, 1).astype(np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
        diff = np.abs(img.astype(int) - base.astype(int)).max(-1)
        assert mask.sum() >= 4, (product, defect)
        assert (diff[~mask] == 0).all(), (product, defect)
        assert (diff[mask] > 2).mean() > 0.9, (product, defect)


def test_splits(synth_root):
    info = json.loads((synth_root / "splits.json").read_text())
    sp = info["splits"]
    assert info["vocabulary"][0] == "normal" and info["vocabulary"][1:] == list(DEFECTS)
    assert sp["train"]["products"] == ["wood", "disc"] and "crack" not in sp["train"]["defects"]
    assert sp["test_shift"]["products"] == ["metal"]
    assert sp["test_zeroshot"]["defects"] == ["crack"]
    train, shift, zero = (load_split(synth_root, k) for k in ("train", "test_shift", "test_zeroshot"))
    assert {s.product for s in train} == {"wood", "disc"}
    assert {s.defect for s in train} == set(DEFECTS) - {"crack"} | {None}
    assert {s.product for s in shift} == {"metal"} and "crack" not in {s.defect for s in shift}
    assert {s.defect for s in zero} == {"crack", None} and {s.product for s in zero} == {"wood", "disc"}
    # no image in two splits; goods split in halves
    files = [set(map(str, (s.image for s in x))) for x in (train, shift, zero)]
    assert not (files[0] & files[1] or files[0] & files[2] or files[1] & files[2])
    assert sum(s.label == 0 for s in train) == 4 and sum(s.label == 0 for s in zero) == 4
    # class ids are the full vocabulary's in every split
    crack_id = info["vocabulary"].index("crack")
    assert {s.class_id for s in zero if s.label} == {crack_id}
    assert {s.class_id for s in train if s.defect == "hole"} == {info["vocabulary"].index("hole")}
    # the folder loader reads the whole tree, and the Dataset produces matching class masks
    assert len(load_folder(synth_root)) == sum(len(v["files"]) for v in sp.values())
    ds = AnomalyDataset([s for s in zero if s.label][:1], size=48, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    _, cm, label, has = ds[0]
    assert int(label) == 1 and bool(has) and set(cm.unique().tolist()) <= {0, crack_id}
    assert (cm == crack_id).any()


def test_generate_validation_and_cli(tmp_path, capsys):
    with pytest.raises(ValueError):
        generate(tmp_path / "a", products=["wood", "nope"])
    with pytest.raises(ValueError):
        generate(tmp_path / "b", products=["wood", "disc"], holdout_product="metal")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("x")
    with pytest.raises(FileExistsError):
        generate(tmp_path / "c")
    assert synth_main(["--out", str(tmp_path / "d"), "--seed", "1", "--n-per-class", "1",
                       "--size", "32", "--products", "fabric,plate", "--defects", "hole,scratch",
                       "--holdout-product", "none", "--holdout-defect", "scratch"]) == 0
    info = json.loads((tmp_path / "d" / "splits.json").read_text())
    assert info["splits"]["test_shift"]["files"] == []
    assert len(info["splits"]["test_zeroshot"]["files"]) == 2 + 2  # 1 scratch + 1 good per product
    assert "wrote" in capsys.readouterr().out
    # overwrite regenerates in place
    assert synth_main(["--out", str(tmp_path / "d"), "--n-per-class", "1", "--size", "32",
                       "--products", "fabric,plate", "--defects", "hole,scratch", "--holdout-product",
                       "none", "--holdout-defect", "none", "--overwrite"]) == 0
    assert json.loads((tmp_path / "d" / "splits.json").read_text())["splits"]["test_zeroshot"]["files"] == []
