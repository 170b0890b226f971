"""Every link in the README and the docs pages resolves: a relative link to a file of the repository, an anchor to a
heading of its page (by GitHub's slug rules). Web and mail links are not followed."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
# A code span: its backticks and what they hold, within one paragraph.
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1)(?:[^\n]|\n(?![ \t]*\n)))+?\1")
# [text](target) and ![alt](target), the text over lines if need be; the target may be <bracketed> and may carry a
# "title".
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s)]*)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:[ \t]*(<[^>]*>|\S+)", re.M)
_EXTERNAL = ("http://", "https://", "mailto:")


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        opened = _FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)[0] * len(opened.group(1))
        elif fence is not None:
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                fence = None
        else:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: markup dropped to its text, lowercase, every character that is not a
    letter, a digit, a space, a hyphen or an underscore removed, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link or an image: its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor; a repeated one gets -1, -2, … as GitHub numbers them."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in _prose_lines(text):
        heading = _HEADING.match(line)
        if not heading:
            continue
        base = slug(heading.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every inline link, image and link reference outside code."""
    prose = [""] * len(text.splitlines())
    for number, line in _prose_lines(text):
        prose[number - 1] = line
    outside_code = _CODE_SPAN.sub(lambda span: "\n" * span.group(0).count("\n"), "\n".join(prose))
    found = sorted([*_INLINE_LINK.finditer(outside_code), *_REFERENCE.finditer(outside_code)], key=lambda m: m.start())
    return [(outside_code.count("\n", 0, m.start(1)) + 1, m.group(1).strip("<>")) for m in found]


def broken_links(page: Path, root: Path) -> list[str]:
    """Why each broken link of `page` is broken, as 'file:line: (link) why'."""
    text = page.read_text(encoding="utf-8")
    problems = []
    for number, target in links(text):
        where = f"{page.relative_to(root)}:{number}: ({target})"
        if target.lower().startswith(_EXTERNAL):
            continue
        path_part, _, anchor = target.partition("#")
        if not path_part and not anchor:
            problems.append(f"{where} is empty")
            continue
        linked = (page.parent / unquote(path_part)).resolve() if path_part else page
        if path_part and path_part.startswith("/"):
            problems.append(f"{where} is absolute: write it relative to {page.relative_to(root)}")
            continue
        if not linked.is_relative_to(root.resolve()):
            problems.append(f"{where} leads outside the repository")
            continue
        if not linked.exists():
            problems.append(f"{where} names {linked.relative_to(root.resolve())}, which does not exist")
            continue
        if anchor:
            if linked.suffix != ".md" or not linked.is_file():
                problems.append(f"{where} has an anchor, but {linked.name} is not a markdown page")
            elif unquote(anchor) not in anchors(linked.read_text(encoding="utf-8")):
                problems.append(f"{where}: {linked.name} has no heading whose anchor is #{anchor}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(page):
    problems = broken_links(page, ROOT)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_anchors_follow_githubs_slug_rules():
    text = ("# Serving (`clearml-sglang run`)\n" + "## Keys: a name, limits and a priority\n" * 3
            + "```\n# not a heading\n```\n### [A link](x.md) and_under 1.2\n")
    assert anchors(text) == {"serving-clearml-sglang-run", "keys-a-name-limits-and-a-priority",
                             "keys-a-name-limits-and-a-priority-1", "keys-a-name-limits-and-a-priority-2",
                             "a-link-and_under-12"}


def test_a_broken_link_is_reported_with_its_page_link_and_reason(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other\n\n## A part\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text("# Page\n\n[ok](other.md#a-part) [ok](#page) [web](https://example.com/x) `[code](nowhere.md)`\n"
                    "[gone](missing.md) [no anchor](other.md#nowhere) [here](#nothing) ![img](images/x.png)\n"
                    "```\n[fenced](nowhere.md)\n```\nA [link over\ntwo lines](other.md#a-gone-part).\n")
    problems = broken_links(page, tmp_path)
    assert problems == [
        "docs/page.md:4: (missing.md) names docs/missing.md, which does not exist",
        "docs/page.md:4: (other.md#nowhere): other.md has no heading whose anchor is #nowhere",
        "docs/page.md:4: (#nothing): page.md has no heading whose anchor is #nothing",
        "docs/page.md:4: (images/x.png) names docs/images/x.png, which does not exist",
        "docs/page.md:9: (other.md#a-gone-part): other.md has no heading whose anchor is #a-gone-part",
    ]
