"""The documentation stays what it says it is: a short README, links that resolve, and source
comments that cite the paper or docs/design.md rather than issue numbers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted([README, *(ROOT / "docs").rglob("*.md")])
MAX_README_LINES = 250

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
ISSUE_NUMBER = re.compile(r"\bissues?\s*(?:#\s*)?\d+", re.IGNORECASE)


def links(text: str) -> list[tuple[str, str]]:
    """``(path, anchor)`` of every relative Markdown link or image outside fenced code; the path
    is empty for an anchor on the same page, the anchor empty when there is none.

    >>> links("[a](docs/x.md#top) [b](https://e.org) ![c](f.png) [d](#here)")
    [('docs/x.md', 'top'), ('f.png', ''), ('', 'here')]
    >>> links("```\\n[a](nowhere.md)\\n```\\n[b](y.md)")
    [('y.md', '')]
    """
    found = []
    for target in LINK.findall(FENCE.sub("", text)):
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # not http:, mailto:
            path, _, anchor = target.partition("#")
            found.append((path, anchor))
    return found


def relative_links(text: str) -> list[str]:
    """The files that a page's relative links point at."""
    return [path for path, _ in links(text) if path]


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to
    hyphens, ``-1``, ``-2`` … on repeats.

    >>> sorted(anchors("# Results\\n## Claim (c) at two sizes\\n### Why `--tail`\\n## Results"))
    ['claim-c-at-two-sizes', 'results', 'results-1', 'why---tail']
    """
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", text), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): measurements go to "
        "docs/results.md, method notes to docs/methods/"
    )


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = [
        target
        for target in relative_links(page.read_text(encoding="utf-8"))
        if not (page.parent / target).exists()
    ]
    assert not broken, f"{page.relative_to(ROOT)}: links to missing files: {broken}"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_anchors_resolve(page: Path) -> None:
    """A link to a section of a Markdown page names a heading that page has."""
    broken = []
    for path, anchor in links(page.read_text(encoding="utf-8")):
        target = page.parent / path if path else page
        if (anchor and target.suffix == ".md" and target.is_file()
                and anchor not in anchors(target.read_text(encoding="utf-8"))):
            broken.append(f"{path}#{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: links to missing sections: {broken}"


SOURCE_PATH = re.compile(r"\b(?:src/mapa_vae|tests|benchmarks)/[\w/]+\.py\b")


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_source_files_exist(page: Path) -> None:
    """A page that names a test, a benchmark or a module (``tests/test_sbn.py``) names one that
    exists: a file renamed or removed leaves no stale pointer."""
    missing = sorted({path for path in SOURCE_PATH.findall(page.read_text(encoding="utf-8"))
                      if not (ROOT / path).is_file()})
    assert not missing, f"{page.relative_to(ROOT)} names files that do not exist: {missing}"


def test_docs_pages_link_only_inside_the_repository() -> None:
    """A relative link that climbs out of the repository would resolve here and nowhere else."""
    outside = [
        (str(page.relative_to(ROOT)), target)
        for page in DOCS
        for target in relative_links(page.read_text(encoding="utf-8"))
        if not (page.parent / target).resolve().is_relative_to(ROOT)
    ]
    assert not outside


def test_issue_number_pattern() -> None:
    """The pattern below catches the forms it must, and not the paper's equation numbers."""
    for text in ("issue 12", "Issue #13", "issues 3", "(issue13)"):
        assert ISSUE_NUMBER.search(text), text
    for text in ("Eq. 10", "docs/design.md §3", "the issue's user", "tissue 3"):
        assert not ISSUE_NUMBER.search(text), text


def test_source_cites_no_issue_numbers() -> None:
    """Docstrings and comments cite the paper's equations or docs/design.md, not an issue tracker."""
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted((ROOT / "src").rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if ISSUE_NUMBER.search(line)
    ]
    assert not found, "issue numbers in src/:\n" + "\n".join(found)
