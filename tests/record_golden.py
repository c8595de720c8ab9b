"""Record the golden /detect answers to a scratch file, or compare two such files byte for byte.

The byte-for-byte check is for a refactor on ONE machine (answers there are deterministic):

    python -m tests.record_golden --out /tmp/before.json        # on the old code
    python -m tests.record_golden --out /tmp/after.json         # on the new code, same machine
    python -m tests.record_golden --compare /tmp/before.json /tmp/after.json

It bakes the demo artifact into a temporary folder (or takes --artifact) and records the same
answers as tests/test_detect_golden.py. Never compare bytes against a file another CPU recorded
(such as tests/fixtures/detect_demo_golden.json): that is golden_compare's tolerant check.
Exit status: 0 identical, 1 different.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the tests' helpers import each other flat


def record_to(out: Path, artifact: Path | None) -> None:
    from test_detect_golden import record

    if artifact is None:
        from training.bake import bake_demo

        with tempfile.TemporaryDirectory() as tmp:
            answers = record(bake_demo(Path(tmp) / "demo").folder)
    else:
        answers = record(artifact)
    out.write_text(json.dumps(answers, indent=0, sort_keys=True) + "\n")
    print(f"recorded {len(answers)} answers to {out}")


def compare(a: Path, b: Path) -> int:
    first, second = json.loads(a.read_text()), json.loads(b.read_text())
    bad = sorted(set(first) ^ set(second))
    for key in bad:
        print(f"only in one file: {key}")
    for key in sorted(set(first) & set(second)):
        if first[key] != second[key]:
            bad.append(key)
            print(f"differs: {key}: sha256 {hashlib.sha256(first[key].encode()).hexdigest()[:12]} vs "
                  f"{hashlib.sha256(second[key].encode()).hexdigest()[:12]}")
    print(f"{len(bad)} of {len(set(first) | set(second))} answers differ" if bad else
          f"all {len(first)} answers byte-identical")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", type=Path, help="record the answers to this (scratch) file")
    group.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"),
                       help="two recordings made on this machine, compared byte for byte")
    parser.add_argument("--artifact", type=Path, help="record on this artifact instead of a fresh demo bake")
    args = parser.parse_args(argv)
    if args.out:
        record_to(args.out, args.artifact)
        return 0
    return compare(*args.compare)


if __name__ == "__main__":
    sys.exit(main())
