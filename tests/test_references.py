"""Every Markdown page a docstring or comment cites exists in the repository, and every section number it
cites (the section sign followed by N) is a heading of that page: a clone holds everything the code refers
to. Section numbers of papers are cited with the paper (arXiv id or the word "paper") on the same line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("refiner", "gan_adapters", "teachers", "metrics", "fileformats", "scripts", "benchmarks", "tests")
MD = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.md)\b")
SECTION = re.compile(r"((?:[\w-]+/)*[\w-]+\.md)\s*(§\s*[\d.]+(?:\s*[-–,]\s*§?\s*[\d.]+)*)")


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if p != Path(__file__).resolve())


def _resolve(name: str) -> Path | None:
    for base in (ROOT, ROOT / "docs"):
        if (base / name).is_file():
            return base / name
    return None


def _headings(page: Path) -> set[str]:
    numbers = set()
    for line in page.read_text(encoding="utf-8").splitlines():
        m = re.match(r"#+\s+(\d+(?:\.\d+)*)\.?\s", line)
        if m:
            numbers.add(m.group(1))
    return numbers


def _ours(name: str) -> bool:
    """A page of this repository (docs/…, tests/…, or a bare name), not one of another code base (DMD2's
    experiments/imagenet/README.md) or of the folder outside the repository the project started from."""
    return name.startswith(("docs/", "tests/")) or "/" not in name or name.startswith(("shared/", "research/"))


def test_cited_files_exist():
    missing = []
    for path in _sources():
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for name in MD.findall(line):
                if _ours(name) and _resolve(name) is None:
                    missing.append(f"{path.relative_to(ROOT)}:{lineno}: {name}")
    assert not missing, "cited files that are not in the repository:\n" + "\n".join(missing)


def test_every_section_sign_names_a_page_and_a_heading():
    problems = []
    for path in _sources():
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if "§" not in line:
                continue
            cited = SECTION.findall(line)
            if not cited and not re.search(r"arXiv|paper", line):
                problems.append(f"{path.relative_to(ROOT)}:{lineno}: '§' without a page before it")
            for name, sections in cited:
                page = _resolve(name)
                if page is None:
                    continue  # reported by test_cited_files_exist
                headings = _headings(page)
                for number in re.findall(r"\d+(?:\.\d+)*", sections):
                    if number not in headings:
                        problems.append(f"{path.relative_to(ROOT)}:{lineno}: {name} has no section {number}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", ["docs/design.md", "docs/diff_instruct.md", "docs/pickle_formats.md",
                                  "docs/metrics_biggan_data.md"])
def test_design_pages_are_in_the_repository(page):
    assert (ROOT / page).is_file()
