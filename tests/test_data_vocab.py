"""Vocabulary tables: every MVTec AD folder maps onto the 20 words; unknown names raise."""
import pytest

from training.data.vocab import (
    MAD, MPDD, MVTEC, MVTEC_FOLDERS, MVTEC_WORDS, REALIAD, VISA, VISA_WORDS, UnmappedNameError,
    Vocabulary, build_vocabulary, get_table, vocabulary_for,
)

# the public MVTec AD test folders, per category
MVTEC_AD = {
    "bottle": ["broken_large", "broken_small", "contamination"],
    "cable": ["bent_wire", "cable_swap", "combined", "cut_inner_insulation", "cut_outer_insulation",
              "missing_cable", "missing_wire", "poke_insulation"],
    "capsule": ["crack", "faulty_imprint", "poke", "scratch", "squeeze"],
    "carpet": ["color", "cut", "hole", "metal_contamination", "thread"],
    "grid": ["bent", "broken", "glue", "metal_contamination", "thread"],
    "hazelnut": ["crack", "cut", "hole", "print"],
    "leather": ["color", "cut", "fold", "glue", "poke"],
    "metal_nut": ["bent", "color", "flip", "scratch"],
    "pill": ["color", "combined", "contamination", "crack", "faulty_imprint", "pill_type", "scratch"],
    "screw": ["manipulated_front", "scratch_head", "scratch_neck", "thread_side", "thread_top"],
    "tile": ["crack", "glue_strip", "gray_stroke", "oil", "rough"],
    "toothbrush": ["defective"],
    "transistor": ["bent_lead", "cut_lead", "damaged_case", "misplaced"],
    "wood": ["color", "combined", "hole", "liquid", "scratch"],
    "zipper": ["broken_teeth", "combined", "fabric_border", "fabric_interior", "rough",
               "split_teeth", "squeezed_teeth"],
}


def test_mvtec_every_folder_maps_and_all_20_words_used():
    assert len(MVTEC_WORDS) == 20
    used = set()
    for cat, folders in MVTEC_AD.items():
        assert set(MVTEC_FOLDERS[cat]) == set(folders), cat
        for f in folders:
            w = MVTEC.map(cat, f)
            assert w in MVTEC_WORDS
            used.add(w)
    assert used == set(MVTEC_WORDS)


@pytest.mark.parametrize("cat,folder,word", [
    ("tile", "oil", "liquid"), ("cable", "cable_swap", "misaligned"),
    ("bottle", "broken_large", "broken"), ("bottle", "broken_small", "broken"),
    ("carpet", "color", "discoloration"), ("grid", "glue", "gluing"), ("capsule", "poke", "puncture"),
    ("carpet", "metal_contamination", "contamination"), ("zipper", "combined", "compound"),
    ("capsule", "faulty_imprint", "faulty imprint"), ("capsule", "squeeze", "compressed"),
    ("screw", "thread_top", "threading"), ("zipper", "fabric_border", "fabric"),
])
def test_mvtec_examples(cat, folder, word):
    assert MVTEC.map(cat, folder) == word
    assert MVTEC.map(cat, folder.upper().replace("_", "-")) == word  # spelling normalised


def test_unmapped_name_raises_naming_path_and_name(tmp_path):
    where = tmp_path / "bottle" / "test" / "dent"
    with pytest.raises(UnmappedNameError) as e:
        MVTEC.map("bottle", "dent", where=where)
    assert str(where) in str(e.value) and "'dent'" in str(e.value)
    # a folder valid for another category is not valid for this one
    with pytest.raises(UnmappedNameError):
        MVTEC.map("bottle", "oil")
    # an unknown (renamed) category accepts names that mean one word everywhere
    assert MVTEC.map("my_bottle", "broken_large") == "broken"


def test_other_tables():
    assert len(VISA_WORDS) == 18
    assert VISA.map("cashew", "small scratches") == "scratch"
    assert VISA.map("candle", "wax melded out of the candle") == "melt"
    assert VISA.map("fryum", "burnt,different colour spot") == "burnt"  # first listed type
    assert VISA.map("pcb4", "wrong place") == "misplaced"
    assert VISA.map("macaroni2", "Small Chip Around Edge") == "chip"
    with pytest.raises(UnmappedNameError):
        VISA.map("pcb1", "zzz")
    assert MPDD.map("metal_plate", "major_rust") == "rust"
    assert MPDD.map("bracket_brown", "parts_mismatch") == "mismatch"
    assert MAD.map("01Gorilla", "Burrs") == "burr" and MAD.map("x", "Stains") == "stain"
    assert REALIAD.map("audiojack", "AK") == "pit" and REALIAD.map("pcb", "zw") == "contamination"
    with pytest.raises(UnmappedNameError):
        REALIAD.map("pcb", "XX")
    assert get_table("MVTec-AD") is MVTEC and get_table("real-iad") is REALIAD
    with pytest.raises(KeyError):
        get_table("nope")


def test_vocabulary():
    v = vocabulary_for("mvtec")
    assert v.classes[0] == "normal" and len(v) == 21
    assert v.class_id("normal") == 0 and v.class_id(None) == 0
    assert v.class_id("faulty_imprint") == v.class_id("faulty imprint") == 9
    b = build_vocabulary(["hole", "scratch", "Hole", "Faulty_Imprint", "faulty-imprint"])
    assert b.classes == ("normal", "hole", "scratch", "faulty imprint")
    assert b.to_entries()[1] == {"id": 1, "name": "hole"}
    assert b.union(["crack", "hole"]).classes[-1] == "crack"
    with pytest.raises(UnmappedNameError):
        b.class_id("crack", where="x/y.png")
    # 'normal' is class 0: written as a defect word it is an error (was silently dropped before
    # the one rule shared with `dapo bake`, which has always refused it)
    for bad, msg in ((["a", "Normal"], "class 0"), (["a", " _ "], "empty"), ([str(i) for i in range(256)], "255")):
        with pytest.raises(ValueError, match=msg):
            Vocabulary(bad)
