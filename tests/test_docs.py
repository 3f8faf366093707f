"""Every reference to the project's science resolves inside the repository.

Code, configuration files and documents cite `docs/science.md` by section (`docs/science.md §5.3`,
ranges such as `§2.3-2.5`), by decision (`docs/science.md D4`) or by a Markdown link to a heading
anchor (`science.md#d4-...`). These tests fail when a cited section, decision or anchor does not
exist, and when a file cites design documents that are not part of the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCIENCE = ROOT / "docs" / "science.md"
SCANNED = ("nas", "tuning", "sweeps", "bench", "tools", "docs", "configs", "tests", "README.md")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt"}
# Documents outside the repository (spelled in pieces so that this file does not cite them).
OUTSIDE = tuple(name + suffix for name, suffix in (("SCIENCE", ".md"), ("ARCHITECTURE", ".md"), ("STYLE", ".md")))
OUTSIDE_WORDS = ("DECI" + "SIONS", "[" + "Q]")

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
_SECTION = re.compile(r"^(\d+(?:\.\d+)?)\.?\s")
_DECISION = re.compile(r"^(D\d+)\.\s")
_ITEM = r"(?:§\s?\d+(?:\.\d+)?(?:\s?[-–]\s?\d+(?:\.\d+)?)?|D\d+(?:\s?[-–]\s?D?\d+)?)"
# `docs/science.md` followed by a list of sections and decisions: "§3, §5.7, D2 and D12".
_CITATION = re.compile(r"docs/science\.md`?((?:\s*(?:,|;|and)?\s*" + _ITEM + r")+)")
_ANCHOR = re.compile(r"science\.md#([A-Za-z0-9_-]+)")


def github_slug(heading: str) -> str:
    """The anchor GitHub gives an ASCII heading: lower case, punctuation dropped, spaces as '-'."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def headings(text: str) -> list[str]:
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := _HEADING.match(line)):
            lines.append(match.group(2))
    return lines


def targets(text: str) -> tuple[set[str], set[str], set[str]]:
    """(section numbers, decision ids, anchors) defined by the headings of `text`."""
    sections, decisions, anchors = set(), set(), set()
    for heading in headings(text):
        anchors.add(github_slug(heading))
        if match := _SECTION.match(heading):
            sections.add(match.group(1))
        elif match := _DECISION.match(heading):
            decisions.add(match.group(1))
    return sections, decisions, anchors


def _expand(item: str) -> list[str]:
    """`§2.3-2.5` -> ["2.3", "2.5"]; `D1-D2` -> ["D1", "D2"]: both ends of a range must exist."""
    item = item.replace("§", "").replace(" ", "").replace("–", "-")
    first, _, last = item.partition("-")
    if first.startswith("D"):
        return [first] + ([last if last.startswith("D") else "D" + last] if last else [])
    return [first] + ([last] if last else [])


def citation_errors(text: str, defined: tuple[set[str], set[str], set[str]], bare: bool = False) -> list[str]:
    """The citations in `text` that name no section, decision or anchor of docs/science.md. With
    `bare`, every `§N` and `DN` counts (the document's own cross-references)."""
    sections, decisions, anchors = defined
    cited: list[str] = []
    if bare:
        cited += re.findall(r"§\s?\d+(?:\.\d+)?(?:\s?[-–]\s?\d+(?:\.\d+)?)?", text)
        cited += re.findall(r"\bD\d+(?:-D\d+)?\b", text)
    else:
        for match in _CITATION.finditer(text):
            cited += re.findall(_ITEM, match.group(1))
    errors = []
    for item in cited:
        for key in _expand(item):
            if key not in (decisions if key.startswith("D") else sections):
                errors.append(f"{item.strip()} (no {key})")
    errors += [f"#{a}" for a in _ANCHOR.findall(text) if a not in anchors]
    return errors


def scanned_files() -> list[Path]:
    files = []
    for name in SCANNED:
        path = ROOT / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix in SUFFIXES]
    return [p for p in files if p.resolve() != Path(__file__).resolve()]


@pytest.fixture(scope="module")
def defined() -> tuple[set[str], set[str], set[str]]:
    return targets(SCIENCE.read_text(encoding="utf-8"))


def test_science_document_has_numbered_sections_and_decisions(defined):
    sections, decisions, _ = defined
    assert {"1", "2.5", "5.1", "5.3", "6.2", "9", "10"} <= sections
    numbers = sorted(int(d[1:]) for d in decisions)
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 8, numbers
    # Anchors are predictable only for ASCII headings.
    for heading in headings(SCIENCE.read_text(encoding="utf-8")):
        assert heading.isascii(), heading


def test_science_document_cross_references_resolve(defined):
    assert citation_errors(SCIENCE.read_text(encoding="utf-8"), defined, bare=True) == []


def test_no_file_cites_documents_outside_the_repository_or_missing_sections(defined):
    problems = []
    for path in scanned_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        rel = path.relative_to(ROOT)
        for number, line in enumerate(text.splitlines(), 1):
            for word in OUTSIDE + OUTSIDE_WORDS:
                if word in line:
                    problems.append(f"{rel}:{number}: cites {word}, which is not in the repository")
        problems += [f"{rel}: docs/science.md has no {error}" for error in citation_errors(text, defined)]
    assert not problems, "\n".join(problems)


def test_checker_reports_missing_sections_decisions_and_anchors(defined):
    text = (
        "see docs/science.md §5.3 and D4; docs/science.md §2.3-2.9, D99 and "
        "[x](../science.md#no-such-heading), [y](../science.md#d4-discretized-accuracy-keeps-the-trained-edge-weights)"
    )
    assert citation_errors(text, defined) == ["§2.3-2.9 (no 2.9)", "D99 (no D99)", "#no-such-heading"]
    assert citation_errors("docs/science.md §99", defined, bare=True) == ["§99 (no 99)"]
