"""Quantization quality and cost on a real model (SmolLM2-135M by default, or --model gemma3-270m): ours (RTN,
GPTQ, AWQ, mixed precision) beside GPTQModel and bitsandbytes NF4.

Every configuration runs in its own child process (so peak RSS and time are its own), on the same
calibration windows and the same evaluation windows, and every checkpoint is measured the same way:
reloaded from disk and run over WikiText-2 test, perplexity and KL against the fp32 row (run first).

    OMP_NUM_THREADS=2 COMPRESS_DATA_DIR=../shared/data python benchmarks/quantize_smollm2.py

writes reports/quantize_smollm2.json and reports/quantize_smollm2.md (--model M: reports/quantize_M.*). Windows follow
the tokenizer's convention as `compress quantize` and `compress bench` do: BOS first where it puts one (Gemma).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
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
LABELS = {"smollm2-135m": "SmolLM2-135M", "gemma3-270m": "Gemma-3-270M"}


@dataclass
class RunSpec:
    name: str
    tool: str  # fp32 | ours | gptqmodel | bnb
    method: str = ""
    bits: int = 16
    group_size: int = -1
    options: dict = field(default_factory=dict)
    """ours: QuantizeRequest fields besides method/bits/group_size (none: the command's defaults);
    gptqmodel: QuantizeConfig fields; bnb: BnbConfig fields."""
    note: str = ""


CLASSIC = {"sym": True, "scale_search": "none"}  # what every run did before issue 14 (symmetric min/max grids)
GPTQ_CLASSIC = CLASSIC | {"group_aware": False, "static_groups": True}  # ... with act order column by column
GPTQMODEL_CLASSIC = {"sym": True, "desc_act": True, "act_group_aware": False, "mse": 0.0}
GPTQMODEL_BEST = {"sym": False, "desc_act": False, "act_group_aware": True, "mse": 2.4}

RUNS = [
    RunSpec("fp32", "fp32"),
    RunSpec("rtn-w8", "ours", "rtn", 8, -1, CLASSIC),
    RunSpec("gptq-w8", "ours", "gptq", 8, -1, note="defaults"),
    RunSpec("rtn-w4g128", "ours", "rtn", 4, 128, CLASSIC, "classic: symmetric min/max"),
    RunSpec("rtn-w4g128-asym-weighted", "ours", "rtn", 4, 128, {"sym": False, "scale_search": "weighted"}),
    RunSpec("gptq-w4g128-classic", "ours", "gptq", 4, 128, GPTQ_CLASSIC, "the default before: symmetric min/max"),
    RunSpec("gptq-w4g128-asym", "ours", "gptq", 4, 128, {"sym": False, "scale_search": "none"}),
    RunSpec("gptq-w4g128", "ours", "gptq", 4, 128, note="defaults"),
    RunSpec("gptq-w4g128-static", "ours", "gptq", 4, 128, {"group_aware": False, "static_groups": True},
            "the default before: act order column by column, static groups"),
    RunSpec("gptq-w4g128-gar-static", "ours", "gptq", 4, 128, {"group_aware": True, "static_groups": True},
            "group-aware order, each grid fixed from the original weights"),
    RunSpec("gptqmodel-w4g128-classic", "gptqmodel", "gptq", 4, 128, GPTQMODEL_CLASSIC),
    RunSpec("gptqmodel-w4g128-best", "gptqmodel", "gptq", 4, 128, GPTQMODEL_BEST),
    RunSpec("awq-w4g128", "ours", "awq", 4, 128, {"sym": False, "scale_search": "weighted"}),
    RunSpec("gptq-awq-w4g128", "ours", "gptq", 4, 128, {"awq": True}),
    RunSpec("gptq-mixed-avg4.25", "ours", "gptq", 4, 128, {"avg_bits": 4.25}),
    RunSpec("bnb-nf4", "bnb", "bnb", 4, 64, {"quant_type": "nf4", "double_quant": True}),
    RunSpec("rtn-w3g128-asym-weighted", "ours", "rtn", 3, 128, {"sym": False, "scale_search": "weighted"}),
    RunSpec("gptq-w3g128-classic", "ours", "gptq", 3, 128, GPTQ_CLASSIC, "the default before: symmetric min/max"),
    RunSpec("gptq-w3g128", "ours", "gptq", 3, 128, note="defaults"),
    RunSpec("gptq-w3g128-static", "ours", "gptq", 3, 128, {"group_aware": False, "static_groups": True},
            "the default before: act order column by column, static groups"),
    RunSpec("gptq-awq-w3g128", "ours", "gptq", 3, 128, {"awq": True}),
    RunSpec("gptqmodel-w3g128-best", "gptqmodel", "gptq", 3, 128, GPTQMODEL_BEST),
]


def windows(args, tokenizer):
    """The calibration windows `compress quantize` cuts, and the evaluation windows `compress bench` scores."""
    from compress.bench.run import BenchRequest, _windows
    from compress.data import calibration_windows_of_text, load_calibration_text

    calib_text, calib_record = load_calibration_text(args.calib)
    calib, calib_info = calibration_windows_of_text(tokenizer, calib_text, calib_record, args.nsamples, args.seqlen,
                                                    args.seed)
    evals, eval_info = _windows(BenchRequest(model=args.model, eval="wikitext2:test", seqlen=args.seqlen,
                                             windows=args.eval_windows), tokenizer, None)
    return calib, calib_info, evals, eval_info


def body_bits_per_weight(folder: Path, shapes: dict[str, tuple[int, int]]) -> float | None:
    """All stored bytes of the quantized block linears (codes, zero points, scales, group index, a
    code book's tables; no bias) over their weight count: what one weight costs on disk."""
    from compress.shards import ShardReader

    reader = ShardReader(folder)
    stored, weights = 0, 0
    for name, (rows, cols) in shapes.items():
        entry = reader.entries.get(f"{name}.weight")
        if entry is not None and entry.dtype is not None and entry.dtype.is_floating_point:
            continue  # kept in float
        stored += sum(e.nbytes for key, e in reader.entries.items()
                      if key.startswith(f"{name}.") and key != f"{name}.bias")
        weights += rows * cols
    return 8 * stored / weights if weights else None


def run_child(spec: RunSpec, args) -> dict:
    from compress.api import QuantizeRequest, quantize, takes_option
    from compress.bench.agreement import Reference
    from compress.bench.load import load_for_bench
    from compress.bench.score import score_windows
    from compress.checkpoint import load_quantized
    from compress.models import load_model, resolve, weight_bytes_on_disk
    from compress.runtime import peak_rss_bytes
    from compress.select import ModuleSelection, block_linears

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    source = resolve(args.model).path
    model, tokenizer = load_model(source)
    prefix_blocks = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.ModuleList)]
    blocks_name, blocks = prefix_blocks[0]
    shapes = {f"{blocks_name}.{i}.{name}": tuple(layer.weight.shape) for i, block in enumerate(blocks)
              for name, layer in block_linears(block, ModuleSelection()).items()}
    calib, calib_info, evals, eval_info = windows(args, tokenizer)
    result = {"run": asdict(spec), "calibration": calib_info.to_dict(), "evaluation": eval_info.to_dict()}
    reference_file = Path(args.work or tempfile.gettempdir()) / f"quantize_{args.model}_reference.safetensors"
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        folder = Path(work) / spec.name
        if spec.tool == "fp32":
            measured, quant_seconds, size = model, 0.0, weight_bytes_on_disk(source)
        else:
            del model
            started = time.perf_counter()
            if spec.tool in ("ours", "bnb"):
                # bitsandbytes takes no group size flag (its blocks of 64 are its own): passed only where it applies
                grid = {"group_size": spec.group_size} if takes_option(spec.method, "group_size") else {}
                quantized = quantize(QuantizeRequest(
                    model=args.model, method=spec.method, bits=spec.bits, calib=args.calib, nsamples=args.nsamples,
                    seqlen=args.seqlen, seed=args.seed, out=str(folder), progress=False, device="cpu", **grid,
                    **spec.options))
                manifest = quantized.manifest
                if manifest.get("calibration"):
                    assert manifest["calibration"]["starts"] == calib_info.to_dict()["starts"], "other windows"
                result["config"] = manifest.get("config")
                result["mixed_precision"] = {k: v for k, v in (manifest.get("mixed_precision") or {}).items()
                                             if k != "layers"} or None
                if manifest.get("mixed_precision"):
                    chosen = [c["option"] for c in manifest["mixed_precision"]["layers"].values()]
                    result["mixed_precision"]["options"] = {
                        f"w{b}g{g}": sum(1 for c in chosen if (c["bits"], c["group_size"]) == (b, g))
                        for b, g in sorted({(c["bits"], c["group_size"]) for c in chosen})}
                result["damp_raised"] = sum(1 for layer in manifest.get("layers") or [] if layer.get("damp_percent"))
            else:
                quantize_with_gptqmodel(source, spec, calib, folder)
            quant_seconds = time.perf_counter() - started
            result["peak_rss_quantize_bytes"] = peak_rss_bytes()
            size = weight_bytes_on_disk(folder)
            result["bits_per_weight"] = body_bits_per_weight(folder, shapes)
            if spec.tool == "bnb":
                measured = load_for_bench(str(folder), "float32", torch.device("cpu")).model
            else:
                measured, _ = load_quantized(folder)
        if spec.tool == "fp32":
            score, reference = score_windows(measured, evals, torch.device("cpu"), make_reference_k=256)
            reference.save(reference_file)
        else:
            score, _ = score_windows(measured, evals, torch.device("cpu"), reference=Reference.load(reference_file))
            result["kl_mean"] = score.agreement.kl_mean
            result["top1_agreement"] = score.agreement.top1_agreement
        ppl = score.perplexity
    result.update(perplexity=ppl.perplexity, eval_tokens=ppl.tokens, quantize_seconds=quant_seconds,
                  weight_bytes=size, peak_rss_bytes=peak_rss_bytes(), threads=torch.get_num_threads())
    return result


def quantize_with_gptqmodel(source: Path, spec: RunSpec, calib: list[torch.Tensor], folder: Path) -> None:
    from compress.peers.gptqmodel_quant import quantize_with_gptqmodel as run

    run(source, spec.bits, spec.group_size, spec.options["desc_act"], 0.01, calib, folder,
        sym=spec.options["sym"], act_group_aware=spec.options["act_group_aware"], mse=spec.options["mse"])


def window_tokens(record: dict) -> str:
    """What a window holds: BOS first where the tokenizer puts one (then seqlen counts the text after it)."""
    return f"BOS + {record['seqlen']} text tokens" if record.get("bos") else f"{record['seqlen']} tokens"


def _settings(run: dict) -> str:
    if run["tool"] == "fp32":
        return "-"
    options = run["options"]
    if not options:
        return "defaults"
    return ", ".join(f"{k}={v}" for k, v in options.items())


def markdown(results: list[dict], args) -> str:
    first = results[0]
    cal, ev = first["calibration"], first["evaluation"]
    by_name = {r["run"]["name"]: r for r in results}
    base = by_name["fp32"]["perplexity"]
    defaults = {k: v for k, v in (by_name.get("gptq-w4g128", {}).get("config") or {}).items()
                if k in ("sym", "scale_search", "act_order", "damp_percent", "awq")}
    lines = [
        f"# {LABELS.get(args.model, args.model)}: better 4- and 3-bit weights (ours) beside GPTQModel and bitsandbytes",
        "",
        f"Generated by `python benchmarks/quantize_smollm2.py{'' if args.model == MODEL else ' --model ' + args.model}"
        f"{'' if args.runs == 'all' else ' --runs ' + args.runs}` on {time.strftime('%Y-%m-%d')}, CPU, "
        f"{first['threads']} threads (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}), one child process per row. "
        "CUDA was not measured.",
        "",
        f"- Calibration: {cal['count']} windows x {window_tokens(cal)}, random starts (seed {cal['seed']}) in "
        f"{cal['text']['source']}:{cal['text']['split']} ({cal['text']['origin']}); the same windows "
        "for every row "
        "(ours cut them through `compress quantize`, which the benchmark checks; GPTQModel is handed them).",
        f"- Perplexity: WikiText-2 raw test ({ev['text']['origin']}), tokenized once without special tokens, the "
        f"first {ev['count']} non-overlapping windows of {window_tokens(ev)} ({first['eval_tokens']} predicted tokens), "
        "ppl = exp(mean NLL). Every checkpoint is reloaded from disk: GPTQ-layout ones dequantized exactly in fp32 by "
        "our loader, bitsandbytes through its own CPU kernels in fp32. KL: mean KL(fp32 || row) per token on the "
        "fp32 model's top-256 tokens plus the rest as one bucket (a lower bound of the full KL); top-1: share of "
        "positions where the row's argmax is the fp32 model's.",
        "- bits/weight: every stored byte of the quantized block linears (codes, zero points, fp16 scales, int32 "
        "group index; for NF4 its packed codes, absmax, nested absmax and code book) x 8 / their weight count.",
        f"- `defaults` rows are `compress quantize {args.model} --bits B --group-size 128` with no other flag "
        f"(besides this protocol's --nsamples {cal['count']}); their settings: {defaults}.",
        "- `classic` is what every run did before: symmetric min/max grids. GPTQModel 7.6 rows: `classic` = "
        "symmetric, desc_act, no GAR, no MSE search (the paper's GPTQ); `best` = asymmetric, act_group_aware "
        "(GAR), mse=2.4 (its grid search).",
        "- Quantize time: the whole command in a fresh process (load, calibration, method, packing, writing) for "
        "ours; GPTQModel's load + quantize + save. Peak RSS: of that child process up to the saved checkpoint.",
        "",
        "| run | method | settings | bits/weight | perplexity | vs fp32 | KL | top-1 | quantize s | peak RSS MiB | "
        "weights MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        run = r["run"]
        rss = r.get("peak_rss_quantize_bytes", r["peak_rss_bytes"]) / 2**20
        bpw = f"{r['bits_per_weight']:.3f}" if r.get("bits_per_weight") else "32"
        kl = f"{r['kl_mean']:.4f}" if "kl_mean" in r else "-"
        top1 = f"{100 * r['top1_agreement']:.1f}%" if "top1_agreement" in r else "-"
        method = {"fp32": "-", "gptqmodel": "GPTQModel gptq", "bnb": "bitsandbytes nf4"}.get(run["tool"], run["method"])
        lines.append(f"| {run['name']} | {method} | {_settings(run)} | {bpw} | {r['perplexity']:.3f} | "
                     f"x{r['perplexity'] / base:.3f} | {kl} | {top1} | {r['quantize_seconds']:.1f} | {rss:.0f} | "
                     f"{r['weight_bytes'] / 2**20:.1f} |")
    mixed = by_name.get("gptq-mixed-avg4.25", {}).get("mixed_precision")
    if mixed:
        lines += ["", f"Mixed precision (target {mixed['target_avg_bits']} bits per weight as the budget counts them, "
                      f"{mixed['avg_bits']} reached): layers per option {mixed['options']}."]
    lines += ["", "## Targets (issues 14 and 33)", "", "| target | measured | met |", "|---|---|---|"]

    def ratio(name):
        return by_name[name]["perplexity"] / base if name in by_name else None

    def row(text, value, ok):
        lines.append(f"| {text} | {value} | {'yes' if ok else 'no'} |")

    w4, w3 = ratio("gptq-w4g128"), ratio("gptq-w3g128")
    if w4 is not None:
        bpw = by_name["gptq-w4g128"]["bits_per_weight"]
        row("W4 g128 defaults: body bits/weight <= 4.25", f"{bpw:.3f}", bpw <= 4.25)
        row("W4 g128 defaults: perplexity ratio <= 1.25 (before: 1.49)", f"x{w4:.3f}", w4 <= 1.25)
        ours = by_name["gptq-w4g128"]
        for peer_name, label in (("bnb-nf4", "bitsandbytes NF4"), ("gptqmodel-w4g128-best", "GPTQModel's best")):
            peer = by_name.get(peer_name)
            if peer is not None:
                row(f"W4 g128 defaults ahead of {label} on perplexity", f"x{w4:.3f} vs x{peer['perplexity'] / base:.3f}",
                    w4 < peer["perplexity"] / base)
                row("... and on KL", f"{ours['kl_mean']:.4f} vs {peer['kl_mean']:.4f}", ours["kl_mean"] < peer["kl_mean"])
    if w3 is not None:
        row("W3 g128 defaults: perplexity ratio <= 2.5 (before: 5.31)", f"x{w3:.3f}", w3 <= 2.5)
    if mixed and "gptq-w4g128" in by_name:
        m, u = by_name["gptq-mixed-avg4.25"], by_name["gptq-w4g128"]
        row("mixed precision at 4.25 bits beats uniform W4 g128 on perplexity",
            f"{m['perplexity']:.3f} vs {u['perplexity']:.3f}", m["perplexity"] < u["perplexity"])
        row("... and on KL", f"{m['kl_mean']:.4f} vs {u['kl_mean']:.4f}", m["kl_mean"] < u["kl_mean"])
    lines += ["", "## Time beside GPTQModel", "", "| ours | seconds | GPTQModel | seconds | ratio |", "|---|---|---|---|---|"]
    for ours_name, peer_name in (("gptq-w4g128", "gptqmodel-w4g128-best"), ("gptq-w4g128-classic", "gptqmodel-w4g128-classic"),
                                 ("awq-w4g128", "gptqmodel-w4g128-best"), ("gptq-awq-w4g128", "gptqmodel-w4g128-best"),
                                 ("gptq-w3g128", "gptqmodel-w3g128-best")):
        ours, peer = by_name.get(ours_name), by_name.get(peer_name)
        if ours and peer:
            lines.append(f"| {ours_name} | {ours['quantize_seconds']:.1f} | {peer_name} | {peer['quantize_seconds']:.1f} | "
                         f"{ours['quantize_seconds'] / peer['quantize_seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL, help="a real model alias (default smollm2-135m)")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib", default="auto")
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--runs", default="all", help="comma-separated run names, or all (fp32 always runs first: "
                        "it makes the KL reference)")
    parser.add_argument("--out", type=Path, default=None, help="default reports/quantize_smollm2 (or _MODEL)")
    parser.add_argument("--work", default=None, help="folder for temporary checkpoints (default: the system's)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out = args.out or ROOT / "reports" / ("quantize_smollm2" if args.model == MODEL else f"quantize_{args.model}")

    if args.child:
        spec = next(r for r in RUNS if r.name == args.child)
        args.result.write_text(json.dumps(run_child(spec, args), indent=2))
        return 0

    chosen = RUNS if args.runs == "all" else [r for r in RUNS if r.name == "fp32" or r.name in args.runs.split(",")]
    results = []
    # With --work, each finished row is kept there and reused by a rerun of the same protocol (a row that fails
    # no longer loses the rows before it).
    kept = Path(args.work) / f"quantize-{args.model}-n{args.nsamples}-s{args.seqlen}-w{args.eval_windows}" \
        if args.work else None
    for spec in chosen:
        if kept is not None and (kept / f"{spec.name}.json").is_file():
            results.append(json.loads((kept / f"{spec.name}.json").read_text()))
            print(f"[{time.strftime('%H:%M:%S')}] {spec.name}: kept from an earlier run", flush=True)
            continue
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            command = [sys.executable, __file__, "--child", spec.name, "--result", out.name,
                       "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(args.seed),
                       "--calib", args.calib, "--eval-windows", str(args.eval_windows), "--model", args.model]
            if args.work:
                command += ["--work", args.work]
            print(f"[{time.strftime('%H:%M:%S')}] {spec.name} ...", flush=True)
            # cwd: GPTQModel writes a logs/ folder into the working directory.
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=args.work or tempfile.gettempdir())
            result = json.loads(Path(out.name).read_text())
        print(f"    ppl {result['perplexity']:.3f}  quantize {result['quantize_seconds']:.1f} s", flush=True)
        results.append(result)
        if kept is not None:
            kept.mkdir(parents=True, exist_ok=True)
            (kept / f"{spec.name}.json").write_text(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         "results": results}, indent=2))
    report = markdown(results, args)
    args.out.with_suffix(".md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
