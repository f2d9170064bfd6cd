"""Pieces the side-by-side benchmark scripts share: `compress bench` in a child process (so each
model's peak memory is its own), the report with extra result files, and timing the whole script."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent


def offline_defaults() -> None:
    """Two threads unless told otherwise, no hub, no tokenizer threads: call before importing torch."""
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def bench_subprocess(model: str, out: Path, extra: list[str]) -> None:
    command = [sys.executable, "-m", "compress.cli", "bench", model, "--out", str(out), *extra]
    print("$", " ".join(command), file=sys.stderr)
    subprocess.run(command, check=True, cwd=ROOT)


def report_with_extras(bench_files: list[Path], out: Path, title: str, reproduce: list[str], notes: list[str],
                       results: Path, extras: tuple[str, ...]) -> Path:
    """The report of ``bench_files``, plus copies of the extra result files that exist in ``results``."""
    from compress.report import build_report

    folder = build_report(bench_files, out, title=title, reproduce=reproduce, notes=notes, force=True)
    for extra in extras:
        if (results / extra).is_file():
            (folder / "results" / extra).write_bytes((results / extra).read_bytes())
    print(f"report written to {folder}")
    return folder


def timed_main(main: Callable[[], int]) -> None:
    started = time.perf_counter()
    code = main()
    print(f"took {time.perf_counter() - started:.0f} s", file=sys.stderr)
    sys.exit(code)
