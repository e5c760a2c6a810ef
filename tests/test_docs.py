"""The README and docs/ hold together: every relative link reaches a file that
exists, every `#anchor` a heading of the file it names, and the README stays a
front page (at most README_LINES lines) with the rest behind it in docs/.

Anchors follow GitHub's rule for headings: the text as rendered (code spans keep
their text, links their label), lowercased, every character that is not a letter,
digit, '_', '-' or space dropped, spaces turned into '-'; a repeated heading gets
'-1', '-2', ... Lines inside fenced code blocks are neither headings nor links.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
README_LINES = 300
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
# [label](target) and ![alt](target), target up to the first space or ')'.
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:


def markdown_files() -> list[Path]:
    return [README, *sorted((REPO / "docs").rglob("*.md"))]


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, in order."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link keeps its label
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.replace("*", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    targets = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        targets.extend(LINK.findall(CODE_SPAN.sub("", line)))
    return targets


def broken_links(path: Path) -> list[str]:
    """Each relative link of path whose file or anchor does not exist, with why."""
    broken = []
    for target in links(path):
        if EXTERNAL.match(target):
            continue
        where, _, anchor = target.partition("#")
        resolved = (path.parent / where).resolve() if where else path.resolve()
        shown = resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else resolved
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {shown}")
    return broken


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(path: Path) -> None:
    assert broken_links(path) == []


def test_the_link_checker_catches_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## `check --credentials` first\n")
    page.write_text(
        "# Page\n\n## Exit codes\n\n"
        "[ok](other.md#check---credentials-first) [ok](#exit-codes) [web](https://example.com)\n"
        "[gone](missing.md) [no heading](other.md#nowhere) [no heading here](#exit)\n"
        "```sh\n[in code](missing-too.md)\n```\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        f"other.md#nowhere: no heading #nowhere in {(tmp_path / 'other.md').resolve()}",
        f"#exit: no heading #exit in {page.resolve()}",
    ]


def test_slugs_follow_githubs_rule() -> None:
    assert slug("Records are shared too: the key rule") == "records-are-shared-too-the-key-rule"
    assert slug("A create answered `Failed`") == "a-create-answered-failed"
    assert slug("Splitter: `bench/split.py`") == "splitter-benchsplitpy"
    assert slug("Several daemons (coordination)") == "several-daemons-coordination"
    assert slug("The header, before a file's first job") == "the-header-before-a-files-first-job"


def test_readme_fits_on_a_screen_and_points_into_docs() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_LINES
    linked = {t.partition("#")[0] for t in links(README)}
    for page in (
        "configuration.md",
        "marketo.md",
        "deployment.md",
        "benchmarks.md",
        "reliability.md",
        "architecture.md",
    ):
        assert f"docs/{page}" in linked, f"the README links to docs/{page}"
