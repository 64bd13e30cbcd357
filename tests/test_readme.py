"""The README stays short and its commands real; README and docs/ link only to files that exist.

The README is the front page: at most 150 lines, opening with the two commands for a fresh machine
(`make demo`, `make test`), both targets of the Makefile. Every other topic is a page of docs/, and
each page is linked from the README.
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_LINES = 150
FIRST_BLOCK = [
    "make demo    # fresh machine: create .venv, install, run the whole benchmark pipeline (dvc repro) "
    "on the offline demo profile",
    "make test    # the test suite (the same command CI runs via .ci/run)",
]

FENCE = re.compile(r"^ *```[^\n]*\n.*?^ *```[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target); the text may run over a line break.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def doc_pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def fenced_blocks(text: str) -> list[list[str]]:
    """The lines inside each fenced code block, in order."""
    return [block.split("\n")[1:-1] for block in FENCE.findall(text)]


def links(text: str) -> list[str]:
    """The link targets of a Markdown text, outside code blocks and code spans."""
    return LINK.findall(INLINE_CODE.sub("", FENCE.sub("", text)))


def relative_target(source: Path, target: str) -> Path | None:
    """Where a relative link of `source` points (anchor dropped); None for web, mail and in-page links."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
        return None
    return source.parent / target.split("#", 1)[0]


def test_readme_has_at_most_150_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines; move detail to a page of docs/"


def test_readme_opens_with_the_two_commands_and_both_are_makefile_targets():
    blocks = fenced_blocks(README.read_text())
    assert blocks, "README.md has no code block"
    assert [line.rstrip() for line in blocks[0]] == FIRST_BLOCK
    makefile = (ROOT / "Makefile").read_text()
    for line in blocks[0]:
        target = line.split("#", 1)[0].split()[1]
        assert re.search(rf"^{re.escape(target)}:", makefile, re.MULTILINE), f"no Makefile target '{target}'"


def test_docs_has_pages():
    assert doc_pages(), "docs/ holds no page"


@pytest.mark.parametrize("page", [README, *doc_pages()], ids=lambda path: path.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page: Path):
    broken = [target for target in links(page.read_text())
              if (path := relative_target(page, target)) is not None and not path.exists()]
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {path.resolve() for target in links(README.read_text())
              if (path := relative_target(README, target)) is not None}
    unlinked = [page.relative_to(ROOT).as_posix() for page in doc_pages() if page.resolve() not in linked]
    assert not unlinked, f"README.md does not link to {unlinked}"


def test_the_link_finder_sees_links_and_skips_code():
    text = ("See [a](docs/a.md), ![b](b.png \"title\") and [two\nlines](c.md#part).\n"
            "`[not](code.md)`\n```bash\n[nor](this.md)\n```\n[web](https://example.com)\n")
    assert links(text) == ["docs/a.md", "b.png", "c.md#part", "https://example.com"]
    assert relative_target(README, "https://example.com") is None
    assert relative_target(README, "c.md#part") == ROOT / "c.md"
