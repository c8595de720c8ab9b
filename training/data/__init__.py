"""Data-set loaders (one module per layout), the defect vocabularies and the torch Dataset.

    from training.data import load_mvtec, AnomalyDataset
    samples = load_mvtec("/data/mvtec")            # list[Sample], class ids from MVTec's words
    ds = AnomalyDataset(samples, size=518, mean=mean, std=std)  # -> (pixels, class_mask, label, has_mask)
"""
from .common import (
    IGNORE_INDEX, UNKNOWN_DEFECT, AnomalyDataset, DataLayoutError, Sample,
    check_mask_sizes, product_defects, with_vocabulary,
)
from .folder import load_folder
from .mad import load_mad
from .meta_json import load_meta_json
from .mpdd import load_mpdd
from .mvtec import load_mvtec
from .realiad import load_realiad
from .visa import load_visa
from .vocab import (
    TABLES, DefectTable, UnmappedNameError, Vocabulary, build_vocabulary, defect_words, get_table,
    vocabulary_for, vocabulary_from_samples,
)

LOADERS = {
    "mvtec": load_mvtec, "visa": load_visa, "mpdd": load_mpdd, "mad": load_mad,
    "mad_sim": load_mad, "mad_real": load_mad, "realiad": load_realiad,
    "meta_json": load_meta_json, "folder": load_folder,
}


def load_dataset(kind: str, root, **kwargs) -> list[Sample]:
    """``load_dataset('mvtec', '/data/mvtec', split='test')`` — dispatch by layout name."""
    key = kind.strip().lower().replace("-", "_")
    if key not in LOADERS:
        raise KeyError(f"unknown data set layout {kind!r}; known: {', '.join(sorted(LOADERS))}")
    return LOADERS[key](root, **kwargs)


__all__ = [
    "AnomalyDataset", "DataLayoutError", "DefectTable", "IGNORE_INDEX",
    "LOADERS", "Sample", "TABLES", "UNKNOWN_DEFECT", "UnmappedNameError", "Vocabulary",
    "build_vocabulary", "check_mask_sizes", "defect_words", "get_table", "load_dataset", "load_folder", "load_mad",
    "load_meta_json", "load_mpdd", "load_mvtec", "load_realiad", "load_visa", "product_defects",
    "vocabulary_for", "vocabulary_from_samples", "with_vocabulary",
]
