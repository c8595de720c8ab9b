"""Each layout loader on a tiny tree built in tmp_path, plus the bad-layout errors."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data import (
    UNKNOWN_DEFECT, DataLayoutError, UnmappedNameError, load_dataset, load_folder, load_mad,
    load_meta_json, load_mpdd, load_mvtec, load_realiad, load_visa, product_defects,
    vocabulary_for, with_vocabulary,
)
from training.data.vocab import Vocabulary


def png(path: Path, size=(8, 6), value=128, mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    if mode == "RGB":
        arr = np.full((h, w, 3), value, np.uint8)
    else:
        arr = np.full((h, w), value, np.uint8)
    Image.fromarray(arr, mode).save(path)
    return path


def mvtec_tree(root: Path, cat="bottle", defects=("broken_large", "contamination"), mask_suffix="_mask",
               good_name="good"):
    png(root / cat / "train" / "good" / "000.png")
    png(root / cat / "test" / good_name / "000.png")
    for d in defects:
        for i in range(2):
            png(root / cat / "test" / d / f"{i:03d}.png")
            png(root / cat / "ground_truth" / d / f"{i:03d}{mask_suffix}.png", value=255, mode="L")
    return root


# ---------------------------------------------------------------- MVTec AD

def test_mvtec(tmp_path):
    mvtec_tree(tmp_path)
    mvtec_tree(tmp_path, "tile", ("oil", "crack"))
    (tmp_path / "license.txt").write_text("x")
    s = load_mvtec(tmp_path)
    v = vocabulary_for("mvtec")
    assert len(s) == 2 * (1 + 4)
    oil = [x for x in s if x.raw_name == "oil"]
    assert all(x.defect == "liquid" and x.class_id == v.class_id("liquid") and x.label == 1 for x in oil)
    assert oil[0].mask.name == "000_mask.png" and oil[0].product == "tile"
    good = [x for x in s if x.label == 0]
    assert len(good) == 2 and all(x.mask is None and x.class_id == 0 for x in good)
    assert product_defects(s) == {"bottle": ["broken", "contamination"], "tile": ["crack", "liquid"]}
    train = load_mvtec(tmp_path, split="train", categories=["tile"])
    assert len(train) == 1 and train[0].label == 0


def test_mvtec_missing_folders(tmp_path):
    with pytest.raises(DataLayoutError) as e:
        load_mvtec(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    mvtec_tree(tmp_path)
    with pytest.raises(DataLayoutError) as e:
        load_mvtec(tmp_path, categories=["cable"])
    assert str(tmp_path / "cable") in str(e.value)
    import shutil
    shutil.rmtree(tmp_path / "bottle" / "ground_truth" / "contamination")
    with pytest.raises(DataLayoutError) as e:
        load_mvtec(tmp_path)
    assert str(tmp_path / "bottle" / "ground_truth" / "contamination") in str(e.value)
    s = load_mvtec(tmp_path, require_masks=False)
    assert sum(x.mask is None and x.label == 1 for x in s) == 2


def test_mvtec_missing_single_mask_and_unmapped(tmp_path):
    mvtec_tree(tmp_path)
    (tmp_path / "bottle" / "ground_truth" / "broken_large" / "001_mask.png").unlink()
    with pytest.raises(DataLayoutError) as e:
        load_mvtec(tmp_path)
    assert "001_mask.png" in str(e.value) and "missing mask" in str(e.value)

    root2 = mvtec_tree(tmp_path / "b", defects=("dent",))
    with pytest.raises(UnmappedNameError) as e:
        load_mvtec(root2)
    assert str(root2 / "bottle" / "test" / "dent") in str(e.value) and "'dent'" in str(e.value)


# ---------------------------------------------------------------- MPDD, MAD

def test_mpdd(tmp_path):
    mvtec_tree(tmp_path, "metal_plate", ("major_rust", "scratches"))
    s = load_mpdd(tmp_path)
    assert sorted({x.defect for x in s if x.defect}) == ["rust", "scratch"]
    v = vocabulary_for("mpdd")
    assert {x.class_id for x in s if x.defect == "rust"} == {v.class_id("rust")}


def test_mad_sim_and_real(tmp_path):
    # MAD-Sim style: capitalised folders, <stem>_mask.png
    mvtec_tree(tmp_path / "sim", "01Gorilla", ("Burrs", "Missing", "Stains"))
    s = load_mad(tmp_path / "sim")
    assert sorted({x.defect for x in s if x.defect}) == ["burr", "missing", "stain"]
    assert all(x.mask is not None for x in s if x.label)
    # MAD-Real style: masks named like the image; one mask absent -> has no mask, not an error
    mvtec_tree(tmp_path / "real", "02Unicorn", ("Stains",), mask_suffix="")
    (tmp_path / "real" / "02Unicorn" / "ground_truth" / "Stains" / "001.png").unlink()
    s = load_mad(tmp_path / "real")
    stains = sorted((x for x in s if x.label), key=lambda x: x.image.name)
    assert stains[0].mask.name == "000.png" and stains[1].mask is None
    with pytest.raises(DataLayoutError):
        load_mad(tmp_path / "real", require_masks=True)


# ---------------------------------------------------------------- VisA

def visa_tree(root: Path, with_anno=True):
    rows = [("object", "split", "label", "image", "mask")]
    for obj, desc in (("candle", "wax melded out of the candle"), ("pcb4", "burnt")):
        n = root / obj / "Data" / "Images" / "Normal" / "0000.JPG"
        a = root / obj / "Data" / "Images" / "Anomaly" / "000.JPG"
        m = root / obj / "Data" / "Masks" / "Anomaly" / "000.png"
        png(n), png(a), png(m, value=1, mode="L")  # VisA masks: small non-zero values
        png(root / obj / "Data" / "Images" / "Normal" / "0001.JPG")
        rows += [(obj, "train", "normal", f"{obj}/Data/Images/Normal/0001.JPG", ""),
                 (obj, "test", "normal", f"{obj}/Data/Images/Normal/0000.JPG", ""),
                 (obj, "test", "anomaly", f"{obj}/Data/Images/Anomaly/000.JPG",
                  f"{obj}/Data/Masks/Anomaly/000.png")]
        if with_anno:
            with open(root / obj / "image_anno.csv", "w", newline="") as f:
                csv.writer(f).writerows([("image", "label", "mask"),
                                         (f"{obj}/Data/Images/Anomaly/000.JPG", desc, "")])
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root


def test_visa(tmp_path):
    visa_tree(tmp_path)
    s = load_visa(tmp_path)
    assert len(s) == 4
    bad = {x.product: x for x in s if x.label}
    assert bad["candle"].defect == "melt" and bad["pcb4"].defect == "burnt"
    assert bad["pcb4"].class_id == vocabulary_for("visa").class_id("burnt")
    assert all(x.mask_nonzero for x in s)
    assert len(load_visa(tmp_path, split="train", objects=["pcb4"])) == 1


def test_visa_without_annotations_and_errors(tmp_path):
    visa_tree(tmp_path, with_anno=False)
    s = load_visa(tmp_path)
    assert all(x.defect is None and x.class_id == UNKNOWN_DEFECT for x in s if x.label)
    with pytest.raises(DataLayoutError) as e:
        load_visa(tmp_path, types="require")
    assert "image_anno.csv" in str(e.value)
    (tmp_path / "candle" / "Data" / "Masks" / "Anomaly" / "000.png").unlink()
    with pytest.raises(DataLayoutError) as e:
        load_visa(tmp_path)
    assert str(tmp_path / "candle" / "Data" / "Masks" / "Anomaly" / "000.png") in str(e.value)
    with pytest.raises(DataLayoutError) as e:
        load_visa(tmp_path / "void")
    assert "void" in str(e.value)


# ---------------------------------------------------------------- Real-IAD

def test_realiad(tmp_path):
    img_root = tmp_path / "realiad_1024"
    jdir = tmp_path / "realiad_jsons" / "realiad_jsons"
    jdir.mkdir(parents=True)
    ok = "audiojack/S0001/OK/S0001/audiojack_0001_OK_C1.jpg"
    ng = "audiojack/S0002/NG/AK/S0002/audiojack_0002_NG_AK_C1.jpg"
    ng_mask = ng.replace(".jpg", ".png")
    ng2 = "audiojack/S0003/NG/HS/S0003/audiojack_0003_NG_HS_C1.jpg"
    for p in (ok, ng, ng2):
        png(img_root / p)
    png(img_root / ng_mask, value=255, mode="L")
    data = {
        "meta": {"prefix": "", "normal_class": "OK"},
        "train": [{"category": "audiojack", "anomaly_class": "OK", "image_path": ok, "mask_path": None}],
        "test": [
            {"category": "audiojack", "anomaly_class": "OK", "image_path": ok, "mask_path": None},
            {"category": "audiojack", "anomaly_class": "AK", "image_path": ng, "mask_path": ng_mask},
            {"category": "audiojack", "anomaly_class": "HS", "image_path": ng2, "mask_path": None},
        ],
    }
    (jdir / "audiojack.json").write_text(json.dumps(data))
    s = load_realiad(tmp_path)
    assert [x.label for x in s] == [0, 1, 1]
    assert s[1].defect == "pit" and s[1].mask == img_root / ng_mask
    assert s[2].defect == "scratch" and s[2].mask is None
    assert len(load_realiad(tmp_path, split="all")) == 4
    data["test"][1]["anomaly_class"] = "XX"
    (jdir / "audiojack.json").write_text(json.dumps(data))
    with pytest.raises(UnmappedNameError) as e:
        load_realiad(tmp_path)
    assert "'XX'" in str(e.value) and ng.split("/")[-1] in str(e.value)
    with pytest.raises(DataLayoutError) as e:
        load_realiad(tmp_path, categories=["pcb"])
    assert str(jdir / "pcb.json") in str(e.value)


# ---------------------------------------------------------------- meta.json

def test_meta_json(tmp_path):
    mvtec_tree(tmp_path, "bottle", ("broken_small",))
    item = lambda img, mask, sp, an: {"img_path": img, "mask_path": mask, "cls_name": "bottle",
                                       "specie_name": sp, "anomaly": an}
    meta = {"train": {"bottle": [item("bottle/train/good/000.png", "", "good", 0)]},
            "test": {"bottle": [
                item("bottle/test/good/000.png", "", "good", 0),
                item("bottle/test/broken_small/000.png", "bottle/ground_truth/broken_small/000_mask.png",
                     "broken_small", 1),
                item("bottle/test/broken_small/001.png", "", "broken_small", 1)]}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    s = load_meta_json(tmp_path)  # auto: MVTec's table maps every name
    assert [x.label for x in s] == [0, 1, 1]
    assert s[1].defect == "broken" and s[1].class_id == vocabulary_for("mvtec").class_id("broken")
    assert s[2].mask is None
    raw = load_meta_json(tmp_path, table=None)
    assert raw[1].defect == "broken small" and raw[1].class_id == 1
    custom = load_meta_json(tmp_path, table={"broken_small": "chip"})
    assert custom[1].defect == "chip"
    meta["test"]["bottle"][2]["specie_name"] = "weird_thing"
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UnmappedNameError) as e:
        load_meta_json(tmp_path, table="mvtec")
    assert "'weird_thing'" in str(e.value) and "001.png" in str(e.value)
    with pytest.raises(DataLayoutError) as e:
        load_meta_json(tmp_path / "bottle")
    assert "meta.json" in str(e.value)


# ---------------------------------------------------------------- custom folder

def test_folder(tmp_path):
    p = tmp_path / "widget"
    png(p / "good" / "a.png")
    png(p / "faulty_imprint" / "x.png")
    png(p / "faulty_imprint" / "y.png")
    png(p / "ground_truth" / "faulty_imprint" / "x_mask.png", value=255, mode="L")
    png(p / "scratch" / "z.png")
    png(p / "ground_truth" / "scratch" / "z.png", value=255, mode="L")  # no _mask suffix
    s = load_folder(tmp_path)
    by = {x.image.name: x for x in s}
    assert by["a.png"].label == 0 and by["a.png"].class_id == 0
    assert by["x.png"].defect == "faulty imprint" and by["x.png"].mask.name == "x_mask.png"
    assert by["y.png"].mask is None and by["y.png"].label == 1
    assert by["z.png"].mask.name == "z.png"
    assert {x.class_id for x in s if x.label} == {1, 2}  # sorted words: faulty imprint, scratch
    only = load_folder(tmp_path, defects=["scratch"], include_good=False)
    assert [x.image.name for x in only] == ["z.png"]
    # explicit table: unmapped folder raises naming the folder
    with pytest.raises(UnmappedNameError) as e:
        load_folder(tmp_path, table={"scratch": "scratch"})
    assert str(p / "faulty_imprint") in str(e.value)
    assert load_dataset("folder", tmp_path) == s
    # stable ids with a given vocabulary, and re-numbering
    v = Vocabulary(["scratch", "hole", "faulty imprint"])
    s2 = load_folder(tmp_path, vocab=v)
    assert {x.defect: x.class_id for x in s2 if x.label} == {"scratch": 1, "faulty imprint": 3}
    assert with_vocabulary(s2, Vocabulary(["faulty imprint", "scratch"]))[1].class_id == 1


def test_folder_bad_layouts(tmp_path):
    with pytest.raises(DataLayoutError) as e:
        load_folder(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(e.value)
    (tmp_path / "empty_product").mkdir()
    with pytest.raises(DataLayoutError) as e:
        load_folder(tmp_path)
    assert str(tmp_path / "empty_product") in str(e.value)
    with pytest.raises(DataLayoutError) as e:
        load_folder(tmp_path, products=["nope"])
    assert str(tmp_path / "nope") in str(e.value)
    # mask size mismatch
    root = tmp_path / "r"
    png(root / "w" / "hole" / "a.png", size=(8, 6))
    png(root / "w" / "ground_truth" / "hole" / "a_mask.png", size=(6, 6), value=255, mode="L")
    with pytest.raises(DataLayoutError) as e:
        load_folder(root)
    assert str(root / "w" / "ground_truth" / "hole" / "a_mask.png") in str(e.value)
    assert "6x6" in str(e.value) and "8x6" in str(e.value)
    # an MVTec tree handed to the folder loader
    mvtec_tree(tmp_path / "m")
    with pytest.raises(DataLayoutError) as e:
        load_folder(tmp_path / "m")
    assert "mvtec" in str(e.value).lower()


def test_json_indexes_that_are_not_objects_name_the_file(tmp_path):
    from training.data.common import DataLayoutError, read_json

    path = tmp_path / "meta.json"
    path.write_text("[1, 2]")
    with pytest.raises(DataLayoutError, match=r"meta\.json: expected a JSON object, got list"):
        read_json(path, "meta.json")
    path.write_text("{broken")
    with pytest.raises(DataLayoutError, match=r"meta\.json: invalid JSON"):
        read_json(path, "meta.json")
