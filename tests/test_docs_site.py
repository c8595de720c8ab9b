"""The docs site builds with `mkdocs build --strict`, and the README stays a front door.

Strict mode with mkdocs.yml's `validation` turns a broken link, a missing anchor or a page left
out of the nav into a failure; the planted-link test shows that it does. Needs mkdocs-material
(dev extra); skipped where it is not installed.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("material", reason="needs mkdocs-material (dev or docs extra)")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def build(root: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def test_mkdocs_build_strict_passes(tmp_path):
    done = build(ROOT, tmp_path / "site")
    assert done.returncode == 0, done.stdout + done.stderr
    for page in ("api", "operations", "settings", "benchmarks", "troubleshooting", "getting-started", "training"):
        assert (tmp_path / "site" / page / "index.html").is_file(), page
    started = re.sub(r"<[^>]+>", "", (tmp_path / "site" / "getting-started" / "index.html").read_text(encoding="utf-8"))
    assert "python -m pytest" in started and "--8&lt;--" not in started  # the README's commands, included


def test_a_broken_link_fails_the_build(tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    shutil.copy(README, copy / "README.md")  # getting-started.md includes its two commands
    with open(copy / "docs" / "operations.md", "a", encoding="utf-8") as f:
        f.write("\nSee [the API's limits](api.md#no-such-section).\n")
    (copy / "docs" / "orphan.md").write_text("# A page nobody put in the nav\n")
    done = build(copy, tmp_path / "site")
    assert done.returncode != 0
    assert "no-such-section" in done.stderr and "orphan.md" in done.stderr, done.stderr


def test_readme_is_a_front_door():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    commands = text.split("[start:two-commands]", 1)[1].split("[end:two-commands]", 1)[0]
    assert "pip install -e" in commands and "dapo serve" in commands and "python -m pytest" in commands
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def test_every_figure_in_the_readme_links_to_the_benchmarks():
    """A line of the README that quotes a measured figure (a unit or a ratio) links to
    docs/benchmarks.md, where its date, machine and command are."""
    figure = re.compile(r"\d\s?(ms|s|min|MB|img/s|x|×|%)\b|\d+\.\d+\s?(ms|s|x|×)")
    lines = README.read_text(encoding="utf-8").splitlines()
    in_code = False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code or not figure.search(line):
            continue
        paragraph = " ".join(lines[max(0, i - 2):i + 3])
        assert "docs/benchmarks.md" in paragraph, f"README line {i + 1} quotes a figure without a link: {line}"
