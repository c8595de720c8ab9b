"""bench/feature_probe.py on a few synthetic images: the probes fit and read the right things.

The full run (and its figures) is the benchmark; this checks its plumbing on real features:
one probe per tapped layer plus the global one, scored on every set, and patch labels that
come from the defect masks (a probe fitted on them separates its own training patches).
"""
from __future__ import annotations

from training.backbone import TINY
from training.synth import generate, load_split


def test_probe_reports_every_tap_and_set(tmp_path, bench_script):
    bench = bench_script("feature_probe")
    generate(tmp_path, seed=0, n_per_class=2, products=["metal", "disc", "wood"],
             defects=["hole", "scratch", "crack"], holdout_product="wood", holdout_defect="crack")
    sets = {"train": load_split(tmp_path, "train"), "shift_texture": load_split(tmp_path, "test_shift")}
    out = bench.probe(TINY, 112, sets)
    assert out["grid"] == 7 and out["taps"] == [1, 2, 3, 4]
    for key in ("global", *(f"tap{t}" for t in out["taps"])):
        assert set(out[key]) == set(sets)
        assert all(0.0 <= v <= 1.0 for v in out[key].values())
    # fitted on its own patches, a linear probe must beat chance there
    assert max(out[f"tap{t}"]["train"] for t in out["taps"]) > 0.7
