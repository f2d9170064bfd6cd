"""Gemma-3-270M through the whole chain, in the SmolLM2 reports' protocol and columns: fp32, bf16, RTN W4, GPTQ W4
and W3 (defaults), AWQ W4, --avg-bits 4.25, bitsandbytes NF4, GPTQModel's best settings, Wanda 50%, structured 25%
MLP, ONNX int8 and int4, and GGUF files in llama.cpp (ours and llama.cpp's own quantization of our f16 file).

    OMP_NUM_THREADS=2 COMPRESS_DATA_DIR=../shared/data python benchmarks/gemma3_270m.py

writes reports/gemma3-270m/ (the `compress report` of every row: perplexity, KL, top-1, memory, speed, and the
zero-shot tasks with their recovery). Every model is made by the command a user would run (`compress quantize`,
`compress prune`, `compress export-onnx`, `compress export-gguf`; GPTQModel through its own API on our calibration
windows) and measured by one `compress bench` process (its peak memory its own) on the same windows: the first 40
WikiText-2 test windows of BOS + 511 tokens, as the tokenizer puts BOS. The tasks (LAMBADA, ARC-Easy and
-Challenge, PIQA, HellaSwag, WinoGrande) run zero-shot on their first --limit examples. Everything lands in --work
(~/.cache/compress-bench/gemma3-270m by default) and is kept: the same command again after an interruption reuses
every finished model and row (the commands write atomically, so what exists is complete).

The quantization figures beside the peers with bits per weight, quantize time and its peak memory are in
reports/quantize_gemma3-270m.md (benchmarks/quantize_smollm2.py --model gemma3-270m); every GGUF type beside
llama.cpp's own in reports/gguf_gemma3-270m.md (benchmarks/gguf_smollm2.py --model gemma3-270m).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, bench_subprocess, offline_defaults, report_with_extras  # noqa: E402

offline_defaults()

MODEL = "gemma3-270m"
TASKS = ["lambada_openai", "arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande"]
NSAMPLES = 64  # as the SmolLM2 reports calibrate


@dataclass
class Row:
    name: str
    make: list[str] = field(default_factory=list)
    """The compress command (after `compress`) that makes the model into {out}; empty: the alias itself."""
    bench: list[str] = field(default_factory=list)
    """Flags of its `compress bench` run beyond the protocol's."""
    source: str | None = None
    """A row whose model this row's command reads ({source} in make)."""
    tasks: bool = True


ROWS = [
    Row("fp32", bench=["--dtype", "float32"]),
    Row("bf16", bench=["--dtype", "bfloat16"]),
    Row("rtn-w4", ["quantize", MODEL, "--method", "rtn", "--bits", "4"]),
    Row("gptq-w4", ["quantize", MODEL, "--bits", "4"]),
    Row("gptq-w3", ["quantize", MODEL, "--bits", "3"]),
    Row("awq-w4", ["quantize", MODEL, "--method", "awq", "--bits", "4"]),
    Row("gptq-avg4.25", ["quantize", MODEL, "--avg-bits", "4.25"]),
    Row("bnb-nf4", ["quantize", MODEL, "--method", "bnb", "--bits", "4"]),
    Row("gptqmodel-best-w4", ["gptqmodel"]),
    Row("wanda-50", ["prune", MODEL, "--method", "wanda", "--sparsity", "0.5"]),
    Row("structured-mlp-25", ["prune", MODEL, "--method", "structured", "--target", "mlp", "--sparsity", "0.25"]),
    Row("onnx-int8", ["export-onnx", MODEL, "--weights", "int8"], tasks=False),
    Row("onnx-int4", ["export-onnx", "{source}", "--weights", "packed"], source="gptq-w4", tasks=False),
    Row("gguf-f16", ["export-gguf", MODEL, "--type", "f16"], tasks=False),
    Row("gguf-q8_0-rtn", ["export-gguf", MODEL, "--type", "q8_0", "--method", "rtn"], tasks=False),
    Row("gguf-q4_0-gptq", ["export-gguf", MODEL, "--type", "q4_0", "--method", "gptq"], tasks=False),
    Row("gguf-q4_k_m-llama.cpp", ["llama.cpp-quantize", "q4_k_m"], source="gguf-f16", tasks=False),
]


def output_of(row: Row, work: Path) -> Path:
    return work / "models" / (f"{row.name}.gguf" if row.name.startswith("gguf") else row.name)


def make(row: Row, work: Path, minutes: dict[str, float]) -> str:
    """The model the row measures (made unless an earlier run made it), as `compress bench` takes it."""
    if not row.make:
        return MODEL
    out = output_of(row, work)
    if out.exists():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    source = str(output_of(next(r for r in ROWS if r.name == row.source), work)) if row.source else None
    started = time.perf_counter()
    if row.make[0] == "gptqmodel":
        command = [sys.executable, __file__, "--make-gptqmodel", str(out)]
    elif row.make[0] == "llama.cpp-quantize":
        command = [sys.executable, __file__, "--llama-cpp-quantize", row.make[1], source, str(out)]
    else:
        command = [sys.executable, "-m", "compress.cli",
                   *[source if part == "{source}" else part for part in row.make], "--out", str(out)]
        if row.make[0] != "export-onnx":  # it draws no progress bar
            command.append("--no-progress")
        if row.make[0] in ("quantize", "prune"):
            command += ["--nsamples", str(NSAMPLES), "--device", "cpu"]
        if row.make[0] == "export-gguf" and "--method" in row.make:
            command += ["--nsamples", str(NSAMPLES), "--checkpoint", str(work / "models" / f"{row.name}-checkpoint")]
    print("$", " ".join(command), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, cwd=ROOT)
    minutes[row.name] = (time.perf_counter() - started) / 60
    return str(out)


def make_gptqmodel(out: Path) -> None:
    """GPTQModel's best settings (asymmetric, GAR, its MSE grid search; issue 14's) at W4 g128 on the calibration
    windows `compress quantize` cuts (BOS first, as Gemma's tokenizer puts it)."""
    from transformers import AutoTokenizer

    from compress.data import calibration_windows_of_text, load_calibration_text
    from compress.models import resolve
    from compress.peers.gptqmodel_quant import quantize_with_gptqmodel

    source = resolve(MODEL).path
    text, record = load_calibration_text("auto")
    windows, _ = calibration_windows_of_text(AutoTokenizer.from_pretrained(source), text, record, NSAMPLES, 512, 0)
    quantize_with_gptqmodel(source, 4, 128, False, 0.01, windows, out, sym=False, act_group_aware=True, mse=2.4)


def llama_cpp_quantize(kind: str, source: str, out: str) -> None:
    """llama.cpp's own quantizer (default settings) on our f16 file, written under a temporary name first."""
    import os

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    params.nthread = int(os.environ["OMP_NUM_THREADS"])
    partial = Path(out).with_name(f".{Path(out).name}.partial")
    if llama_cpp.llama_model_quantize(source.encode(), str(partial).encode(), params) != 0:
        raise SystemExit(f"llama.cpp could not quantize {source} to {kind}")
    partial.rename(out)


def measure(row: Row, model: str, work: Path, results: Path, args) -> Path:
    """One `compress bench` record per row (reused when an earlier run wrote it)."""
    out = results / f"{row.name}.json"
    if out.is_file():
        return out
    started = time.perf_counter()
    extra = ["--base", MODEL, "--base-dtype", "float32", "--name", row.name, "--seqlen", "512", "--windows",
             str(args.windows), "--decode-batches", "1", "--no-progress", *row.bench]
    if row.tasks and args.limit:
        extra += ["--tasks", ",".join(TASKS), "--limit", str(args.limit)]
    partial = work / f"{row.name}.bench.json"
    bench_subprocess(model, partial, extra)
    record = json.loads(partial.read_text())
    record.setdefault("annotations", {})["minutes"] = (time.perf_counter() - started) / 60
    out.write_text(json.dumps(record, indent=2))
    partial.unlink()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200, help="examples per task (0: no tasks)")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--rows", default="all", help="comma-separated row names, or all")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "gemma3-270m")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "compress-bench" / "gemma3-270m",
                        help="kept between runs: finished models and rows are reused")
    parser.add_argument("--make-gptqmodel", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--llama-cpp-quantize", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_gptqmodel:
        make_gptqmodel(args.make_gptqmodel)
        return 0
    if args.llama_cpp_quantize:
        llama_cpp_quantize(*args.llama_cpp_quantize)
        return 0
    work = args.work / f"limit{args.limit}-w{args.windows}"
    results = work / "results"
    results.mkdir(parents=True, exist_ok=True)
    minutes_file = work / "make-minutes.json"
    minutes = json.loads(minutes_file.read_text()) if minutes_file.is_file() else {}
    chosen = [r for r in ROWS if args.rows == "all" or r.name in args.rows.split(",") or r.name == "fp32"]
    files = []
    for row in chosen:
        model = make(row, work, minutes)
        minutes_file.write_text(json.dumps(minutes, indent=1))
        files.append(measure(row, model, work, results, args))
        print(f"[{time.strftime('%H:%M:%S')}] {row.name} measured", flush=True)
    total = sum(minutes.values()) + sum(json.loads(f.read_text())["annotations"]["minutes"] for f in files)
    notes = [
        "Every row is the model a user gets from the command under Reproduce (GPTQModel: its own API on our "
        f"calibration windows, {NSAMPLES} x BOS + 511 tokens of SST-2 train), measured by its own `compress bench` "
        f"process on the first {args.windows} WikiText-2 test windows of BOS + 511 tokens (Gemma's tokenizer puts BOS "
        "first, and Gemma scores far worse without it), KL and top-1 against fp32 on the same windows.",
        f"Tasks: {', '.join(TASKS)}, zero-shot, the first {args.limit} examples of each (offline copies of the "
        "released splits); ONNX and GGUF rows are measured without them.",
        "The offline Gemma-3-270M weights were dequantized from Google's Q4_K_M GGUF (mostly Q5_0 and Q8_0 blocks): "
        "unlike SmolLM2's they do not sit on a 4-bit grid of 32, so 4-bit rounding costs here what it costs on a "
        "float model.",
        "Its tied embedding and head (262,144 x 640, 640 MiB in fp32) stay float in our quantized rows; NF4, the "
        "ONNX int8 export and the GGUF files quantize what their tools quantize, so weight sizes differ beyond the "
        "blocks.",
        "Quantization beside the peers (bits per weight, quantize time and peak memory): "
        "reports/quantize_gemma3-270m.md; every GGUF type beside llama.cpp's own: reports/gguf_gemma3-270m.md.",
        f"Making and measuring took {total:.0f} minutes on 2 cores (CPU, OMP_NUM_THREADS=2). CUDA was not measured.",
    ]
    reproduce = [f"compress {' '.join(r.make)}" for r in chosen if r.make and r.make[0] not in
                 ("gptqmodel", "llama.cpp-quantize")]
    reproduce.append(f"OMP_NUM_THREADS=2 COMPRESS_DATA_DIR=../shared/data python benchmarks/gemma3_270m.py --limit "
                     f"{args.limit}")
    report_with_extras(files, args.out, "Gemma-3-270M through the whole chain", reproduce, notes, results, ())
    return 0


if __name__ == "__main__":
    sys.exit(main())
