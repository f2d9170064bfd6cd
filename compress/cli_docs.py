"""The option tables of the command pages under docs/, made from the parsers themselves so that a page never
misses or misstates an option: `python -m compress.cli_docs` rewrites each page's table (between its markers),
and tests/test_docs.py checks that every table is what the parsers give now."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PAGES = {"models": "quantize.md", "quantize": "quantize.md", "prune": "prune.md", "bench": "bench-and-report.md",
         "report": "bench-and-report.md", "export-onnx": "exports.md", "export-gguf": "exports.md",
         "sweep": "recipes-and-sweeps.md", "recipe": "recipes-and-sweeps.md", "distill run": "distill.md",
         "setup": "bench-and-report.md"}
"""Each command's page under docs/."""
BEGIN, END = "<!-- options:begin (python -m compress.cli_docs) -->", "<!-- options:end -->"


def commands() -> dict[str, argparse.ArgumentParser]:
    """Every runnable command (``recipe run``, ``distill run``...) -> its parser."""
    from compress.cli import build_parser
    from distill.cli import build_parser as distill_parser

    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            found[prefix.strip()] = parser
        for action in subs:
            for name, sub in action.choices.items():
                walk(sub, f"{prefix}{name} ")

    walk(build_parser(), "")
    walk(distill_parser(), "distill ")
    return found


def _cell(text: str) -> str:
    return re.sub(r"\s+", " ", text or "").replace("|", "\\|").strip()


def option_table(name: str, parser: argparse.ArgumentParser) -> str:
    rows = [f"### `{'compress ' if not name.startswith('distill') else ''}{name}`", "",
            f"`{_cell(parser.format_usage().removeprefix('usage: '))}`", "", "| option | what it does |", "|---|---|"]
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or "-h" in action.option_strings:
            continue
        flags = ", ".join(action.option_strings) or action.metavar or action.dest
        help_text = action.help or ""
        if action.choices and not isinstance(action, argparse._SubParsersAction) and "{" not in help_text:
            help_text += f" (one of: {', '.join(map(str, action.choices))})"
        rows.append(f"| `{flags}` | {_cell(help_text)} |")
    return "\n".join(rows) + "\n"


def page_tables() -> dict[str, str]:
    """Each page's generated section (several commands may share a page)."""
    tables: dict[str, list[str]] = {}
    for name, parser in commands().items():
        tables.setdefault(PAGES[name], []).append(option_table(name, parser))
    return {page: f"{BEGIN}\n## All options\n\n" + "\n".join(parts) + END for page, parts in tables.items()}


def rewrite(docs: Path) -> list[Path]:
    written = []
    for page, section in page_tables().items():
        path = docs / page
        text = path.read_text()
        if BEGIN in text:
            text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":
    for path in rewrite(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "docs"):
        print(f"wrote the option table of {path}")
