"""Seeded-mutation runner: plant one plausible bug at a time and see whether the tests notice.

    python bench/mutate.py --check                        # every mutation still applies (no tests run)
    python bench/mutate.py --json after.json              # run them all against this tree's tests
    python bench/mutate.py --tests-ref main~5 --json before.json   # ... against another commit's tests/
    python bench/mutate.py --only pp-nearest-half,cal-pixel-1-q    # a few, by id
    python bench/mutate.py --module scoring --suite       # the whole test suite per mutation (slow)

Each mutation is (module, old snippet, new snippet, tests to run). The runner copies the working
tree (tracked and untracked, not ignored files) into a temporary folder, optionally replaces its
`tests/` with another commit's (to measure the kill rate BEFORE a change to the tests), checks
that the unmutated tests pass there, then for each mutation: replaces the snippet (it must occur
exactly once, or the mutation is reported `stale`), runs `pytest -x` on the mutation's test
files, and restores the file whatever happens. The working tree itself is never written.
A mutation is `killed` when pytest fails (exit 1), `survived` when it passes, `error` on any
other exit (collection or usage error, counted as not killed) and `timeout` past --timeout.
Test files missing from the tests used (e.g. new files, with --tests-ref) are skipped; a
mutation left with none survives.

Target files live in one table, TARGETS, so moving a module means editing one line.
Too slow for CI (each mutation is a pytest start plus a demo bake): run by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module -> file (the one table to update when files move)
TARGETS = {
    "postprocess": "service/runtime/postprocess.py",
    "scoring": "service/runtime/scoring.py",
    "calibrate": "training/calibrate.py",
    "evaluate": "training/evaluate.py",
    "artifact": "service/runtime/artifact.py",
    "idempotency": "service/server/idempotency.py",
    "routes": "service/server/routes.py",
    "prompts": "training/prompts.py",
}

# module -> the test files that concern it (a mutation may name its own instead)
MODULE_TESTS = {
    "postprocess": ["tests/test_postprocess.py", "tests/test_placement.py", "tests/test_detect_golden.py"],
    "scoring": ["tests/test_scoring.py", "tests/test_postprocess.py", "tests/test_reference_pipeline.py",
                "tests/test_api.py"],
    "calibrate": ["tests/test_reference_pipeline.py", "tests/test_train.py"],
    "evaluate": ["tests/test_reference_pipeline.py", "tests/test_train.py"],
    "artifact": ["tests/test_artifact.py",
                 "tests/test_faults.py::test_broken_artifact_in_process_never_becomes_ready"],
    "idempotency": ["tests/test_security.py", "tests/test_idempotency_route.py", "tests/test_api.py"],
    "routes": ["tests/test_idempotency_route.py", "tests/test_api.py"],
    "prompts": ["tests/test_prompts.py", "tests/test_handcrafted_prompts.py",
                "tests/test_bake.py::test_handcrafted_baseline_artifact"],
}


@dataclass(frozen=True)
class Mutation:
    id: str
    module: str
    old: str
    new: str
    why: str
    tests: tuple[str, ...] = ()  # empty: MODULE_TESTS[module]
    from_issue: bool = False  # one of the six seeded bugs of issue #17

    @property
    def file(self) -> str:
        return TARGETS[self.module]

    def test_targets(self) -> list[str]:
        return list(self.tests or MODULE_TESTS[self.module])


M = Mutation
MUTATIONS: list[Mutation] = [
    # --- postprocess ----------------------------------------------------------------------
    M("pp-nearest-half", "postprocess", "(2 * np.arange(n_out, dtype=np.int64) + 1) * n_in",
      "(2 * np.arange(n_out, dtype=np.int64)) * n_in", "nearest index without the half-pixel offset", from_issue=True),
    M("pp-nearest-half-float", "postprocess", "return (2 * np.arange(n_out, dtype=np.int64) + 1) * n_in // (2 * n_out)",
      "return np.minimum((np.arange(n_out) * (n_in / n_out)).astype(np.int64), n_in - 1)",
      "the issue's exact seed: the old float formula without its + 0.5", from_issue=True),
    M("pp-bilinear-nearest", "postprocess", "img.resize((w, h), Image.Resampling.BILINEAR)",
      "img.resize((w, h), Image.Resampling.NEAREST)", "heatmap upsampled by nearest instead of bilinear"),
    M("pp-heat-floor", "postprocess", "np.rint(np.clip(anomaly, 0.0, 1.0) * 255.0)",
      "np.floor(np.clip(anomaly, 0.0, 1.0) * 255.0)", "heatmap bytes truncated instead of rounded"),
    M("pp-jet-order", "postprocess", "for k in (3.0, 2.0, 1.0)]", "for k in (1.0, 2.0, 3.0)]",
      "colour map channels reversed (red for normal)"),
    M("pp-alpha", "postprocess", "_OVERLAY_ALPHA = 0.5", "_OVERLAY_ALPHA = 0.35", "overlay blend weight"),
    M("pp-renorm-normal", "postprocess", "    scores[0] = 0.0\n", "",
      "normal's probability kept in the defect-type renormalisation"),
    M("pp-rank-order", "postprocess", "ranked.sort(key=lambda d: (-d[\"score\"], -d[\"area_fraction\"]))",
      "ranked.sort(key=lambda d: (d[\"score\"], -d[\"area_fraction\"]))", "defect types least likely first"),
    M("pp-min-region", "postprocess", "areas[1:] >= max(min_px, 1)", "areas[1:] > max(min_px, 1)",
      "a region exactly min_region_px large dropped"),
    M("pp-four-connected", "postprocess", "_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)",
      "_EIGHT_CONNECTED = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)", "regions 4-connected"),
    M("pp-box-off-by-one", "postprocess", "np.searchsorted(self.src_x, cols.stop - 1, \"right\")",
      "np.searchsorted(self.src_x, cols.stop, \"right\")", "region boxes one model pixel too wide"),
    M("pp-weights-swapped", "postprocess",
      "np.outer(self.row_counts, np.bincount(self.src_x, minlength=self.classes.shape[1]))",
      "np.outer(self.row_counts, np.bincount(self.src_x, minlength=self.classes.shape[1])).T",
      "area weights transposed (rows for columns)"),
    # --- scoring ----------------------------------------------------------------------------
    M("sc-product-filter", "scoring", "            allowed[1:] = [n in types for n in names[1:]]\n", "            pass\n",
      "the product's defect-type filter dropped before the model (issue's fifth bug)", from_issue=True),
    M("sc-anomalous-strict", "scoring", "return bool(score >= threshold)", "return bool(score > threshold)",
      "a score equal to the threshold is not anomalous"),
    M("sc-pixel-strict", "scoring", "np.where(anomaly_map >= pixel_threshold,", "np.where(anomaly_map > pixel_threshold,",
      "a pixel equal to the pixel threshold is cleared"),
    M("sc-smooth-mode", "scoring", "sigma=sigma, mode=\"nearest\")", "sigma=sigma, mode=\"reflect\")",
      "smoothing border mode"),
    M("sc-smooth-sigma", "scoring", "sigma=sigma, mode=\"nearest\")", "sigma=sigma / 2, mode=\"nearest\")",
      "smoothing with half the configured sigma"),
    M("sc-product-pixel-thr", "scoring",
      "pixel_threshold=prod.pixel_threshold if prod.pixel_threshold is not None else manifest.pixel_threshold,",
      "pixel_threshold=manifest.pixel_threshold,", "a product's calibrated pixel threshold ignored"),
    M("sc-global-max-mean", "scoring", "float(np.max(anomaly_map)))", "float(np.mean(anomaly_map)))",
      "fused image score uses the map's mean"),
    M("sc-call-threshold", "scoring", "        image_thr = threshold\n", "        image_thr = image_thr\n",
      "the per-call threshold override ignored"),
    # --- calibrate --------------------------------------------------------------------------
    M("cal-pixel-1-q", "calibrate", "for m in c.maps]), pixel_quantile,", "for m in c.maps]), 1 - pixel_quantile,",
      "pixel threshold at the 1 - q quantile (flags ~all good pixels)", from_issue=True),
    M("cal-image-1-q", "calibrate", "np.array(c.scores), image_quantile,", "np.array(c.scores), 1 - image_quantile,",
      "image threshold at the 1 - q quantile"),
    M("cal-image-linear", "calibrate", "image_quantile, method=\"higher\"", "image_quantile, method=\"linear\"",
      "image threshold interpolated instead of an observed score"),
    M("cal-pixel-dropped", "calibrate", "\"pixel_threshold\": pixel_thr, \"baseline\"", "\"pixel_threshold\": None, \"baseline\"",
      "pixel threshold computed but not written to the manifest"),
    # --- evaluate ---------------------------------------------------------------------------
    M("ev-labels-inverted", "evaluate", "per_product[s.product].add(int(labels[i]),",
      "per_product[s.product].add(1 - int(labels[i]),", "inverted image labels", from_issue=True),
    M("ev-masks-inverted", "evaluate", "self.masks.append(class_mask != 0)", "self.masks.append(class_mask == 0)",
      "inverted pixel ground truth"),
    M("ev-no-smoothing", "evaluate", "gaussian_sigma=sigma,", "gaussian_sigma=None,",
      "eval ignores its gaussian_sigma override"),
    M("ev-no-products", "evaluate", "known = use_products and product", "known = False and product",
      "eval scores every class, ignoring the product filter"),
    M("ev-score-mode", "evaluate", "image_score=image_score)", "image_score=None)", "eval ignores the image-score override"),
    # --- artifact ---------------------------------------------------------------------------
    M("ar-no-sha", "artifact", "        if digest != entry.sha256:\n", "        if False:\n",
      "sha256 mismatch accepted"),
    M("ar-size-lenient", "artifact", "if size != entry.bytes:", "if size > entry.bytes:",
      "a truncated file passes the size check"),
    M("ar-ids-unchecked", "artifact", "if ids != list(range(len(ids))):", "if False:",
      "vocabulary ids not checked"),
    M("ar-unknown-types", "artifact", "unknown = set(prod.defect_types or []) - set(names[1:])", "unknown = set()",
      "a product naming unknown defect types accepted"),
    M("ar-verify-off", "artifact", "def load_manifest(folder: str | Path, verify: bool = True)",
      "def load_manifest(folder: str | Path, verify: bool = False)", "files not verified by default"),
    # --- idempotency ------------------------------------------------------------------------
    M("id-route-query", "routes", "\"/detect\", request.query_params.multi_items(), sorted(echo.items()),",
      "\"/detect\", [], sorted(echo.items()),", "fingerprint ignores the query parameters", from_issue=True),
    M("id-route-fields", "routes", "\"/detect\", request.query_params.multi_items(), sorted(echo.items()),",
      "\"/detect\", request.query_params.multi_items(), [],", "fingerprint ignores the form fields"),
    M("id-route-principal", "routes", "state.idempotency.run(f\"{principal}:{key}\",", "state.idempotency.run(key,",
      "idempotency keys shared between API keys"),
    M("id-file-bytes", "idempotency", "hashlib.sha256(data).hexdigest()]", "str(len(data))]",
      "fingerprint sees only the file's size"),
    M("id-no-conflict", "idempotency", "if not hmac.compare_digest(entry.fingerprint, fingerprint):", "if False:",
      "a different request under a used key is replayed"),
    M("id-failures-stored", "idempotency", "                del self._entries[key]  # failures", "                pass  # failures",
      "a failed first attempt blocks the retry"),
    # --- prompts ----------------------------------------------------------------------------
    M("pr-handcrafted-normal-states", "prompts",
      "types = [ensemble([s.format(obj, d=w) for s in HANDCRAFTED_ABNORMAL_STATES]) for w in words]",
      "types = [ensemble([s.format(obj) for s in HANDCRAFTED_NORMAL_STATES]) for w in words]",
      "handcrafted defect rows built from the normal states", from_issue=True),
    M("pr-handcrafted-one-word", "prompts",
      "types = [ensemble([s.format(obj, d=w) for s in HANDCRAFTED_ABNORMAL_STATES]) for w in words]",
      "types = [ensemble([s.format(obj, d=words[0]) for s in HANDCRAFTED_ABNORMAL_STATES]) for w in words]",
      "every handcrafted defect row uses the first word"),
]


@dataclass
class Outcome:
    id: str
    module: str
    status: str  # killed / survived / error / timeout / stale
    seconds: float
    from_issue: bool
    failing: list[str] = field(default_factory=list)
    tests: list[str] = field(default_factory=list)


def copy_tree(dst: Path, tests_ref: str | None) -> None:
    """Copy tracked + untracked-not-ignored files; optionally tests/ from another commit."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    if tests_ref:
        shutil.rmtree(dst / "tests")
        archive = subprocess.run(["git", "archive", tests_ref, "tests"], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dst)], input=archive, check=True)


def existing(targets: list[str], tree: Path) -> list[str]:
    return [t for t in targets if (tree / t.split("::")[0]).is_file()]


def run_pytest(tree: Path, targets: list[str], timeout: float, stop_first: bool = True) -> tuple[int | None, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *(["-x"] if stop_first else []),
           *targets]
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, ""
    return proc.returncode, proc.stdout + proc.stderr


def failing_tests(output: str, limit: int) -> list[str]:
    return [line.split(" ")[1] for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))][:limit]


def apply(tree: Path, m: Mutation) -> str | None:
    """The file's original text if the mutation applies exactly once, else None."""
    path = tree / m.file
    if not path.is_file():
        return None
    text = path.read_text()
    if text.count(m.old) != 1:
        return None
    path.write_text(text.replace(m.old, m.new))
    return text


def run_one(tree: Path, m: Mutation, timeout: float, suite: bool, stop_first: bool = True) -> Outcome:
    targets = ["tests"] if suite else existing(m.test_targets(), tree)
    t0 = time.perf_counter()
    original = apply(tree, m)
    if original is None:
        return Outcome(m.id, m.module, "stale", 0.0, m.from_issue, tests=targets)
    try:
        if not targets:
            return Outcome(m.id, m.module, "survived", 0.0, m.from_issue, tests=targets)
        code, output = run_pytest(tree, targets, timeout, stop_first)
    finally:
        (tree / m.file).write_text(original)  # restored whatever happened
    seconds = round(time.perf_counter() - t0, 1)
    status = {None: "timeout", 0: "survived", 1: "killed"}.get(code, "error")
    return Outcome(m.id, m.module, status, seconds, m.from_issue, failing_tests(output, 5 if stop_first else 50),
                   targets)


def summarise(outcomes: list[Outcome]) -> dict:
    per_module: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for o in outcomes:
        if o.status != "stale":
            per_module[o.module]["total"] += 1
            per_module[o.module]["killed"] += o.status in ("killed", "timeout")
    table = {mod: {"killed": c["killed"], "total": c["total"], "rate": round(c["killed"] / c["total"], 3)}
             for mod, c in sorted(per_module.items())}
    killed = sum(c["killed"] for c in table.values())
    total = sum(c["total"] for c in table.values())
    issue = [o for o in outcomes if o.from_issue and o.status != "stale"]
    return {"per_module": table, "killed": killed, "total": total, "rate": round(killed / total, 3) if total else None,
            "issue_seeded_killed": sum(o.status == "killed" for o in issue), "issue_seeded_total": len(issue),
            "stale": [o.id for o in outcomes if o.status == "stale"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help="comma list of mutation ids")
    ap.add_argument("--module", help="comma list of modules (keys of TARGETS)")
    ap.add_argument("--tests-ref", help="take tests/ from this git commit (e.g. main) instead of the working tree")
    ap.add_argument("--suite", action="store_true", help="run the whole test suite per mutation (slow)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per mutation")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run (it must pass)")
    ap.add_argument("--all-failures", action="store_true", help="run every target test (no -x) and list all failures")
    ap.add_argument("--check", action="store_true", help="only check that every mutation applies")
    ap.add_argument("--json", help="write the outcomes and the summary here")
    args = ap.parse_args(argv)

    chosen = MUTATIONS
    if args.only:
        ids = set(args.only.split(","))
        chosen = [m for m in chosen if m.id in ids]
    if args.module:
        mods = set(args.module.split(","))
        chosen = [m for m in chosen if m.module in mods]
    if args.check:
        stale = [m.id for m in MUTATIONS if (ROOT / m.file).read_text().count(m.old) != 1]
        print(json.dumps({"mutations": len(MUTATIONS), "stale": stale}))
        return 1 if stale else 0

    with tempfile.TemporaryDirectory(prefix="dapo-mutate-") as tmp:
        tree = Path(tmp)
        copy_tree(tree, args.tests_ref)
        if not args.no_baseline:
            targets = ["tests"] if args.suite else sorted({t for m in chosen for t in existing(m.test_targets(), tree)})
            code, output = run_pytest(tree, targets, args.timeout * 2, stop_first=True)
            if code != 0:
                print(output[-3000:], file=sys.stderr)
                print(f"baseline: the unmutated tests do not pass (exit {code}); nothing measured", file=sys.stderr)
                return 2
        outcomes = []
        for m in chosen:
            o = run_one(tree, m, args.timeout, args.suite, stop_first=not args.all_failures)
            outcomes.append(o)
            shown = o.failing if args.all_failures else o.failing[:2]
            print(f"{o.status:9s} {o.seconds:6.1f}s  {o.module:12s} {o.id:30s} {', '.join(shown)}", flush=True)
    summary = summarise(outcomes)
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"tests_ref": args.tests_ref or "working tree", "suite": args.suite,
                                               "summary": summary, "outcomes": [asdict(o) for o in outcomes]},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
