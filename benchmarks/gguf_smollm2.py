"""Our GPTQ / AWQ codes in GGUF beside llama.cpp's own quantization of the same float model, every GGUF file
run by llama.cpp through `compress bench FILE.gguf` on the same WikiText-2 token ids, with KL against fp32.

    OMP_NUM_THREADS=2 COMPRESS_DATA_DIR=../shared/data python benchmarks/gguf_smollm2.py

writes reports/gguf_smollm2.json and reports/gguf_smollm2.md (about 60 min on 2 cores); --model gemma3-270m writes
reports/gguf_gemma3-270m.*, its windows BOS first as the tokenizer puts it (as `compress bench` scores them). Each
bench row runs in its own process (`compress bench`), so its peak memory is its own. Note (../shared/MODELS.md):
the offline SmolLM2 weights were dequantized from Q4_1 blocks of 32, so every 4-bit grid of 32 lines up with them
and looks nearly lossless; the comparison between tools is still on equal terms.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, bench_subprocess, offline_defaults  # noqa: E402

offline_defaults()

import torch  # noqa: E402

from compress.bench.result import BenchResult  # noqa: E402

MODEL = "smollm2-135m"
LABELS = {"smollm2-135m": "SmolLM2-135M", "gemma3-270m": "Gemma-3-270M"}
OURS = (
    # (label, quantize settings, GGUF type; None where no legacy type holds the grid)
    ("our GPTQ W4 g32 sym", dict(method="gptq", bits=4, sym=True), "q4_0"),
    ("our GPTQ W4 g32 asym", dict(method="gptq", bits=4, sym=False), "q4_1"),
    # Min/max rounding, as llama.cpp's own Q4_1: on weights dequantized from Q4_1 blocks it finds their grid.
    ("our RTN W4 g32 asym min/max", dict(method="rtn", bits=4, sym=False, scale_search="none"), "q4_1"),
    ("our AWQ W4 g32 asym", dict(method="awq", bits=4, sym=False), "q4_1"),
    ("our GPTQ W8 g32 sym", dict(method="gptq", bits=8, sym=True), "q8_0"),
    ("our GPTQ W3 g32 asym", dict(method="gptq", bits=3, sym=False), None),
)
SMOLLM2_Q4_1_NOTE = (
    "- The offline SmolLM2 weights were dequantized from Q4_1 blocks of 32. A Q4_1 block stores its minimum as "
    "a free fp16 number, which llama.cpp's own Q4_1 rounding (min/max per block) finds again exactly: its Q4_1 "
    "row is nearly lossless (x1.004). Our codes, like GPTQ's format, have an integer zero point, so their "
    "minimum is a multiple of the step: even plain min/max rounding with integer zero points (the RTN row) "
    "cannot find that grid. The Q4_1 comparison measures this artifact of the offline weights, not the "
    "methods; the Q4_0, 8-bit and 3-bit rows do not share it.")
THEIRS = ("q4_0", "q4_1", "q8_0", "q4_k_m", "q3_k_m", "q3_k_s")


def transformers_gguf_perplexity(gguf: Path, windows: list[torch.Tensor]) -> float:
    """Perplexity of ``gguf`` read back by transformers' own GGUF loader (dequantized to float32)."""
    from transformers import AutoModelForCausalLM

    from compress.bench.score import score_windows

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    return score_windows(model, windows, torch.device("cpu"), tune_threads=False)[0].perplexity.perplexity


def alternating_speed(files: dict[str, Path], prompt: torch.Tensor, threads: int, rounds: int = 3) -> dict:
    """Batch-1 decode and prefill of each file, measured in turns (A B C, A B C, ...) so that load drifting
    over the run falls on every file alike; the median over rounds of each round's median of 3."""
    from transformers import AutoConfig

    from compress.backends.llamacpp_model import LlamaCppCausalLM
    from compress.bench import throughput

    cpu = torch.device("cpu")
    seen: dict[str, dict[str, list[float]]] = {name: {"decode": [], "prefill": []} for name in files}
    for _ in range(rounds):
        for name, path in files.items():
            model = LlamaCppCausalLM(path, AutoConfig.from_pretrained(path.parent, gguf_file=path.name), threads)
            try:
                seen[name]["decode"].append(throughput.decode(model, prompt[:128], 32, 1, cpu, 1, 3).tokens_per_s)
                seen[name]["prefill"].append(throughput.prefill(model, prompt, cpu, 1, 3).tokens_per_s)
            finally:
                model.close()
    return {name: {kind: sorted(values)[len(values) // 2] for kind, values in figures.items()}
            for name, figures in seen.items()}


def summarize(result: BenchResult) -> dict:
    """The figures of one `compress bench` result this report shows."""
    accuracy, speed = result.accuracy, result.speed
    batch1 = speed.decode_at(1) if speed else None
    return {"perplexity": accuracy.perplexity.perplexity, "kl_mean": accuracy.agreement.kl_mean,
            "top1_agreement": accuracy.agreement.top1_agreement, "file_bytes": result.memory.artifact_bytes,
            "peak_bytes": result.memory.peak_bytes, "prefill_tokens_per_s": speed.prefill.tokens_per_s if speed else None,
            "decode_tokens_per_s": batch1.tokens_per_s if batch1 else None, "kernel": result.model.kernel,
            "bits_per_weight": (result.model.quantization or {}).get("bits_per_weight"),
            "scored_tokens": result.protocol.scored_tokens}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL, help="a real model alias (default smollm2-135m)")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None, help="default reports/gguf_smollm2 (or _MODEL)")
    parser.add_argument("--work", default=None)
    parser.add_argument("--types", default=None, help="comma-separated GGUF types to run (default all): our rows and "
                        "llama.cpp's own of those types only")
    args = parser.parse_args()
    args.out = args.out or ROOT / "reports" / ("gguf_smollm2" if args.model == MODEL else f"gguf_{args.model}")
    model_alias = args.model
    threads = int(os.environ["OMP_NUM_THREADS"])
    torch.set_num_threads(threads)
    import llama_cpp

    from compress.api import QuantizeRequest, quantize, takes_option
    from compress.bench.run import BenchRequest, _windows
    from compress.export_gguf.run import export_gguf
    from compress.models import load_model, resolve

    common = ["--base", model_alias, "--seqlen", "512", "--windows", str(args.eval_windows), "--decode-batches", "1",
              "--no-progress"]
    _, tokenizer = load_model(resolve(model_alias).path)
    # The windows every bench row scores (BOS first where the tokenizer puts one), for the readers run here.
    windows, info = _windows(BenchRequest(model=model_alias, eval="wikitext2:test", seqlen=512,
                                          windows=args.eval_windows), tokenizer, None)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        work = Path(work)

        def bench(name: str, model: str, extra: list[str], **fields) -> dict:
            out = work / f"bench-{len(rows)}.json"
            bench_subprocess(model, out, [*common, "--name", name, *extra])
            row = {"name": name, **fields, **summarize(BenchResult.read(out))}
            rows.append(row)
            print(json.dumps(row), flush=True)
            return row

        bench("fp32 (torch)", model_alias, ["--dtype", "float32", "--backend", "dense"])
        f16 = work / "f16.gguf"
        export_gguf(model_alias, "f16", str(f16))
        bench("f16 GGUF (llama.cpp)", str(f16), [], tool="llama.cpp", type="f16")
        gguf_files = {"f16 GGUF (llama.cpp)": f16}
        wanted = set(args.types.split(",")) if args.types else None
        for index, (label, settings, kind) in enumerate(OURS):
            if wanted is not None and kind not in wanted:
                continue
            started = time.perf_counter()
            grid = {"act_order": False} if takes_option(settings["method"], "act_order") else {}
            result = quantize(QuantizeRequest(model=model_alias, group_size=32, nsamples=args.nsamples, **grid,
                                              out=str(work / f"ours-{index}"), progress=False, device="cpu",
                                              **settings))
            seconds = round(time.perf_counter() - started, 1)
            config = result.manifest["config"]
            fields = {"tool": "ours", "settings": {k: config.get(k) for k in ("sym", "scale_search", "act_order")},
                      "quantize_seconds": seconds}
            where = "" if kind else "; no legacy GGUF type holds 3-bit codes"
            loader = bench(f"{label} (our loader{where})", str(result.folder),
                           ["--backend", "dequant", "--dtype", "float32"], **fields)
            if kind is None:
                continue
            gguf = work / f"ours-{index}-{kind}.gguf"
            export_gguf(str(result.folder), kind, str(gguf))
            row = bench(f"{label} -> {kind} (llama.cpp)", str(gguf), [], type=kind, **fields)
            gguf_files[row["name"]] = gguf
            # The same codes with the embedding kept in float16: the file differs from our loader's model in
            # llama.cpp's arithmetic alone.
            same = work / f"ours-{index}-{kind}-float-embedding.gguf"
            export_gguf(str(result.folder), kind, str(same), keep_float=True)
            exact = bench(f"{label} -> {kind}, --float-embedding (llama.cpp)", str(same), ["--no-speed"], type=kind,
                          **fields)
            rows.remove(exact)
            row["same_codes"] = {"llama_cpp_perplexity": exact["perplexity"], "our_loader_perplexity": loader["perplexity"],
                                 "transformers_gguf_perplexity": transformers_gguf_perplexity(same, windows),
                                 "file_bytes": exact["file_bytes"]}
        for kind in THEIRS if wanted is None else [k for k in THEIRS if k in wanted]:
            theirs = work / f"llamacpp-{kind}.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
            params.nthread = threads
            started = time.perf_counter()
            if llama_cpp.llama_model_quantize(str(f16).encode(), str(theirs).encode(), params) != 0:
                raise RuntimeError(f"llama.cpp could not quantize {f16} to {kind}")
            row = bench(f"llama.cpp's own {kind} (llama.cpp)", str(theirs), [], tool="llama.cpp", type=kind,
                        quantize_seconds=round(time.perf_counter() - started, 1))
            gguf_files[row["name"]] = theirs
        # Speed side by side, files of one type in turns: the one-row-at-a-time figures above are each taken
        # at a different moment of the run.
        print("speed in turns", flush=True)
        turns = alternating_speed(gguf_files, windows[0], threads)
        for row in rows:
            if row["name"] in turns:
                row["turns"] = turns[row["name"]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"evaluation": info.to_dict(), "threads": threads,
                                                         "llama_cpp_python": llama_cpp.__version__, "rows": rows},
                                                        indent=2))
    write_markdown(args, rows, info, threads, llama_cpp.__version__)
    return 0


def write_markdown(args, rows: list[dict], info, threads: int, version: str) -> None:
    base = rows[0]["perplexity"]
    lines = [
        f"# {LABELS.get(args.model, args.model)}: our GPTQ / AWQ codes in GGUF beside llama.cpp's own quantization",
        "",
        f"Generated by `python benchmarks/gguf_smollm2.py{'' if args.model == MODEL else ' --model ' + args.model}"
        f"{' --types ' + args.types if args.types else ''}` on "
        f"{time.strftime('%Y-%m-%d')}, CPU, {threads} threads (llama.cpp and torch alike). CUDA was not measured.",
        "",
        f"- Every row is one `compress bench` run on the same token ids: the first {info.count} WikiText-2 test "
        f"windows of {'BOS + ' if info.bos else ''}{info.seqlen} {'text ' if info.bos else ''}tokens; KL(fp32 || row) "
        "per token on fp32's top-256 tokens plus the rest as one bucket. GGUF rows run in llama.cpp "
        f"(llama-cpp-python {version}, its CPU kernels), batch-1 decode of 32 tokens after a 128-token prompt.",
        f"- Ours: `compress quantize {args.model} --group-size 32 --no-act-order --bits B [--sym]` ({args.nsamples} x "
        "512 calibration windows; asymmetric grids searched with the inputs' weights), then `compress export-gguf "
        "--type q4_0|q4_1|q8_0`: the codes unchanged. llama.cpp's own: `compress export-gguf --type f16` of the "
        "float model, then llama.cpp's quantizer (`llama_model_quantize`, default settings). In both, the "
        "tied embedding is Q8_0 (llama.cpp's choice where rows are not a multiple of 256; ours by ggml's rounding): "
        "the files of one type are the same size.",
        "- llama.cpp's importance matrix is not compared: llama-cpp-python exposes no way to compute one (the "
        "`llama-imatrix` tool is not part of it).",
        *([SMOLLM2_Q4_1_NOTE] if args.model == MODEL else []),
        "- Speed: the first table's speed columns are each taken at its own moment of a shared machine (some "
        "during other work); the turns table below is the comparison. Files of one type run the same kernel.",
        "",
        "| row | perplexity | vs fp32 | KL | top-1 | file MiB | bits/weight (blocks) | prefill tok/s | decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bits = f"{r['bits_per_weight']:.3f}" if r.get("bits_per_weight") else "-"
        lines.append(f"| {r['name']} | {r['perplexity']:.3f} | x{r['perplexity'] / base:.3f} | {r['kl_mean']:.4f} | "
                     f"{100 * r['top1_agreement']:.1f}% | {r['file_bytes'] / 2**20:.1f} | {bits} | "
                     f"{r['prefill_tokens_per_s'] or 0:.0f} | {r['decode_tokens_per_s'] or 0:.1f} |")
    lines += ["", "## Speed in turns", "",
              "Every GGUF file loaded and measured in turns, three rounds (batch-1 decode of 32 tokens after a "
              "128-token prompt; prefill of one 512-token window), the median round. The table above takes each "
              "row at its own moment of the run; this one is the fair comparison of files of one type.", "",
              "| file | decode tok/s | prefill tok/s |", "|---|---|---|"]
    for r in rows:
        if "turns" in r:
            lines.append(f"| {r['name']} | {r['turns']['decode']:.1f} | {r['turns']['prefill']:.0f} |")
    lines += ["", "## The same codes through three readers", "",
              "Each of our files again with `--float-embedding` (the embedding in float16, as our loader holds it), so "
              "that the file and our checkpoint differ in the runtime alone.", "",
              "| exported file | llama.cpp | our loader | difference | transformers' GGUF loader |", "|---|---|---|---|---|"]
    for r in rows:
        same = r.get("same_codes")
        if same:
            ours, theirs = same["our_loader_perplexity"], same["llama_cpp_perplexity"]
            lines.append(f"| {r['name']} | {theirs:.3f} | {ours:.3f} | {100 * (theirs / ours - 1):+.2f}% | "
                         f"{same['transformers_gguf_perplexity']:.3f} |")
    by_name = {r["name"]: r for r in rows}
    f16 = by_name.get("f16 GGUF (llama.cpp)")
    q8 = [r for r in rows if r.get("same_codes") and r.get("type") == "q8_0"]
    if f16:
        lines += ["", "## Done when (issue 33): llama.cpp within 0.5% of our loader on the same windows", "",
                  "| file | llama.cpp | ours | difference | met |", "|---|---|---|---|---|"]
        pairs = [("f16 GGUF (float model)", f16["perplexity"], base)]
        pairs += [(f"{r['name']} (--float-embedding: the same weights)", r["same_codes"]["llama_cpp_perplexity"],
                   r["same_codes"]["our_loader_perplexity"]) for r in q8]
        pairs += [(f"{r['name']} (Q8_0 embedding as llama.cpp's quantizer gives it)", r["perplexity"],
                   r["same_codes"]["our_loader_perplexity"]) for r in q8]
        for label, theirs, ours in pairs:
            lines.append(f"| {label} | {theirs:.3f} | {ours:.3f} | {100 * (theirs / ours - 1):+.2f}% | "
                         f"{'yes' if abs(theirs / ours - 1) <= 0.005 else 'no'} |")
    lines += ["", "llama.cpp rounds the activations of every quantized matrix product to 8 bits per block of 32 "
              "(q8_0 / q8_1); our loader and transformers compute in float32 on the dequantized weights.", ""]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
