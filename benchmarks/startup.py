"""Start-up and small-model speed: `compress --help`, a user error and a tiny-model quantize, ours beside an
earlier revision of the tool (the baseline), in one run.

    OMP_NUM_THREADS=2 COMPRESS_DATA_DIR=../shared/data python benchmarks/startup.py [--baseline REV]

writes reports/startup.{md,json}. Each figure is the median wall time of separate processes (5 for the quick
commands, 3 for the quantize), after one untimed run that builds the tiny model's cache. The quantize is the
command a CI job on tiny checkpoints runs: `compress quantize tiny-llama` with its defaults (GPTQ W4, 128 x 512
calibration windows of the automatic text, SST-2 train offline). The baseline runs the same commands from a git
worktree of REV (default: the last commit before the start-up work). Targets (issue 18): --help and a user error under 1 s, the tiny quantize under 10 s; the first line printed is
our own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, offline_defaults  # noqa: E402

offline_defaults()

DEFAULT_BASELINE = "fc349ff"
"""The last commit before lazy imports, early checks, quiet start-up and prefix tokenization."""


def timed(tree: Path, args: list[str], repeats: int, work: Path) -> dict:
    """Median wall seconds of ``repeats`` runs of `compress ARGS` from ``tree``, with the first run's output."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    seconds, first = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "compress.cli", *args], cwd=work, env=env, capture_output=True,
                              text=True)
        seconds.append(time.perf_counter() - started)
        first = first or done
    lines = [line for line in (first.stderr + first.stdout).splitlines() if line.strip()]
    return {"median_s": round(statistics.median(seconds), 3), "runs_s": [round(s, 3) for s in seconds],
            "exit_code": first.returncode, "first_line": lines[0][:160] if lines else "",
            "third_party_lines": [line[:160] for line in lines if _foreign(line)]}


def _foreign(line: str) -> bool:
    """A line printed by a library, not by us (torchao's and torch's start-up messages look like this)."""
    return line.startswith(("Failed to load", "W1", "W0", "Warning", "/")) or "Warning:" in line


def measure(tree: Path, work: Path, repeats: int) -> dict:
    out = work / "out"
    quantize = ["quantize", "tiny-llama", "--out", str(out), "--force", "--device", "cpu"]
    subprocess.run([sys.executable, "-m", "compress.cli", *quantize, "--no-progress"], cwd=work,
                   env=dict(os.environ, PYTHONPATH=str(tree)), capture_output=True, check=True)  # builds the cache
    return {"help": timed(tree, ["--help"], repeats, work),
            "user_error": timed(tree, ["quantize", "llama-9000"], repeats, work),
            "tiny_quantize": timed(tree, quantize, max(repeats - 2, 1), work)}


def report(rows: dict[str, dict], baseline: str, out: Path) -> None:
    labels = {"help": "`compress --help`", "user_error": "`compress quantize llama-9000` (a user error)",
              "tiny_quantize": "`compress quantize tiny-llama` (defaults)"}
    targets = {"help": 1.0, "user_error": 1.0, "tiny_quantize": 10.0}
    ours, base = rows["ours"], rows["baseline"]
    lines = ["# Start-up and small-model speed", "",
             f"Median wall seconds of separate processes, ours (this tree) beside the baseline ({baseline}), same "
             f"machine, same run ({platform.processor() or platform.machine()}, "
             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}).", "",
             "| command | ours | baseline | ours / baseline | target | met? |", "|---|---:|---:|---:|---:|---|"]
    for key, label in labels.items():
        a, b = ours[key]["median_s"], base[key]["median_s"]
        lines.append(f"| {label} | {a:.2f} s | {b:.2f} s | {a / b:.2f} | < {targets[key]:g} s | "
                     f"{'yes' if a < targets[key] else 'no'} |")
    lines += ["", "First line printed by the tiny quantize (stderr, then stdout):", "",
              f"- ours: `{ours['tiny_quantize']['first_line']}`",
              f"- baseline: `{base['tiny_quantize']['first_line']}`", "",
              f"Third-party lines in its output: ours {len(ours['tiny_quantize']['third_party_lines'])}, baseline "
              f"{len(base['tiny_quantize']['third_party_lines'])}.", "",
              "Reproduce: `OMP_NUM_THREADS=2 COMPRESS_DATA_DIR=../shared/data python benchmarks/startup.py`", ""]
    (out / "startup.md").write_text("\n".join(lines))
    (out / "startup.json").write_text(json.dumps({"baseline": baseline, "rows": rows}, indent=1))
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision measured beside this tree")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "reports")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        tree = scratch / "baseline-tree"
        subprocess.run(["git", "worktree", "add", "--detach", "-f", str(tree), args.baseline], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            rows = {}
            for name, source in (("baseline", tree), ("ours", ROOT)):
                work = scratch / name
                work.mkdir()
                # Each tree caches its tiny model in its own folder: neither run reuses the other's.
                os.environ["COMPRESS_CACHE_DIR"] = str(work / "cache")
                rows[name] = measure(source, work, args.repeats)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    report(rows, args.baseline, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
