"""Models larger than memory: Llama shapes up to 7B quantized block by block on this machine, with the
peak resident memory (VmHWM) and the seconds of every block, side by side in one run.

For each size (the real SmolLM2-135M, a 1.1B Llama shape, a 7B Llama-2 shape; the last two with random
float16 weights written here tensor by tensor, never held whole):

1. io:        read every tensor of the checkpoint and write it back as shards: the floor for RTN;
2. rtn:       `compress quantize SRC --method rtn --bits 4 --group-size 128` (streaming, the default);
3. rtn-mem:   the same with --in-memory (where float32 fits in memory: not for 7B);
4. gptq:      `compress quantize SRC --bits 4 --group-size 128 --nsamples 16 --seqlen 512` (streaming);
5. bench-*:   `compress bench OUT --windows 4 --seqlen 256 --no-speed` on the RTN and GPTQ outputs; bench-base the
              RTN output with `--base SRC` (the float reference made block by block);
6. onnx:      `compress export-onnx` of the RTN output (its codes in MatMulNBits, written layer by layer);
7. gguf-*:    `compress export-gguf SRC --type f16` and `--type q4_k_m --method rtn` (both streamed).

Each step runs in its own process, whose peak RSS is read from /proc at its exit.

    OMP_NUM_THREADS=2 COMPRESS_DATA_DIR=../shared/data python benchmarks/scale.py [--sizes smollm2,1.1b,7b]

writes reports/scale/ (README.md, results.json, blocks.png). Needs about 25 GB of free disk under --work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import offline_defaults, timed_main  # noqa: E402

offline_defaults()

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    mlp: int
    heads: int
    kv_heads: int
    vocab: int
    context: int


SHAPES = {
    "1.1b": Shape("1.1b", 2048, 22, 5632, 32, 4, 32000, 2048),  # TinyLlama-1.1B
    "7b": Shape("7b", 4096, 32, 11008, 32, 32, 32000, 4096),  # Llama-2-7B
}

# The child's peak resident set (VmHWM) is printed at its exit, whatever the command does.
_MEASURED = """
import atexit, runpy, sys
def _peak():
    from compress.runtime import peak_rss_bytes
    print('VMHWM_BYTES', peak_rss_bytes(), file=sys.stderr, flush=True)
atexit.register(_peak)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
"""


def run_measured(module: str, args: list[str], log: Path) -> dict:
    command = [sys.executable, "-c", _MEASURED, module, *args]
    print("$", module, " ".join(args), file=sys.stderr, flush=True)
    started = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    text = log.read_text()
    peak = next((int(line.split()[1]) for line in text.splitlines() if line.startswith("VMHWM_BYTES")), None)
    if done.returncode != 0:
        raise SystemExit(f"{module} {' '.join(args)} failed (exit {done.returncode}); see {log}")
    return {"seconds": round(seconds, 1), "peak_rss_bytes": peak}


# --- checkpoints of real shapes, written tensor by tensor ----------------------------------------------


def build_llama(shape: Shape, folder: Path, seed: int = 0) -> Path:
    """A Llama checkpoint of ``shape`` with random float16 weights (normal, std 0.02; norms 1), written one
    tensor at a time into 5 GB shards, so building it holds one tensor, not the model."""
    import torch
    from transformers import LlamaConfig

    from compress.output import cache_entry
    from compress.lazy import empty_model
    from compress.shards import ShardWriter
    from compress.tiny import tiny_tokenizer

    if (folder / "config.json").is_file():
        return folder
    config = LlamaConfig(hidden_size=shape.hidden, num_hidden_layers=shape.layers, intermediate_size=shape.mlp,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         vocab_size=shape.vocab, max_position_embeddings=shape.context, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0, dtype="float16")
    config.architectures = ["LlamaForCausalLM"]
    with cache_entry(folder) as tmp:
        config.save_pretrained(tmp)
        model = empty_model(tmp, torch.float16)
        writer = ShardWriter(tmp, max_shard_bytes=5 * 10**9)
        generator = torch.Generator().manual_seed(seed)
        started = time.perf_counter()
        for number, (name, meta) in enumerate(model.state_dict().items()):
            if name.endswith("norm.weight"):
                tensor = torch.ones(meta.shape, dtype=torch.float16)
            else:
                tensor = (torch.randn(meta.shape, generator=generator) * 0.02).to(torch.float16)
            writer.add(name, tensor)
            del tensor
            if number % 50 == 0:
                print(f"  {shape.name}: {number} tensors, {time.perf_counter() - started:.0f} s", file=sys.stderr)
        writer.finish()
        # A small byte-level tokenizer: ids stay inside any vocabulary; these weights are random anyway.
        tiny_tokenizer().save_pretrained(tmp)
    return folder


def io_floor(source: Path, out: Path) -> None:
    """Read every tensor and write it back as shards: what RTN cannot beat (run in a child process)."""
    from compress.shards import ShardReader, ShardWriter

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.perf_counter()
    reader = ShardReader(source)
    writer = ShardWriter(out)
    for name in sorted(reader.keys()):
        writer.add(name, reader.read(name))
    writer.finish()
    print("IO_SECONDS", round(time.perf_counter() - started, 3), flush=True)


# --- the steps ------------------------------------------------------------------------------------------


def quantize_step(source: Path, out: Path, log: Path, extra: list[str]) -> dict:
    measured = run_measured("compress.cli", ["quantize", str(source), "--bits", "4", "--group-size", "128",
                                             "--out", str(out), "--force", "--device", "cpu", *extra], log)
    manifest = json.loads((out / "compress_manifest.json").read_text())
    blocks = manifest.get("blocks") or []
    seconds = [b["seconds"] for b in blocks]
    rss = [b["rss_bytes"] for b in blocks]
    weights = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    result = measured | {"quantize_seconds": manifest["timings_s"]["quantize"], "output_bytes": weights,
                         "blocks": blocks}
    if seconds:
        result |= {"block_seconds_median": statistics.median(seconds), "block_seconds_min": min(seconds),
                   "block_seconds_max": max(seconds), "rss_after_block_2": rss[min(1, len(rss) - 1)],
                   "rss_after_last_block": rss[-1]}
    return result


def bench_step(model: Path, out: Path, log: Path, extra: list[str] = ()) -> dict:
    measured = run_measured("compress.cli", ["bench", str(model), "--windows", "4", "--seqlen", "256", "--no-speed",
                                             "--device", "cpu", "--no-progress", "--out", str(out), *extra], log)
    from compress.bench.result import BenchResult

    result = BenchResult.read(out)
    # The benchmark resets the kernel's peak counter before loading (and again before timing): its own
    # figure covers load + scoring, the process's VmHWM at exit only what followed the last reset.
    measured["peak_rss_bytes"] = max(measured["peak_rss_bytes"] or 0, result.memory.peak_bytes)
    found = measured | {"perplexity": result.accuracy.perplexity.perplexity, "kernel": result.model.kernel,
                        "backend": result.model.backend}
    if result.accuracy.agreement is not None:
        found["kl_mean"] = result.accuracy.agreement.kl_mean
    return found


def export_step(args: list[str], output: Path, log: Path) -> dict:
    """`compress export-onnx` or `export-gguf` in its own process: peak RSS, seconds and what it wrote."""
    measured = run_measured("compress.cli", [*args, "--force"], log)
    files = [output] if output.is_file() else [p for p in output.rglob("*") if p.is_file()]
    return measured | {"output_bytes": sum(p.stat().st_size for p in files)}


def sources(sizes: list[str], work: Path) -> dict[str, Path]:
    from compress.models import resolve

    found = {}
    for size in sizes:
        if size == "smollm2":
            found[size] = resolve("smollm2-135m").path
        else:
            print(f"building the {size} checkpoint (random float16 weights) in {work / size}", file=sys.stderr)
            found[size] = build_llama(SHAPES[size], work / "models" / size)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="smollm2,1.1b,7b")
    parser.add_argument("--steps", default="io,rtn,rtn-mem,gptq,bench-rtn,bench-gptq,bench-base,onnx,gguf-f16,"
                                           "gguf-q4_k_m")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "compress-workbench" / "scale")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "scale")
    parser.add_argument("--child-io", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from results.json")
    args = parser.parse_args()
    if args.report_only:
        write_report(json.loads((args.out / "results.json").read_text()), args.out)
        return 0
    if args.child_io:
        io_floor(*args.child_io)
        return 0
    sizes, steps = args.sizes.split(","), args.steps.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results["environment"] = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
                              "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
    for size, source in sources(sizes, args.work).items():
        entry = results.setdefault("sizes", {}).setdefault(size, {})
        source_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
        config = json.loads((source / "config.json").read_text())
        entry["source"] = {"bytes": source_bytes, "layers": config["num_hidden_layers"],
                           "hidden": config["hidden_size"], "mlp": config["intermediate_size"],
                           "dtype": config.get("dtype") or config.get("torch_dtype"), "path": str(source)}
        out = args.work / "out" / size
        for step in steps:
            log = logs / f"{size}-{step}.log"
            if step == "io":
                entry[step] = run_measured("benchmarks.scale", ["--child-io", str(source), str(out / "io")], log)
                entry[step]["io_seconds"] = next(float(line.split()[1]) for line in log.read_text().splitlines()
                                                 if line.startswith("IO_SECONDS"))
                entry[step]["bytes"] = source_bytes
                shutil.rmtree(out / "io", ignore_errors=True)
            elif step == "rtn":
                entry[step] = quantize_step(source, out / "rtn", log, ["--method", "rtn", "--no-progress"])
            elif step == "rtn-mem":
                fp32 = source_bytes * (2 if entry["source"]["dtype"] in ("float16", "bfloat16") else 1)
                if fp32 > 0.8 * results["environment"]["memory_bytes"]:
                    entry[step] = {"skipped": f"not run: the in-memory path holds float32 weights ({fp32 / GIB:.1f} "
                                              "GiB), more than this machine has"}
                else:
                    entry[step] = quantize_step(source, out / "rtn-mem", log, ["--method", "rtn", "--in-memory",
                                                                              "--no-progress"])
            elif step == "gptq":
                entry[step] = quantize_step(source, out / "gptq", log, ["--method", "gptq", "--calib", "sst2",
                                                                        "--nsamples", "16", "--seqlen", "512",
                                                                        "--no-progress"])
            elif step == "bench-base":  # the RTN output against its float source, the reference made block by block
                entry[step] = bench_step(out / "rtn", out / f"{step}.json", log, ["--base", str(source)])
            elif step.startswith("bench-"):
                entry[step] = bench_step(out / step.removeprefix("bench-"), out / f"{step}.json", log)
            elif step == "onnx":  # the RTN output's codes in MatMulNBits, written layer by layer
                entry[step] = export_step(["export-onnx", str(out / "rtn"), "--out", str(out / "onnx")],
                                          out / "onnx", log)
                shutil.rmtree(out / "onnx", ignore_errors=True)
            elif step.startswith("gguf-"):  # gguf-f16, gguf-q4_k_m (fitted on the way, no data)
                kind = step.removeprefix("gguf-")
                method = [] if kind == "f16" else ["--method", "rtn", "--no-progress"]
                target = out / f"{step}.gguf"
                entry[step] = export_step(["export-gguf", str(source), "--type", kind, *method, "--out", str(target)],
                                          target, log)
                target.unlink(missing_ok=True)
            results_file.write_text(json.dumps(results, indent=2) + "\n")
            print(f"  {size} {step}: {json.dumps({k: v for k, v in entry[step].items() if k != 'blocks'})}",
                  file=sys.stderr, flush=True)
    write_report(results, args.out)
    return 0


# --- report -----------------------------------------------------------------------------------------------


def _gib(value) -> str:
    return "" if value is None else f"{value / GIB:.2f}"


TARGETS = [("7b", "rtn", 6), ("7b", "gptq", 6), ("7b", "bench-rtn", 6), ("7b", "bench-gptq", 6),
           ("7b", "bench-base", 6), ("7b", "onnx", 6), ("7b", "gguf-f16", 6), ("7b", "gguf-q4_k_m", 6),
           ("1.1b", "rtn", 2.5), ("1.1b", "bench-rtn", 2.5)]
"""(size, step, GiB): the peak resident memory each step must stay within (issues 13 and 34)."""


def target_lines(results: dict) -> list[str]:
    lines = ["| target | peak RSS GiB | bound GiB | met |", "|---|---|---|---|"]
    for size, step, bound in TARGETS:
        r = results.get("sizes", {}).get(size, {}).get(step)
        if not r or r.get("peak_rss_bytes") is None:
            lines.append(f"| {size} {step} | not run | {bound} | |")
            continue
        met = r["peak_rss_bytes"] <= bound * GIB
        lines.append(f"| {size} {step} | {_gib(r['peak_rss_bytes'])} | {bound} | {'yes' if met else 'NO'} |")
    return lines


def write_report(results: dict, out: Path) -> None:
    rows = []
    for size, entry in results.get("sizes", {}).items():
        source = entry["source"]
        for step in ("io", "rtn", "rtn-mem", "gptq", "bench-rtn", "bench-gptq", "bench-base", "onnx", "gguf-f16",
                     "gguf-q4_k_m"):
            r = entry.get(step)
            if r is None:
                continue
            if "skipped" in r:
                rows.append(f"| {size} | {step} | | | | | {r['skipped']} |")
                continue
            per_block = (f"{r['block_seconds_median']:.2f} ({r['block_seconds_min']:.2f}-{r['block_seconds_max']:.2f})"
                         if "block_seconds_median" in r else "")
            flat = (f"{_gib(r['rss_after_block_2'])} -> {_gib(r['rss_after_last_block'])}"
                    if "rss_after_last_block" in r else "")
            note = f"ppl {r['perplexity']:.1f}; {r['kernel']}" if "perplexity" in r else ""
            if "kl_mean" in r:
                note += f"; KL to the float source {r['kl_mean']:.4f} (its reference made block by block)"
            if "output_bytes" in r and step in ("onnx", "gguf-f16", "gguf-q4_k_m"):
                note = f"wrote {r['output_bytes'] / 1e9:.2f} GB"
            if step == "io":
                note = (f"read + write of every tensor: {r['io_seconds']:.1f} s, "
                        f"{source['bytes'] / r['io_seconds'] / 1e9:.2f} GB/s")
            elif step.startswith("rtn"):
                note = (f"quantization {r['quantize_seconds']:.1f} s, {source['bytes'] / r['quantize_seconds'] / 1e9:.2f}"
                        " GB/s of source weights")
            rows.append(f"| {size} | {step} | {_gib(r['peak_rss_bytes'])} | {r['seconds']:.0f} | {per_block} | "
                        f"{flat} | {note} |")
    env = results.get("environment", {})
    lines = [
        "# Models larger than memory: streaming quantization at scale",
        "",
        "Reproduce: `OMP_NUM_THREADS=2 COMPRESS_DATA_DIR=../shared/data python benchmarks/scale.py`",
        "",
        f"Machine: {env.get('cpu_count')} cores, {env.get('memory_bytes', 0) / GIB:.1f} GiB, "
        f"OMP_NUM_THREADS={env.get('OMP_NUM_THREADS')}, no GPU. Peak RSS is the VmHWM of each step's process. "
        "The 1.1b and 7b checkpoints have random float16 weights (their perplexities mean nothing); "
        "GPTQ is calibrated on 16 x 512 tokens of SST-2 train, bench scores 4 x 256 WikiText-2 test tokens.",
        "",
        "| size | layers | hidden | MLP | stored dtype | source GB | W4 g128 output GB |",
        "|---|---|---|---|---|---|---|",
        *[f"| {size} | {e['source']['layers']} | {e['source']['hidden']} | {e['source']['mlp']} | "
          f"{e['source']['dtype']} | {e['source']['bytes'] / 1e9:.2f} | "
          f"{(e.get('rtn') or {}).get('output_bytes', 0) / 1e9:.2f} |" for size, e in results.get("sizes", {}).items()],
        "",
        *target_lines(results),
        "",
        "Each row is its own process (`compress quantize`, `bench`, `export-onnx` or `export-gguf`, run by the "
        "benchmark); `io` is the "
        "floor of just reading and writing every tensor of the source shards.",
        "",
        "| size | step | peak RSS GiB | seconds | s/block median (min-max) | RSS GiB after block 2 -> last | notes |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "![seconds and resident memory after each block](blocks.png)",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))
    plot_blocks(results, out / "blocks.png")


def plot_blocks(results: dict, path: Path) -> None:
    """Seconds and resident memory after each block, along the depth, for every size and run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (seconds_axis, rss_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for size, entry in results.get("sizes", {}).items():
        for step in ("rtn", "rtn-mem", "gptq"):
            blocks = (entry.get(step) or {}).get("blocks") or []
            if not blocks:
                continue
            depth = [b["index"] for b in blocks]
            label = f"{size} {step}"
            seconds_axis.plot(depth, [b["seconds"] for b in blocks], marker=".", label=label)
            rss_axis.plot(depth, [b["rss_bytes"] / GIB for b in blocks], marker=".", label=label)
    seconds_axis.set(xlabel="block", ylabel="seconds", yscale="log", title="time per block")
    rss_axis.set(xlabel="block", ylabel="GiB", title="resident memory after each block")
    rss_axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    timed_main(main)
