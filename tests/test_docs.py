"""The README is short and every command's options live in its page under docs/, in a table made from the parsers:
nothing the CLI takes is undocumented, and no table is stale."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from compress.cli_docs import BEGIN, END, PAGES, commands, page_tables

ROOT = Path(__file__).resolve().parents[1]


def test_every_command_has_a_page():
    assert set(commands()) == set(PAGES)


@pytest.mark.parametrize("command", sorted(PAGES))
def test_every_option_is_in_its_commands_page(command):
    page = ROOT / "docs" / PAGES[command]
    text = page.read_text()
    parser = commands()[command]
    options = [s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
    missing = [o for o in options if not re.search(re.escape(o) + r"(?![\w-])", text)]
    assert missing == [], f"{page.relative_to(ROOT)} does not mention {', '.join(missing)}"


@pytest.mark.parametrize("page", sorted(set(PAGES.values())))
def test_each_pages_option_table_is_what_the_parsers_give(page):
    text = (ROOT / "docs" / page).read_text()
    assert text[text.index(BEGIN):text.index(END) + len(END)] == page_tables()[page], (
        f"docs/{page} is stale: run python -m compress.cli_docs")


def test_the_readme_is_short_and_links_every_page():
    readme = (ROOT / "README.md").read_text()
    assert readme.count("\n") <= 200
    assert readme.startswith("# compress-workbench\n\n```bash\npython3 -m venv .venv")
    for page in sorted(set(PAGES.values())) + ["design.md", "benchmarks.md"]:
        assert f"docs/{page}" in readme, page
