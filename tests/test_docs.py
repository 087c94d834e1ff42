"""The README and docs/: every relative link (and its #anchor) resolves, every topic page is linked from
the README, the README stays a first screen, and CI's test command is where .ci/run looks for it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
#: [text](target) outside code; a target may not contain spaces or parentheses
LINK = re.compile(r"!?\[[^\]]*\]\(([^()\s]+)\)")
#: the longest README the issue's "about 150 lines" allows before it is a notebook again
README_MAX_LINES = 170


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor in ``page``; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S).splitlines():
        match = re.match(r"^#{1,6} (.+)$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            found.add(base if count == 0 else f"{base}-{count}")
            seen[base] = count + 1
    return found


def links(page: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(page.read_text(encoding="utf-8"))) if not re.match(r"[a-z]+:", t)]


def test_slug_is_githubs():
    assert slug("Tuning hyper-parameters (`calbench tune`)") == "tuning-hyper-parameters-calbench-tune"
    assert slug("The paper's datasets: `calbench data prepare`") == "the-papers-datasets-calbench-data-prepare"
    assert slug("When to defer: selective prediction, conformal sets, smooth ECE, shift") == (
        "when-to-defer-selective-prediction-conformal-sets-smooth-ece-shift"
    )


def broken_links(page: Path) -> list[str]:
    """The relative links of ``page`` whose file or heading does not exist, with what is missing."""
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with that anchor in {resolved.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    assert page.is_file(), page
    assert broken_links(page) == []


def test_the_link_check_finds_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "a.md").write_text(
        "# A\n\n## Two words\n\n[ok](#two-words) [bad](#nope) [gone](b.md) [there](c.md#a) [no](c.md#z)"
        " `[code](d.md)`\n\n```\n[fenced](e.md)\n```\n"
    )
    (tmp_path / "c.md").write_text("# A\n")
    assert anchors(tmp_path / "a.md") == {"a", "two-words"}
    assert broken_links(tmp_path / "a.md") == [
        "#nope: no heading with that anchor in a.md",
        "b.md: no such file",
        "c.md#z: no heading with that anchor in c.md",
    ]


def test_the_readme_is_a_first_screen_and_links_every_topic_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= README_MAX_LINES
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    assert [p.relative_to(ROOT).as_posix() for p in PAGES[1:] if p not in linked] == []
    first_screen = "\n".join(readme.splitlines()[:80])
    for what in ("calbench compare --model tiny --data synthetic", "--weights", "--data path/to/mydata"):
        assert what in first_screen


def test_the_test_command_is_one_bash_block_after_its_marker():
    """.ci/run runs the first fenced block after the marker: it must be there, and be the whole suite."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.count("<!-- test-command -->") == 1
    block = re.search(r"<!-- test-command -->\n```bash\n(.*?)\n```", readme, re.S)
    assert block is not None
    assert 'pip install -e ".[dev]"' in block.group(1) and "python -m pytest -q" in block.group(1)
