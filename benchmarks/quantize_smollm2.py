"""Quantization quality and cost on the real SmolLM2-135M: ours (RTN, GPTQ) beside GPTQModel.

Every configuration runs in its own child process (so peak RSS and time are its own), on the same
calibration windows and the same evaluation windows, and every checkpoint is measured the same way:
reloaded from disk with our loader (exact fp32 dequantization) and run over WikiText-2 test.

    OMP_NUM_THREADS=2 COMPRESS_DATA_DIR=../shared/data python benchmarks/quantize_smollm2.py

writes reports/quantize_smollm2.json and reports/quantize_smollm2.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # else it asks for more workers than 2 cores give
os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")  # else a C++ extension compiles on first use

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"


@dataclass
class RunSpec:
    name: str
    tool: str  # fp32 | ours | gptqmodel
    method: str = ""
    bits: int = 16
    group_size: int = -1
    act_order: bool = False


RUNS = [
    RunSpec("fp32", "fp32"),
    RunSpec("rtn-w8", "ours", "rtn", 8, -1),
    RunSpec("gptq-w8", "ours", "gptq", 8, -1, True),
    RunSpec("gptqmodel-w8", "gptqmodel", "gptq", 8, -1, True),
    RunSpec("rtn-w4g128", "ours", "rtn", 4, 128),
    RunSpec("gptq-w4g128", "ours", "gptq", 4, 128, True),
    RunSpec("gptqmodel-w4g128", "gptqmodel", "gptq", 4, 128, True),
    RunSpec("gptq-w4g128-noact", "ours", "gptq", 4, 128, False),
    RunSpec("gptqmodel-w4g128-noact", "gptqmodel", "gptq", 4, 128, False),
    RunSpec("rtn-w3g128", "ours", "rtn", 3, 128),
    RunSpec("gptq-w3g128", "ours", "gptq", 3, 128, True),
    RunSpec("gptqmodel-w3g128", "gptqmodel", "gptq", 3, 128, True),
]


def windows(args, tokenizer):
    from compress.data import calibration_windows, eval_windows, load_calibration_text, load_text, tokenize

    calib_text, calib_record = load_calibration_text(args.calib)
    calib, calib_info = calibration_windows(tokenize(tokenizer, calib_text), calib_record, args.nsamples, args.seqlen,
                                            args.seed)
    eval_text, eval_record = load_text("wikitext2:test")
    evals, eval_info = eval_windows(tokenize(tokenizer, eval_text), eval_record, args.seqlen, args.eval_windows)
    return calib, calib_info, evals, eval_info


def run_child(spec: RunSpec, args) -> dict:
    from compress.bench.score import score_windows
    from compress.checkpoint import gptq_quantization_config, load_quantized, save_quantized
    from compress.models import load_model, resolve, weight_bytes_on_disk
    from compress.quant.apply import quantize_model
    from compress.registry import get_method
    from compress.runtime import peak_rss_bytes

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    source = resolve(MODEL).path
    model, tokenizer = load_model(source)
    calib, calib_info, evals, eval_info = windows(args, tokenizer)
    result = {"run": asdict(spec), "calibration": calib_info.to_dict(), "evaluation": eval_info.to_dict()}
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        folder = Path(work) / spec.name
        if spec.tool == "fp32":
            measured, quant_seconds, size = model, 0.0, weight_bytes_on_disk(source)
        else:
            started = time.perf_counter()
            if spec.tool == "ours":
                method = get_method(spec.method)
                extra = {"act_order": spec.act_order} if method.needs_calibration else {}
                cfg = method.config_cls(bits=spec.bits, group_size=spec.group_size, sym=True, **extra)
                stats = quantize_model(model, method, cfg, calib if method.needs_calibration else None,
                                       torch.device("cpu"), show_progress=False)
                save_quantized(model, tokenizer, folder,
                               gptq_quantization_config(cfg, method.name, "bench", stats.block_prefix,
                                                        [layer.shape[1] for layer in stats.layers]), {})
            else:
                del model
                quantize_with_gptqmodel(source, spec, calib, folder)
            quant_seconds = time.perf_counter() - started
            result["peak_rss_quantize_bytes"] = peak_rss_bytes()
            size = weight_bytes_on_disk(folder)
            measured, _ = load_quantized(folder)
        ppl = score_windows(measured, evals, torch.device("cpu"))[0].perplexity
    result.update(perplexity=ppl.perplexity, eval_tokens=ppl.tokens, quantize_seconds=quant_seconds,
                  weight_bytes=size, peak_rss_bytes=peak_rss_bytes(), threads=torch.get_num_threads())
    return result


def quantize_with_gptqmodel(source: Path, spec: RunSpec, calib: list[torch.Tensor], folder: Path) -> None:
    from compress.peers.gptqmodel_quant import quantize_with_gptqmodel as run

    run(source, spec.bits, spec.group_size, spec.act_order, 0.01, calib, folder)


def markdown(results: list[dict], args) -> str:
    first = results[0]
    cal, ev = first["calibration"], first["evaluation"]
    lines = [
        "# SmolLM2-135M: RTN and GPTQ (ours) beside GPTQModel",
        "",
        f"Generated by `python benchmarks/quantize_smollm2.py` on {time.strftime('%Y-%m-%d')}, CPU, "
        f"{first['threads']} threads (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}), one child process per row.",
        "",
        f"- Calibration: {cal['count']} windows x {cal['seqlen']} tokens, random starts (seed {cal['seed']}) in "
        f"{cal['text']['source']}:{cal['text']['split']} ({cal['text']['origin']}); the same windows for every row.",
        f"- Perplexity: WikiText-2 raw test ({ev['text']['origin']}), tokenized once without BOS, the first "
        f"{ev['count']} non-overlapping {ev['seqlen']}-token windows ({first['eval_tokens']} predicted tokens), "
        "ppl = exp(mean NLL). Every checkpoint is reloaded from disk and dequantized exactly in fp32 by the same loader.",
        "- Settings shared by ours and GPTQModel: symmetric, damp 0.01, true-sequential, act-order (desc_act) "
        "where the table says so; GPTQModel's act_group_aware (GAR) and MSE grid search turned off so both run "
        "classic GPTQ. W8 is per channel.",
        "- Quantize time: from the loaded fp32 model to the saved checkpoint (calibration forward passes, GPTQ, "
        "packing, writing). Peak RSS: of that child process up to the saved checkpoint.",
        "",
        "| run | bits | group | act-order | perplexity | vs fp32 | quantize s | peak RSS MiB | weights MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = next(r["perplexity"] for r in results if r["run"]["tool"] == "fp32")
    for r in results:
        run = r["run"]
        group = "-" if run["tool"] == "fp32" else ("channel" if run["group_size"] == -1 else run["group_size"])
        rss = r.get("peak_rss_quantize_bytes", r["peak_rss_bytes"]) / 2**20
        act = "yes" if run["act_order"] else "-"
        lines.append(f"| {run['name']} | {run['bits'] if run['tool'] != 'fp32' else 32} | {group} | {act} | "
                     f"{r['perplexity']:.3f} | {100 * (r['perplexity'] / base - 1):+.2f}% | "
                     f"{r['quantize_seconds']:.1f} | {rss:.0f} | {r['weight_bytes'] / 2**20:.1f} |")
    lines += ["", "## Ours vs GPTQModel (same windows, same settings)", "",
              "| bits/group | our GPTQ ppl | GPTQModel ppl | ppl gap | our time / GPTQModel time |", "|---|---|---|---|---|"]
    by_name = {r["run"]["name"]: r for r in results}
    for tag in ("w8", "w4g128", "w3g128", "w4g128-noact"):
        ours, peer = by_name.get(f"gptq-{tag}"), by_name.get(f"gptqmodel-{tag}")
        if ours and peer:
            lines.append(f"| {tag} | {ours['perplexity']:.3f} | {peer['perplexity']:.3f} | "
                         f"{100 * (ours['perplexity'] / peer['perplexity'] - 1):+.2f}% | "
                         f"{ours['quantize_seconds'] / peer['quantize_seconds']:.2f} |")
    lines += ["", "## RTN vs GPTQ (ours)", "", "| bits/group | RTN ppl | GPTQ ppl |", "|---|---|---|"]
    for tag in ("w8", "w4g128", "w3g128"):
        rtn, gptq = by_name.get(f"rtn-{tag}"), by_name.get(f"gptq-{tag}")
        if rtn and gptq:
            lines.append(f"| {tag} | {rtn['perplexity']:.3f} | {gptq['perplexity']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib", default="auto")
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--runs", default="all", help="comma-separated run names, or all")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "quantize_smollm2")
    parser.add_argument("--work", default=None, help="folder for temporary checkpoints (default: the system's)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        spec = next(r for r in RUNS if r.name == args.child)
        args.result.write_text(json.dumps(run_child(spec, args), indent=2))
        return 0

    chosen = RUNS if args.runs == "all" else [r for r in RUNS if r.name in args.runs.split(",")]
    results = []
    for spec in chosen:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            command = [sys.executable, __file__, "--child", spec.name, "--result", out.name,
                       "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(args.seed),
                       "--calib", args.calib, "--eval-windows", str(args.eval_windows)]
            if args.work:
                command += ["--work", args.work]
            print(f"[{time.strftime('%H:%M:%S')}] {spec.name} ...", flush=True)
            # cwd: GPTQModel writes a logs/ folder into the working directory.
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=args.work or tempfile.gettempdir())
            result = json.loads(Path(out.name).read_text())
        print(f"    ppl {result['perplexity']:.3f}  quantize {result['quantize_seconds']:.1f} s", flush=True)
        results.append(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         "results": results}, indent=2))
    report = markdown(results, args)
    args.out.with_suffix(".md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
