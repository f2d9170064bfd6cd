"""Run the support matrix (tests/test_family_matrix.py: every command on every tiny family, each cell read back or
refused in one line) and keep what it found: reports/family-matrix.json, which the test then holds every later run
to, and the README's family x command table, rendered from it.

    python benchmarks/family_matrix.py                 # about a quarter of an hour on 2 cores
    python benchmarks/family_matrix.py --report-only   # re-render the README's table from the JSON

A cell that fails (neither read back nor refused as a refusal must be) fails the run: nothing is written then.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compress.report.matrix import cells_from_json, render_table, replace_between_markers  # noqa: E402
from compress.tiny import TINY_CONFIGS  # noqa: E402

JSON = ROOT / "reports" / "family-matrix.json"
README = ROOT / "README.md"


def run_matrix() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "matrix.json"
        env = dict(os.environ, COMPRESS_MATRIX_OUT=str(record))
        env.setdefault("OMP_NUM_THREADS", "2")  # on 2 cores more threads only fight each other
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        command = [sys.executable, "-m", "pytest", "tests/test_family_matrix.py", "-q", "-p", "no:cacheprovider",
                   "-x", "-k", "test_cell"]
        if subprocess.run(command, cwd=ROOT, env=env).returncode != 0:
            raise SystemExit("the matrix failed: a cell was neither read back nor refused as it should be; "
                             "nothing was written")
        JSON.write_text(record.read_text())


def write_table() -> None:
    cells = cells_from_json(JSON)
    README.write_text(replace_between_markers(README.read_text(), render_table(cells, list(TINY_CONFIGS))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report-only", action="store_true", help="re-render the README's table from the JSON")
    args = parser.parse_args()
    if not args.report_only:
        run_matrix()
    write_table()
    print(f"wrote {JSON.relative_to(ROOT)} and the table in {README.name}")


if __name__ == "__main__":
    main()
