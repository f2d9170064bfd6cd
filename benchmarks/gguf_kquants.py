"""Our K-quant files beside llama.cpp's own at the same types: for each K file type, `compress export-gguf --type T
--method gptq` and `--method rtn` from the float model, and llama.cpp's quantizer (`llama_model_quantize`, default
settings, no importance matrix) on our f16 file; every file run by llama.cpp through `compress bench FILE.gguf` on
the same WikiText-2 windows, with KL against the float model.

    OMP_NUM_THREADS=2 COMPRESS_DATA_DIR=../shared/data python benchmarks/gguf_kquants.py --model gemma3-270m

writes reports/gguf_kquants_<model>.json and .md. Each bench row runs in its own process; files are made in --work
and kept, so a rerun after an interruption reuses every finished file and row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, bench_subprocess, offline_defaults  # noqa: E402

offline_defaults()

TYPES = ("q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k")
TARGETS = {"q4_k_m": 0.85, "q3_k_m": 0.85, "q2_k": 0.85, "q5_k_m": 1.0, "q6_k": 1.0}
"""Issue 35: our GPTQ file's KL at most this times llama.cpp's own at the same size."""
QUANTIZE = """
import sys, llama_cpp
from pathlib import Path
from compress.export_gguf.imatrix import llama_cpp_imatrix, read_imatrix
source, target, kind, threads = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + kind.upper())
params.nthread = threads
if len(sys.argv) > 5:  # an imatrix file, handed over as llama-quantize --imatrix does
    array, buffers = llama_cpp_imatrix(read_imatrix(Path(sys.argv[5])))
    params.imatrix = array
partial = target.with_name("." + target.name + ".partial")
assert llama_cpp.llama_model_quantize(source.encode(), str(partial).encode(), params) == 0
partial.rename(target)
"""


def timed(command: list[str], seconds_file: Path) -> None:
    """Run ``command`` (its C-side printing kept out of the log) and keep how long it took beside its output."""
    print("$", " ".join(command), file=sys.stderr, flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    seconds_file.write_text(f"{time.perf_counter() - started:.1f}")


def block_bits_per_weight(gguf: Path) -> float:
    """Bits per weight the file's block tensors (blk.*, two or more dimensions) store."""
    from gguf import GGUFReader

    tensors = [t for t in GGUFReader(str(gguf)).tensors if t.name.startswith("blk.") and len(t.shape) >= 2]
    return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--awq-types", default="q4_k_m",
                        help="types also made with --method awq (its search rounds every candidate into the type: "
                             "the slowest of the three)")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "compress-bench" / "gguf-kquants")
    parser.add_argument("--out", type=Path, default=None, help="default reports/gguf_kquants_<model>")
    args = parser.parse_args()
    out = args.out or ROOT / "reports" / f"gguf_kquants_{args.model}"
    work = args.work / f"{args.model}-n{args.nsamples}"
    work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "compress.cli"]
    f16 = work / "f16.gguf"
    if not f16.exists():
        timed([*cli, "export-gguf", args.model, "--type", "f16", "--out", str(f16)], work / "f16.seconds")
    common = ["--base", args.model, "--seqlen", "512", "--windows", str(args.eval_windows), "--decode-batches", "1",
              "--no-progress"]
    rows = []

    def measure(name: str, model: str, **fields) -> dict:
        result = work / f"{name}.bench.json"
        if not result.exists():
            bench_subprocess(model, result, [*common, "--name", name])
        record = json.loads(result.read_text())
        accuracy = record["accuracy"]
        row = {"name": name, **fields, "perplexity": accuracy["perplexity"]["perplexity"],
               "kl_mean": accuracy["agreement"]["kl_mean"], "top1": accuracy["agreement"]["top1_agreement"],
               "file_bytes": Path(model).stat().st_size if model.endswith(".gguf") else None,
               "decode_tokens_per_s": next((d["tokens_per_s"] for d in (record.get("speed") or {}).get("decode", [])
                                            if d.get("batch") == 1), None)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    measure("float (torch)", args.model, tool="torch", type="fp32")
    measure("f16 (llama.cpp)", str(f16), tool="ours", type="f16")
    for kind in args.types.split(","):
        for method in ("gptq", "rtn", *(["awq"] if kind in args.awq_types.split(",") else [])):
            gguf = work / f"ours-{method}-{kind}.gguf"
            if not gguf.exists():
                # the GPTQ pass also writes its calibration statistics as llama.cpp's importance matrix
                flags = {"gptq": ["--nsamples", str(args.nsamples), "--imatrix-out", str(work / f"imatrix-{kind}.gguf"),
                                  "--force"], "awq": ["--nsamples", str(args.nsamples)], "rtn": []}[method]
                timed([*cli, "export-gguf", args.model, "--type", kind, "--method", method, *flags, "--out", str(gguf),
                       "--no-progress"], work / f"{gguf.stem}.seconds")
            measure(f"ours {method} {kind}", str(gguf), tool=f"ours {method}", type=kind,
                    seconds=float((work / f"{gguf.stem}.seconds").read_text()))
        theirs = work / f"llama.cpp-{kind}.gguf"
        if not theirs.exists():
            timed([sys.executable, "-c", QUANTIZE, str(f16), str(theirs), kind, str(args.threads)],
                  work / f"{theirs.stem}.seconds")
        measure(f"llama.cpp {kind}", str(theirs), tool="llama.cpp", type=kind,
                seconds=float((work / f"{theirs.stem}.seconds").read_text()))
        weighted = work / f"llama.cpp-imatrix-{kind}.gguf"
        if not weighted.exists():
            timed([sys.executable, "-c", QUANTIZE, str(f16), str(weighted), kind, str(args.threads),
                   str(work / f"imatrix-{kind}.gguf")], work / f"{weighted.stem}.seconds")
        measure(f"llama.cpp {kind} + our imatrix", str(weighted), tool="llama.cpp + imatrix", type=kind,
                seconds=float((work / f"{weighted.stem}.seconds").read_text()))
        if kind == "q4_k_m":  # --type auto at our Q4_K_M file's own bits per weight
            auto = work / "ours-gptq-auto.gguf"
            budget = block_bits_per_weight(work / "ours-gptq-q4_k_m.gguf")
            if not auto.exists():
                timed([*cli, "export-gguf", args.model, "--type", "auto", "--bpw", f"{budget:.4f}", "--method",
                       "gptq", "--nsamples", str(args.nsamples), "--out", str(auto), "--no-progress"],
                      work / f"{auto.stem}.seconds")
            measure("ours gptq auto", str(auto), tool="ours gptq", type="auto", budget=budget,
                    reached=block_bits_per_weight(auto), seconds=float((work / f"{auto.stem}.seconds").read_text()))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"model": args.model, "nsamples": args.nsamples,
                                                    "eval_windows": args.eval_windows, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(markdown(args, rows))
    print(out.with_suffix(".md").read_text())
    return 0


def markdown(args, rows: list[dict]) -> str:
    base = rows[0]["perplexity"]
    lines = [f"# {args.model}: our K-quant files beside llama.cpp's own", "",
             f"Generated by `python benchmarks/gguf_kquants.py --model {args.model}` on {time.strftime('%Y-%m-%d')}, "
             "CPU, 2 threads. CUDA was not measured.", "",
             f"- Ours: `compress export-gguf {args.model} --type T --method gptq` ({args.nsamples} x 512 calibration "
             "windows), `--method awq` (the same windows; types in --awq-types) or `--method rtn` (no data), each "
             "tensor in the type llama.cpp's quantizer gives it. "
             "llama.cpp's own: `llama_model_quantize` of our f16 file, default settings, no importance matrix; "
             "`+ our imatrix`: the same with the importance matrix our GPTQ pass wrote (`--imatrix-out`), as "
             "`llama-quantize --imatrix` hands it over.",
             f"- Every row is one `compress bench` run on the first {args.eval_windows} WikiText-2 test windows of 512 "
             "tokens (BOS first where the tokenizer puts one); GGUF files run in llama.cpp; KL(float || row) per token "
             "on the float model's top-256 tokens plus the rest as one bucket.", "",
             "| row | perplexity | vs float | KL | top-1 | file MiB | decode tok/s | made in s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        size = f"{r['file_bytes'] / 2**20:.1f}" if r.get("file_bytes") else "-"
        decode = f"{r['decode_tokens_per_s']:.1f}" if r.get("decode_tokens_per_s") else "-"
        made = f"{r['seconds']:.0f}" if r.get("seconds") is not None else "-"
        lines.append(f"| {r['name']} | {r['perplexity']:.3f} | x{r['perplexity'] / base:.3f} | {r['kl_mean']:.4f} | "
                     f"{100 * r['top1']:.1f}% | {size} | {decode} | {made} |")
    by = {(r.get("tool"), r.get("type")): r for r in rows}
    lines += ["", "## Targets (issue 35)", "", "| type | ours (GPTQ) KL | llama.cpp KL | ratio | target | size "
              "difference | met | llama.cpp + our imatrix KL | ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for kind in args.types.split(","):
        ours, theirs = by.get(("ours gptq", kind)), by.get(("llama.cpp", kind))
        weighted = by.get(("llama.cpp + imatrix", kind))
        if ours and theirs:
            ratio = ours["kl_mean"] / theirs["kl_mean"]
            size = ours["file_bytes"] / theirs["file_bytes"] - 1
            met = ratio <= TARGETS.get(kind, 1.0) and abs(size) <= 0.01
            beside = f"{weighted['kl_mean']:.4f} | {ours['kl_mean'] / weighted['kl_mean']:.2f}" if weighted else "- | -"
            lines.append(f"| {kind} | {ours['kl_mean']:.4f} | {theirs['kl_mean']:.4f} | {ratio:.2f} | "
                         f"<= {TARGETS.get(kind, 1.0)} | {100 * size:+.2f}% | {'yes' if met else 'no'} | {beside} |")
    auto, fixed = by.get(("ours gptq", "auto")), by.get(("ours gptq", "q4_k_m"))
    if auto and fixed:
        ratio = auto["kl_mean"] / fixed["kl_mean"]
        lines.append(f"| auto at our Q4_K_M's {auto['budget']:.3f} bits/weight (reached {auto['reached']:.3f}) | "
                     f"{auto['kl_mean']:.4f} | our Q4_K_M {fixed['kl_mean']:.4f} | {ratio:.2f} | < 1 | "
                     f"{100 * (auto['file_bytes'] / fixed['file_bytes'] - 1):+.2f}% | {'yes' if ratio < 1 else 'no'} "
                     "| - | - |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
