"""Task accuracy loss on SmolLM2-135M: lm-evaluation-harness tasks on fp32, bf16, our GPTQ W8 / W4 / W3,
bitsandbytes NF4 and Wanda 50%, each run by the backend that runs it, beside WikiText-2 perplexity.

    OMP_NUM_THREADS=2 COMPRESS_DATA_DIR=../shared/data python benchmarks/tasks_smollm2.py

writes reports/tasks-smollm2/ (the `compress report` of every row: task table with recovery, plots). LAMBADA is
scored on its whole test set (5,153 examples), the other tasks on their first 500 examples (--limit), zero-shot,
from the offline copies under $COMPRESS_DATA_DIR/tasks (HellaSwag: llama.cpp's derived text, see the report).
Each row is one `compress bench` process (LAMBADA) plus one for the other tasks, merged into one record. About
3 hours on 2 cores; checkpoints are made first, then every row is measured. Everything lands in --work
(~/.cache/compress-bench/tasks-smollm2 by default) and is kept: run the same command again after an interruption
and finished checkpoints and rows are reused (quantize and bench write atomically, so what exists is complete).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, bench_subprocess, offline_defaults, report_with_extras  # noqa: E402

from compress.bench.result import BenchResult  # noqa: E402

offline_defaults()

MODEL = "smollm2-135m"
WHOLE = ["lambada_openai"]
LIMITED = ["arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande"]
PUBLISHED = ("Published figures for the original float SmolLM2-135M-Instruct, beside our base (the Instruct model "
             "dequantized from Q4_1, first 500 examples where limited): HuggingFace's model card reports lighteval "
             "figures, not comparable; a third party's lm-evaluation-harness 0-shot run on the full splits (card of "
             "lldois/SmolLM2-135M-Reasoning-SLERP-Champion, 'Baseline' column) gives ARC-Easy acc 54.12, "
             "ARC-Challenge acc_norm 27.73, HellaSwag acc_norm 42.99, PIQA acc_norm 66.92.")
QUANTIZED = [("gptq-w8", ["--bits", "8"]), ("gptq-w4", ["--bits", "4"]), ("gptq-w3", ["--bits", "3"]),
             ("bnb-nf4", ["--method", "bnb", "--bits", "4"])]


def make_checkpoints(work: Path, nsamples: int) -> dict[str, str]:
    """name -> folder of each compressed row, made with the commands a user would run; one made by an earlier
    run is reused."""
    folders = {}
    for name, flags in QUANTIZED:
        out = work / name
        folders[name] = str(out)
        if out.is_dir():
            continue
        command = [sys.executable, "-m", "compress.cli", "quantize", MODEL, *flags, "--nsamples", str(nsamples),
                   "--out", str(out), "--no-progress", "--device", "cpu"]
        timed_run(command, work / f"{name}.minutes")
    out = work / "wanda-50"
    folders["wanda-50"] = str(out)
    if out.is_dir():
        return folders
    command = [sys.executable, "-m", "compress.cli", "prune", MODEL, "--method", "wanda", "--sparsity", "0.5",
               "--nsamples", str(nsamples), "--out", str(out), "--no-progress", "--device", "cpu"]
    timed_run(command, work / "wanda-50.minutes")
    return folders


def timed_run(command: list[str], minutes_file: Path) -> None:
    print("$", " ".join(command), file=sys.stderr, flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    minutes_file.write_text(f"{(time.perf_counter() - started) / 60:.3f}")


def measure(name: str, model: str, extra: list[str], work: Path, results: Path, limit: int, windows: int) -> Path:
    """One record: perplexity and the limited tasks in one bench run, LAMBADA whole in a second, merged. A row
    already measured (its record exists) is reused; the record keeps the minutes its row took."""
    out = results / f"{name}.json"
    if out.is_file():
        return out
    started = time.perf_counter()
    common = ["--base", MODEL, "--base-dtype", "float32", "--name", name, "--no-speed", "--no-progress", *extra]
    first, second = work / f"{name}-tasks.json", work / f"{name}-lambada.json"
    bench_subprocess(model, first, [*common, "--seqlen", "512", "--windows", str(windows),
                                    "--tasks", ",".join(LIMITED), "--limit", str(limit)])
    # The second run's perplexity is not kept: one window is enough for it.
    bench_subprocess(model, second, [*common, "--seqlen", "512", "--windows", "1", "--tasks", ",".join(WHOLE)])
    record, lambada = BenchResult.read(first), BenchResult.read(second)
    record.accuracy.tasks.results = lambada.accuracy.tasks.results + record.accuracy.tasks.results
    record.accuracy.tasks.limit = {"lambada_openai": None, **{t: limit for t in LIMITED}}
    record.command = [*record.command, "&&", *lambada.command]
    record.annotations["minutes"] = (time.perf_counter() - started) / 60
    record.write(out)
    print(f"{name}: " + ", ".join(f"{r.task} {r.metrics}" for r in record.accuracy.tasks.results), flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "tasks-smollm2")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "compress-bench" / "tasks-smollm2",
                        help="kept between runs: finished checkpoints and rows are reused")
    args = parser.parse_args()
    work = args.work / f"limit{args.limit}-n{args.nsamples}-w{args.windows}"
    results = work / "results"
    results.mkdir(parents=True, exist_ok=True)
    folders = make_checkpoints(work, args.nsamples)
    files = [measure("fp32", MODEL, ["--dtype", "float32"], work, results, args.limit, args.windows),
             measure("bf16", MODEL, ["--dtype", "bfloat16"], work, results, args.limit, args.windows)]
    for name, folder in folders.items():
        files.append(measure(name, folder, [], work, results, args.limit, args.windows))
    # Summed over the steps, so rows measured by an earlier, interrupted run count with the minutes they took.
    minutes = sum(BenchResult.read(f).annotations["minutes"] for f in files)
    minutes += sum(float(f.read_text()) for f in work.glob("*.minutes"))
    report_with_extras(files, args.out, "SmolLM2-135M: task accuracy loss (lm-evaluation-harness)",
                       [f"OMP_NUM_THREADS=2 COMPRESS_DATA_DIR=../shared/data python benchmarks/tasks_smollm2.py "
                        f"--limit {args.limit}"],
                       [f"LAMBADA (OpenAI) on its whole test set; {', '.join(LIMITED)} on their first "
                        f"{args.limit} examples; zero-shot; offline copies of the released splits.",
                        "GPTQ rows: `compress quantize smollm2-135m --bits B` with the defaults (group 128, "
                        f"asymmetric, weighted scale search), {args.nsamples} calibration windows; NF4 by "
                        "bitsandbytes; Wanda 50% dense. Each row is run by the backend `compress bench` picks for "
                        "it (its kernel and dtype are under Kernels).",
                        "The offline SmolLM2 weights are SmolLM2-135M-Instruct dequantized from Q4_1 blocks of 32 "
                        "(see the README): 4-bit grids line up with them.",
                        PUBLISHED,
                        f"The run took {minutes:.0f} minutes on 2 cores. CUDA was not measured."],
                       results, ())
    return 0


if __name__ == "__main__":
    sys.exit(main())
