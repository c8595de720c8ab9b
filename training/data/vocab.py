"""Defect vocabularies: per-data-set tables from folder names / descriptions to defect words,
and the Vocabulary (ordered class list, 'normal' is class 0) the model and artifacts use.

The MVTec AD word list is the 20 merged words of METHOD.md. Which folder maps onto which word is
obvious for most names (broken_large -> broken, oil -> liquid, cable_swap -> misaligned);
for the ambiguous few the choice is ours and commented in the table. Other data sets bring their
own lists. An unmapped name raises ``UnmappedNameError`` naming the path and the name.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .common import DataLayoutError

NORMAL = "normal"


class UnmappedNameError(DataLayoutError):
    """A defect folder name / description with no entry in the data set's vocabulary table."""

    def __init__(self, path, name: str, table: str, product: str | None = None, known: Iterable[str] = ()):
        self.name = name
        self.table = table
        known = sorted(set(known))
        hint = f"; known names: {', '.join(known)}" if known and len(known) <= 60 else ""
        where = f" (product {product!r})" if product else ""
        super().__init__(
            path if path is not None else Path("."),
            f"defect name {name!r}{where} is not mapped in the {table!r} vocabulary table{hint}",
        )


def normalise_name(name: str) -> str:
    """'Broken-Large ' -> 'broken_large'; spaces, hyphens and underscores are one separator."""
    return re.sub(r"[\s_\-]+", "_", str(name).strip().lower()).strip("_")


def word_form(name: str) -> str:
    """A folder name as a prompt word: 'faulty_imprint' -> 'faulty imprint'."""
    return re.sub(r"[\s_\-]+", " ", str(name).strip()).strip().lower()


# --------------------------------------------------------------------------- Vocabulary

MAX_DEFECT_WORDS = 255  # class ids are uint8 in the type map; 0 is normal


def defect_words(words: Iterable[str]) -> tuple[str, ...]:
    """The one vocabulary rule, for `dapo train` and `dapo bake` alike.

    Each word takes its prompt form (``word_form``: lower case, spaces / hyphens / underscores
    one space), so 'Faulty_Imprint' and 'faulty imprint' are one class with one text feature
    wherever they are written. Repeats are merged (first position kept). Refused, with the
    offending word named: an empty word, 'normal' (class 0), more than 255 words."""
    out: list[str] = []
    for raw in words:
        w = word_form(raw)
        if not w:
            raise ValueError(f"empty defect word {raw!r}")
        if w == NORMAL:
            raise ValueError(f"{raw!r}: 'normal' is class 0 and cannot be a defect word")
        if w not in out:
            out.append(w)
    if len(out) > MAX_DEFECT_WORDS:
        raise ValueError(f"at most {MAX_DEFECT_WORDS} defect words (class ids are uint8), got {len(out)}")
    return tuple(out)


class Vocabulary:
    """Ordered classes: ``classes[0] == 'normal'``, then the defect words (``defect_words``'s
    rule). A class id is the index in ``classes`` (what text_features rows and type-map pixel
    values mean)."""

    def __init__(self, words: Iterable[str]):
        self.words: tuple[str, ...] = defect_words(words)
        self.classes: tuple[str, ...] = (NORMAL, *self.words)
        self._index = {c: i for i, c in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.classes)

    def __iter__(self):
        return iter(self.classes)

    def __contains__(self, word: object) -> bool:
        return isinstance(word, str) and word_form(word) in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and other.classes == self.classes

    def __repr__(self) -> str:
        return f"Vocabulary({list(self.words)!r})"

    def class_id(self, word: str | None, where: os.PathLike | str | None = None) -> int:
        if word is None:
            return 0
        key = word_form(word)
        if key not in self._index:
            raise UnmappedNameError(where, word, "vocabulary", known=self.words)
        return self._index[key]

    def to_entries(self) -> list[dict]:
        """[{'id': 0, 'name': 'normal'}, ...] — the manifest's vocabulary section."""
        return [{"id": i, "name": n} for i, n in enumerate(self.classes)]

    def union(self, other: "Vocabulary | Iterable[str]") -> "Vocabulary":
        extra = other.words if isinstance(other, Vocabulary) else other
        return Vocabulary([*self.words, *extra])  # repeats merge


def build_vocabulary(words: Iterable[str]) -> Vocabulary:
    """Vocabulary from defect words, order kept, repeats merged (``defect_words``)."""
    return Vocabulary(words)


def vocabulary_from_samples(samples: Iterable) -> Vocabulary:
    """Vocabulary of the defect words present in samples, sorted alphabetically."""
    return Vocabulary(sorted({s.defect for s in samples if s.defect is not None}))


# --------------------------------------------------------------------------- tables

@dataclass
class DefectTable:
    """Maps (product, raw name) -> defect word for one data set.

    ``per_product``: product -> {normalised raw name: word}; ``common``: names valid for any
    product (also used for products not in ``per_product``); ``keywords``: ordered
    (substring, word) rules tried on free-text descriptions after the exact tables.
    """

    name: str
    words: tuple[str, ...]
    per_product: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    common: Mapping[str, str] = field(default_factory=dict)
    keywords: Sequence[tuple[str, str]] = ()

    def __post_init__(self) -> None:
        allowed = set(self.words)
        for prod, tbl in self.per_product.items():
            for raw, w in tbl.items():
                if w not in allowed:
                    raise ValueError(f"{self.name}: {prod}/{raw} -> {w!r} is not one of its words")
        for raw, w in list(self.common.items()) + [(k, w) for k, w in self.keywords]:
            if w not in allowed:
                raise ValueError(f"{self.name}: {raw} -> {w!r} is not one of its words")

    def vocabulary(self) -> Vocabulary:
        return Vocabulary(self.words)

    def known_names(self, product: str | None = None) -> set[str]:
        names = set(self.common)
        if product is not None and normalise_name(product) in self.per_product:
            names |= set(self.per_product[normalise_name(product)])
        else:
            for tbl in self.per_product.values():
                names |= set(tbl)
        return names

    def lookup(self, product: str | None, raw: str) -> str | None:
        key = normalise_name(raw)
        prod = normalise_name(product) if product else None
        if prod is not None and prod in self.per_product and key in self.per_product[prod]:
            return self.per_product[prod][key]
        if key in self.common:
            return self.common[key]
        if prod is None or prod not in self.per_product:
            # product renamed or unknown: accept a name that means the same word everywhere
            hits = {tbl[key] for tbl in self.per_product.values() if key in tbl}
            if len(hits) == 1:
                return hits.pop()
        if self.keywords:
            # free-text descriptions, possibly several types "burnt,different colour spot":
            # the first part that matches decides
            text = str(raw).lower().replace("_", " ")
            for part in re.split(r"[,;/+]", text):
                for kw, word in self.keywords:
                    if kw in part:
                        return word
        return None

    def map(self, product: str | None, raw: str, where: os.PathLike | str | None = None) -> str:
        """The defect word for ``raw``; raises UnmappedNameError naming ``where`` and ``raw``."""
        word = self.lookup(product, raw)
        if word is None:
            raise UnmappedNameError(where, raw, self.name, product, self.known_names(product))
        return word


# ---- MVTec AD: 15 categories, 20 merged words (METHOD.md)

MVTEC_WORDS = (
    "bent", "broken", "discoloration", "compound", "contamination", "crack", "cut", "fabric",
    "faulty imprint", "gluing", "hole", "missing", "puncture", "rough", "scratch", "compressed",
    "threading", "liquid", "misaligned", "wear",
)

MVTEC_FOLDERS: dict[str, dict[str, str]] = {
    "bottle": {"broken_large": "broken", "broken_small": "broken", "contamination": "contamination"},
    "cable": {
        "bent_wire": "bent", "cable_swap": "misaligned", "combined": "compound",
        "cut_inner_insulation": "cut", "cut_outer_insulation": "cut", "missing_cable": "missing",
        "missing_wire": "missing", "poke_insulation": "puncture",
    },
    "capsule": {
        "crack": "crack", "faulty_imprint": "faulty imprint", "poke": "puncture",
        "scratch": "scratch", "squeeze": "compressed",
    },
    "carpet": {
        "color": "discoloration", "cut": "cut", "hole": "hole",
        "metal_contamination": "contamination", "thread": "threading",
    },
    "grid": {
        "bent": "bent", "broken": "broken", "glue": "gluing",
        "metal_contamination": "contamination", "thread": "threading",
    },
    "hazelnut": {"crack": "crack", "cut": "cut", "hole": "hole", "print": "faulty imprint"},
    "leather": {
        "color": "discoloration", "cut": "cut", "glue": "gluing", "poke": "puncture",
        "fold": "wear",  # a crease in the leather: our choice
    },
    "metal_nut": {
        "bent": "bent", "color": "discoloration", "scratch": "scratch",
        "flip": "misaligned",  # nut placed upside down
    },
    "pill": {
        "color": "discoloration", "combined": "compound", "contamination": "contamination",
        "crack": "crack", "faulty_imprint": "faulty imprint", "scratch": "scratch",
        "pill_type": "discoloration",  # a pill of another type: different colour speckles
    },
    "screw": {
        "manipulated_front": "wear",  # damaged tip: our choice
        "scratch_head": "scratch", "scratch_neck": "scratch",
        "thread_side": "threading", "thread_top": "threading",
    },
    "tile": {
        "crack": "crack", "glue_strip": "gluing", "oil": "liquid", "rough": "rough",
        "gray_stroke": "discoloration",  # a grey paint stroke: our choice
    },
    "toothbrush": {"defective": "wear"},  # frayed / worn bristles
    "transistor": {
        "bent_lead": "bent", "cut_lead": "cut", "damaged_case": "broken",
        "misplaced": "misaligned",  # transistor shifted, rotated or absent
    },
    "wood": {
        "color": "discoloration", "combined": "compound", "hole": "hole", "liquid": "liquid",
        "scratch": "scratch",
    },
    "zipper": {
        "broken_teeth": "broken", "combined": "compound", "fabric_border": "fabric",
        "fabric_interior": "fabric", "rough": "rough", "split_teeth": "broken",
        "squeezed_teeth": "compressed",
    },
}

MVTEC = DefectTable("mvtec", MVTEC_WORDS, per_product=MVTEC_FOLDERS)

# ---- VisA: 12 objects; types come from the free-text 'label' column of <object>/image_anno.csv.
# 18 words; the exact descriptions we know are listed, keyword rules catch spelling variants.

VISA_WORDS = (
    "damage", "scratch", "breakage", "burnt", "bubble", "melt", "spot", "chip", "missing",
    "crack", "hole", "bent", "leak", "misshape", "stuck", "extra", "misplaced", "contamination",
)

VISA_DESCRIPTIONS: dict[str, str] = {
    # candle
    "chunk_of_wax_missing": "missing", "damaged_corner_of_packaging": "damage",
    "different_colour_spot": "spot", "extra_wax_in_candle": "extra",
    "foreign_particals_on_candle": "contamination", "foreign_particles_on_candle": "contamination",
    "weird_candle_wick": "damage", "wax_melded_out_of_the_candle": "melt",
    # capsules
    "bubble": "bubble", "discolor": "spot", "scratch": "scratch", "leak": "leak",
    "misshape": "misshape",
    # cashew / fryum / pipe_fryum / macaroni
    "burnt": "burnt", "corner_or_edge_breakage": "breakage", "middle_breakage": "breakage",
    "small_holes": "hole", "small_scratches": "scratch", "stuck_together": "stuck",
    "fryum_stuck_together": "stuck", "similar_colour_spot": "spot",
    "chip_around_edge_and_corner": "chip", "small_chip_around_edge": "chip",
    "small_cracks": "crack", "breakage_down_the_middle": "breakage",
    "color_spot_similar_to_the_object": "spot", "different_color_spot": "spot",
    # chewinggum
    "chunk_of_gum_missing": "missing", "scratches": "scratch", "corner_missing": "missing",
    # pcb1..pcb4
    "bent": "bent", "melt": "melt", "missing": "missing", "damage": "damage", "dirt": "contamination",
    "extra": "extra", "wrong_place": "misplaced",
}

VISA_KEYWORDS: tuple[tuple[str, str], ...] = (
    ("burnt", "burnt"), ("bubble", "bubble"), ("melt", "melt"), ("meld", "melt"),
    ("leak", "leak"), ("misshape", "misshape"), ("deform", "misshape"), ("stuck", "stuck"),
    ("wrong place", "misplaced"), ("misplace", "misplaced"), ("extra", "extra"),
    ("missing", "missing"), ("hole", "hole"), ("crack", "crack"), ("chip", "chip"),
    ("breakage", "breakage"), ("broken", "breakage"), ("break", "breakage"),
    ("scratch", "scratch"), ("bent", "bent"), ("foreign", "contamination"),
    ("partic", "contamination"), ("dirt", "contamination"), ("spot", "spot"),
    ("discolo", "spot"), ("colour", "spot"), ("color", "spot"), ("damage", "damage"),
    ("wick", "damage"),
)

VISA_OBJECTS = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1",
    "pcb2", "pcb3", "pcb4", "pipe_fryum",
)

VISA = DefectTable("visa", VISA_WORDS, common=VISA_DESCRIPTIONS, keywords=VISA_KEYWORDS)

# ---- MPDD: 6 metal-part categories, MVTec-like folders

MPDD_WORDS = ("hole", "scratch", "bent", "mismatch", "faulty painting", "rust", "deformation")

MPDD_FOLDERS: dict[str, dict[str, str]] = {
    "bracket_black": {"hole": "hole", "scratches": "scratch"},
    "bracket_brown": {"bend_and_parts_mismatch": "bent", "parts_mismatch": "mismatch"},
    "bracket_white": {"defective_painting": "faulty painting", "scratches": "scratch"},
    "connector": {"parts_mismatch": "mismatch"},
    "metal_plate": {"major_rust": "rust", "scratches": "scratch", "total_rust": "rust"},
    "tubes": {"anomalous": "deformation"},  # dented / bent tubes
}

MPDD = DefectTable("mpdd", MPDD_WORDS, per_product=MPDD_FOLDERS)

# ---- MAD (PAD benchmark), Sim and Real: 20 LEGO toys, three defect types

MAD_WORDS = ("burr", "missing", "stain")
MAD_NAMES = {"burrs": "burr", "burr": "burr", "missing": "missing", "stains": "stain", "stain": "stain"}
MAD = DefectTable("mad", MAD_WORDS, common=MAD_NAMES)

# ---- Real-IAD: 30 objects, anomaly_class codes in its JSON lists

REALIAD_WORDS = (
    "pit", "deformation", "abrasion", "scratch", "damage", "missing parts", "foreign objects",
    "contamination",
)
REALIAD_CODES = {
    "ak": "pit", "bx": "deformation", "ch": "abrasion", "hs": "scratch", "ps": "damage",
    "qs": "missing parts", "yw": "foreign objects", "zw": "contamination",
    # spelled-out names, as some converted copies use
    "pit": "pit", "deformation": "deformation", "abrasion": "abrasion", "scratch": "scratch",
    "damage": "damage", "missing": "missing parts", "missing_parts": "missing parts",
    "foreign_objects": "foreign objects", "foreign": "foreign objects",
    "contamination": "contamination",
}
REALIAD = DefectTable("realiad", REALIAD_WORDS, common=REALIAD_CODES)

TABLES: dict[str, DefectTable] = {
    "mvtec": MVTEC, "visa": VISA, "mpdd": MPDD, "mad": MAD, "mad_sim": MAD, "mad_real": MAD,
    "realiad": REALIAD,
}


def get_table(name: str | DefectTable) -> DefectTable:
    if isinstance(name, DefectTable):
        return name
    key = normalise_name(name).replace("-", "_")
    key = {"mvtec_ad": "mvtec", "real_iad": "realiad", "madsim": "mad_sim", "madreal": "mad_real"}.get(key, key)
    if key not in TABLES:
        raise KeyError(f"unknown data set {name!r}; known: {', '.join(sorted(TABLES))}")
    return TABLES[key]


def vocabulary_for(dataset: str | DefectTable) -> Vocabulary:
    """The Vocabulary of a data set's own word list ('normal' + its words, in table order)."""
    return get_table(dataset).vocabulary()


def folder_table(mapping: Mapping[str, str] | None, name: str = "custom") -> DefectTable | None:
    """A DefectTable from a user's {folder name: word} mapping (words taken from the values)."""
    if mapping is None:
        return None
    words = tuple(dict.fromkeys(word_form(w) for w in mapping.values()))
    return DefectTable(name, words, common={normalise_name(k): word_form(v) for k, v in mapping.items()})
