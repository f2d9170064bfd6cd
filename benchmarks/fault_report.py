"""The fault suite's report: runs tests/faults (SIGKILL, SIGTERM, Ctrl-C, a full disk, racing runs and damaged
files, injected into `compress` and `distill` as users start them) and writes what was injected, where, and what
was checked after it.

    OMP_NUM_THREADS=2 COMPRESS_DATA_DIR=../shared/data python benchmarks/fault_report.py

writes reports/faults.md and reports/faults.json. CI runs the same tests as part of the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, offline_defaults  # noqa: E402

offline_defaults()


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", type=Path, help="build the report from the record of a suite run made with "
                        "COMPRESS_FAULT_RECORD=FILE (e.g. CI's whole suite) instead of running tests/faults now")
    parser.add_argument("--summary", default=None, help="with --record: that run's pytest summary line")
    args = parser.parse_args()
    if args.record:
        rows, minutes = json.loads(args.record.read_text()), None
        summary, returncode = args.summary or "see the suite's log", 0 if all(r["passed"] for r in rows) else 1
    else:
        with tempfile.TemporaryDirectory() as scratch:
            record = Path(scratch) / "faults.json"
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/faults"],
                                  cwd=ROOT, env={**os.environ, "COMPRESS_FAULT_RECORD": str(record)},
                                  capture_output=True, text=True)
            minutes = (time.perf_counter() - started) / 60
            rows = json.loads(record.read_text()) if record.is_file() else []
        summary = next((line for line in reversed(done.stdout.splitlines())
                        if " passed" in line or " failed" in line), "no summary")
        returncode = done.returncode
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    lines = ["# Fault suite", "",
             f"`pytest tests/faults` at {commit}: {summary.strip('= ')}; {len(rows)} faults injected, "
             f"{sum(r['passed'] for r in rows)} held"
             + (f"; {minutes:.1f} minutes on 2 cores" if minutes is not None else "") + ". Each row is one fault "
             "injected into a command started as a user starts it (a child process through the `compress` or "
             "`distill` entry point), then what was checked.", "",
             "| command | fault | where | checked | held? |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['command']} | {row['fault']} | {row['point']} | {'; '.join(row['checks'])} | "
                     f"{'yes' if row['passed'] else '**no**'} |")
    lines += ["", "Faults: SIGKILL (no handler runs), SIGTERM (what `timeout` and schedulers send), SIGINT (Ctrl-C), "
              "ENOSPC (a full disk, raised as the write's OSError), two processes on one --out, and files cut short "
              "or edited.", "",
              "Reproduce: `OMP_NUM_THREADS=2 COMPRESS_DATA_DIR=../shared/data python benchmarks/fault_report.py`", ""]
    out = ROOT / "reports"
    (out / "faults.md").write_text("\n".join(lines))
    (out / "faults.json").write_text(json.dumps({"commit": commit, "summary": summary, "minutes": minutes and
                                                 round(minutes, 1), "faults": rows}, indent=1))
    print("\n".join(lines))
    return returncode


if __name__ == "__main__":
    sys.exit(main())
