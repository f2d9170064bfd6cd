"""`compress report`: bench results -> a Markdown summary and a self-contained HTML page with plots."""

from __future__ import annotations

import shutil
from pathlib import Path

from compress.output import atomic_folder
from compress.report.plots import make_plots
from compress.report.render import html_page, markdown
from compress.report.rows import load_rows, result_files


def build_report(paths: list[Path], out: Path, title: str | None = None, reproduce: list[str] | None = None,
                 notes: list[str] | None = None, force: bool = False) -> Path:
    """Write ``out/README.md``, ``out/report.html``, ``out/plots/*.png`` and copies of the results."""
    files = result_files(paths)
    rows = load_rows(paths)
    plots = make_plots(rows)
    title = title or f"compress-workbench report: {out.name}"
    reproduce = reproduce if reproduce is not None else _commands(rows)
    with atomic_folder(out, force=force) as tmp:
        (tmp / "plots").mkdir()
        for name, png in plots.items():
            (tmp / "plots" / name).write_bytes(png)
        (tmp / "results").mkdir()
        for file in files:
            shutil.copyfile(file, tmp / "results" / file.name)
        (tmp / "README.md").write_text(markdown(title, rows, plots, reproduce, notes or []))
        (tmp / "report.html").write_text(html_page(title, rows, plots, reproduce, notes or []))
    return out


def _commands(rows) -> list[str]:
    """Each row's own bench command, as the results recorded it."""
    return [" ".join(r.result.command) for r in rows if r.result.command]
