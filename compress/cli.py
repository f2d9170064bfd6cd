"""`compress` command line: parses, calls the API, maps errors to exit codes.

Every subcommand is a row in COMMANDS: (help, add_arguments, run).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path
from typing import Callable

from compress.errors import UserError

EXIT_USER_ERROR = 2


# --- compress models ------------------------------------------------------------------------------


FORCE_HELP = ("replace an earlier output of ours, or an empty folder; a folder holding anything this tool did not "
              "write is refused")


def _models_args(p: argparse.ArgumentParser) -> None:
    pass


def _models_run(args: argparse.Namespace) -> int:
    from compress.models import REGISTRY

    print(f"{'alias':<20} {'family':<10} {'source':<44} notes")
    for spec in REGISTRY.values():
        source = spec.hub_id or "built from a config"
        if spec.packages:
            more = len(spec.packages) - 1  # a file shipped in parts: its first package and how many follow
            source += f" | offline: {spec.packages[0]}" + (f" (+{more})" if more else "")
        print(f"{spec.alias:<20} {spec.family:<10} {source:<44} {spec.description}")
    print("\nAny local folder with config.json and .safetensors weights is accepted too.")
    return 0


# --- settings shared by quantize and prune (compress.settings.RunSettings) ----------------------


def _run_settings_args(p: argparse.ArgumentParser, verb: str, configs: str) -> None:
    from compress.data import SOURCES

    S = argparse.SUPPRESS  # only options given on the command line override the --config file
    p.add_argument("--calib", default=S, help=f"calibration text: auto (default), {', '.join(SOURCES)} "
                   "(NAME:SPLIT), or a .txt/.raw/.jsonl/.tsv file")
    p.add_argument("--nsamples", type=int, default=S, help=f"calibration windows (default {_default('nsamples')})")
    p.add_argument("--seqlen", type=int, default=S, help=f"tokens per calibration window (default {_default('seqlen')})")
    p.add_argument("--seed", type=int, default=S, help=f"seed of the window starts (default {_default('seed')})")
    p.add_argument("--device", default=S, help="cpu, cuda or auto (default: cuda if present)")
    p.add_argument("--out", default=S, help="output folder (default out/<model>-<method>-<tag>)")
    p.add_argument("--force", action="store_const", const=True, default=S, help=FORCE_HELP)
    p.add_argument("--trust-remote-code", dest="trust_remote_code", action="store_const", const=True, default=S,
                   help="allow a model's own Python code (off by default)")
    p.add_argument("--include", nargs="+", default=S, help=f"glob patterns of block modules to {verb}")
    p.add_argument("--exclude", nargs="+", default=S, help="glob patterns of block modules to leave alone")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=S,
                   help="no progress bar")
    p.add_argument("--resume", action="store_const", const=True, default=S,
                   help="continue an interrupted run of the same command from its last finished block")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=float, default=S,
                   help=f"seconds between resumable checkpoints (default {_default('checkpoint_every'):g}; 0 = after "
                        "every block)")
    p.add_argument("--max-shard-size", dest="max_shard_bytes", type=_byte_size, default=S,
                   help="largest output weight file, e.g. 2GB (default) or 500MB; larger outputs are sharded")
    p.add_argument("--expert-min-share", dest="expert_min_share", type=float, default=S,
                   help="mixture of experts: experts reached by fewer than this share of the calibration tokens "
                        f"(default {_default('expert_min_share')}) are quantized with RTN / pruned by magnitude instead, and listed")
    p.add_argument("--activation-budget", dest="activation_budget", type=_budget_size, default=S,
                   help=f"calibration activations carried between blocks in memory, e.g. 2GB (default "
                        f"{_default('activation_budget') / 2**30:g} GiB) or 0; beyond it they go to files in the "
                        "output's partial folder")
    p.add_argument("--in-memory", dest="in_memory", action="store_const", const=True, default=S,
                   help="load the whole model first instead of streaming one block at a time (needs the "
                        "model's float32 size in memory on CPU)")
    p.add_argument("--config", type=Path, default=None, help=f"YAML file with any of these settings ({configs})")


def _default(name: str, cls=None):
    """A setting's default as its dataclass holds it (RunSettings unless ``cls``): the help never restates it."""
    import dataclasses

    from compress.settings import RunSettings

    field = next(f for f in dataclasses.fields(cls or RunSettings) if f.name == name)
    return field.default


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _budget_size(text: str) -> int:
    """A size that may be 0 (a budget of nothing: everything goes to files)."""
    return 0 if text.strip() == "0" else _byte_size(text)


def _byte_size(text: str) -> int:
    """'2GB', '500MB', '1.5GiB' or a plain byte count -> bytes."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _SIZE_UNITS or float(match.group(1)) * _SIZE_UNITS[unit] < 1:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use e.g. 2GB, 500MB or a byte count")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _preflight(model: str, *checks: Callable[[], None], allow_gguf: bool = False) -> None:
    """The mistakes a user makes most (an unknown model or method, a wrong path), refused before torch and
    transformers are imported: seconds of start-up for a one-line answer otherwise."""
    from compress.models import check_reference

    check_reference(model, allow_gguf)
    for check in checks:
        check()


def _request(cls, args: argparse.Namespace):
    """The request dataclass from the --config file, overridden by the options given on the command line."""
    from compress.config_io import check_fields, read_yaml_mapping

    values: dict = {}
    if args.config is not None:
        values.update(check_fields(cls, read_yaml_mapping(args.config), str(args.config)))
    values.update({k: v for k, v in vars(args).items() if k not in ("config", "command", "handler")})
    return cls(**values)


# --- compress quantize ----------------------------------------------------------------------------


def _quantize_args(p: argparse.ArgumentParser) -> None:
    from compress.help_text import defaults_by_method, method_choices
    from compress.quant.choices import SUPPORTED_BITS
    from compress.quant.config import QUANT_CONFIGS
    from compress.quant.request import QuantizeRequest

    def by_method(option: str, render=str) -> str:
        return defaults_by_method(option, QUANT_CONFIGS, render)

    def on_off(value) -> str:
        return "on" if value else "off"

    S = argparse.SUPPRESS  # only options given on the command line override the --config file
    p.add_argument("model", nargs="?", default=S, help="alias (see `compress models`) or a local model folder")
    p.add_argument("--bits", type=int, default=S, help=f"bits per weight: {', '.join(map(str, SUPPORTED_BITS))} "
                   f"(default: {by_method('bits')})")
    p.add_argument("--method", default=S,
                   help=f"{method_choices(QUANT_CONFIGS, _default('method', QuantizeRequest))} (bnb: bitsandbytes)")
    p.add_argument("--group-size", dest="group_size", type=int, default=S,
                   help=f"columns per scale; -1 = per output channel (default: "
                        f"{by_method('group_size')})")
    grid = by_method("sym", lambda sym: "symmetric" if sym else "asymmetric")
    p.add_argument("--sym", dest="sym", action="store_const", const=True, default=S,
                   help=f"symmetric grid (default: {grid})")
    p.add_argument("--asym", dest="sym", action="store_const", const=False, default=S,
                   help=f"asymmetric grid (default: {grid})")
    p.add_argument("--scale-search", dest="scale_search", default=S, choices=["none", "mse", "weighted"],
                   help="each group's range: min/max (none), the shrink with least squared error (mse), or with "
                        "least error weighted by the calibration inputs' mean squares (weighted) (default: "
                        f"{by_method('scale_search')})")
    p.add_argument("--awq", action="store_const", const=True, default=S,
                   help="gptq: fold AWQ's activation-aware channel scales into each block before GPTQ")
    p.add_argument("--act-bits", dest="act_bits", type=int, default=S,
                   help="gptq, rtn: 8 quantizes the activations too (W8A8: int8 per token as each matmul runs, what "
                        "vLLM's int8 kernels do), after SmoothQuant's smoothing; weights then default to 8-bit, "
                        "symmetric, per channel (--method smoothquant: the same with rtn)")
    p.add_argument("--smoothing-strength", dest="smoothing_strength", type=float, default=S,
                   help="W8A8: SmoothQuant's alpha in [0, 1] for every group of layers (0: no smoothing; default: "
                        "searched per group for the least quantized output error)")
    p.add_argument("--act-order", dest="act_order", action="store_const", const=True, default=S,
                   help=f"GPTQ: quantize columns by decreasing Hessian diagonal (desc_act; default: "
                        f"{by_method('act_order', on_off)})")
    p.add_argument("--no-act-order", dest="act_order", action="store_const", const=False, default=S,
                   help="GPTQ: quantize columns in their natural order")
    p.add_argument("--group-aware", dest="group_aware", action="store_const", const=True, default=S,
                   help="GPTQ with --act-order: visit whole groups, the group with the most important column first "
                        "(GPTQModel's act_group_aware): groups stay contiguous columns and each group's grid is "
                        f"chosen as it comes up from the updated weights (default: {by_method('group_aware', on_off)})")
    p.add_argument("--no-group-aware", dest="group_aware", action="store_const", const=False, default=S,
                   help="GPTQ with --act-order: plain act order, column by column (groups stay contiguous only with "
                        "--static-groups; otherwise a group order that only --format gptq holds)")
    p.add_argument("--static-groups", dest="static_groups", action="store_const", const=True, default=S,
                   help=f"GPTQ with --act-order: fix group grids from the original weights before any update "
                        f"(default: {by_method('static_groups', on_off)})")
    p.add_argument("--no-static-groups", dest="static_groups", action="store_const", const=False, default=S,
                   help="GPTQ with --act-order: make each group's grid as its columns come up")
    p.add_argument("--damp-percent", dest="damp_percent", type=float, default=S, help=f"GPTQ dampening, a fraction of the Hessian's "
                   f"mean diagonal (default: {by_method('damp_percent')})")
    p.add_argument("--quant-type", dest="quant_type", default=S, choices=["nf4", "fp4"],
                   help=f"bnb --bits 4: code book (default: {by_method('quant_type')})")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_const", const=False, default=S,
                   help="bnb --bits 4: keep block scales in float (reloads lossily on CPU; double quantization "
                        f"default: {by_method('double_quant', on_off)})")
    p.add_argument("--int8-threshold", dest="int8_threshold", type=float, default=S,
                   help=f"bnb --bits 8: LLM.int8() outlier threshold (default: {by_method('int8_threshold')})")
    p.add_argument("--avg-bits", dest="avg_bits", type=float, default=S,
                   help="mixed precision: measure each layer's sensitivity and give it 3, 4 or 8 bits (or 4 at group "
                        "32) for the least predicted loss within this average of stored bits per weight (e.g. 4.25)")
    from compress.formats import DEFAULT_FORMAT, FORMATS

    p.add_argument("--format", dest="format", default=S, choices=list(FORMATS),
                   help=f"checkpoint format (default {DEFAULT_FORMAT}): "
                        + "; ".join(f"{name}: {fmt.summary}" for name, fmt in FORMATS.items()))
    p.add_argument("--lm-head-bits", dest="lm_head_bits", type=int, default=S,
                   help="also quantize the output head (and an embedding tied to it) per channel, data-free, at "
                        "these bits (8 recommended; default: keep it in float)")
    _run_settings_args(p, "quantize", "configs/quantize/")


def _quantize_run(args: argparse.Namespace) -> int:
    from compress.quant.request import QuantizeRequest
    from compress.registry import check_method_name

    request = _request(QuantizeRequest, args)
    _preflight(request.model, lambda: check_method_name(request.method))
    from compress.api import quantize
    from compress.bench.summary import human_bytes

    result = quantize(request)
    ratio = result.source_bytes / max(result.output_bytes, 1)
    config = result.manifest["config"]
    if config.get("act_bits"):
        detail = f"per channel, activations int{config['act_bits']} per token"
    elif "group_size" in config:
        detail = f"group {config['group_size']}"
    else:
        detail = result.folder.name.rsplit("-", 1)[-1]
    print(f"quantized {request.model} with {result.manifest['method']} ({config['bits']} bits, {detail})")
    print(f"  size   {human_bytes(result.source_bytes)} -> {human_bytes(result.output_bytes)} ({ratio:.2f}x smaller)")
    print(f"  time   {result.seconds:.1f} s (quantization {result.manifest['timings_s']['quantize']:.1f} s), "
          f"peak RSS {human_bytes(result.peak_rss_bytes)}")
    print(f"  saved  {result.folder}")
    if "format" in result.manifest:
        print(f"  loads  in {', '.join(result.manifest['format']['engines'])} ({result.manifest['format']['name']})")
    return 0


# --- compress prune -------------------------------------------------------------------------------


def _prune_args(p: argparse.ArgumentParser) -> None:
    from compress.help_text import defaults_by_method, method_choices
    from compress.prune.config import PRUNE_CONFIGS
    from compress.prune.request import PruneRequest
    from compress.quant.choices import SUPPORTED_BITS

    def by_method(option: str) -> str:
        return defaults_by_method(option, PRUNE_CONFIGS)

    S = argparse.SUPPRESS  # only options given on the command line override the --config file
    p.add_argument("model", nargs="?", default=S, help="alias (see `compress models`) or a local model folder")
    p.add_argument("--method", default=S, help=method_choices(PRUNE_CONFIGS, _default("method", PruneRequest)))
    p.add_argument("--sparsity", type=float, default=S,
                   help="fraction removed, in [0, 1): of each layer's weights or, for structured, of the MLP "
                        f"channels / heads / layers (default: {by_method('sparsity')}; N:M implies its own)")
    p.add_argument("--pattern", default=S,
                   help=f"unstructured or N:M such as 2:4 or 4:8 (default: {by_method('pattern')})")
    p.add_argument("--comparison", default=S, choices=["row", "layer"],
                   help=f"magnitude/wanda: compare scores per output row or across the layer (default: "
                        f"{by_method('comparison')})")
    p.add_argument("--target", default=S, choices=["mlp", "heads", "layers"],
                   help=f"structured: what to remove (default: {by_method('target')})")
    p.add_argument("--damp-percent", dest="damp_percent", type=float, default=S,
                   help=f"SparseGPT / --bits: Hessian dampening (default: {by_method('damp_percent')})")
    p.add_argument("--bits", type=int, default=S, help="also quantize the kept weights "
                   f"({', '.join(map(str, SUPPORTED_BITS))} bits) and write a GPTQ-format checkpoint")
    p.add_argument("--group-size", dest="group_size", type=int, default=S,
                   help=f"with --bits: columns per scale (default {_default('group_size', PruneRequest)})")
    p.add_argument("--asym", dest="sym", action="store_const", const=False, default=S,
                   help=f"with --bits: asymmetric grid (default "
                        f"{'symmetric' if _default('sym', PruneRequest) else 'asymmetric'})")
    _run_settings_args(p, "prune", "configs/prune/")


def _prune_run(args: argparse.Namespace) -> int:
    from compress.prune.request import PruneRequest
    from compress.registry import check_prune_method_name

    request = _request(PruneRequest, args)
    _preflight(request.model, lambda: check_prune_method_name(request.method))
    from compress.bench.summary import human_bytes
    from compress.prune.run import prune

    result = prune(request)
    m = result.manifest
    ratio = result.source_bytes / max(result.output_bytes, 1)
    if m["structure"]:
        s = m["structure"]
        where = "in the model" if s["target"] == "layers" else "per block"
        what = f"{s['units_before']} -> {s['units_after']} {s['unit']} {where}"
        print(f"pruned {request.model} with structured/{s['target']}: {what}, {m['parameters']:,} parameters")
    else:
        overall = m["sparsity"]["overall"]
        print(f"pruned {request.model} with {m['method']} ({m['config'].get('pattern')}): {overall:.1%} of the "
              f"weights of {m['sparsity']['pruned_layers']} layers are zero"
              + (f", kept weights quantized to {m['quantization']['bits']} bits" if m["quantization"] else ""))
    print(f"  size   {human_bytes(result.source_bytes)} -> {human_bytes(result.output_bytes)} "
          f"({ratio:.2f}x smaller on disk)")
    print(f"  time   {result.seconds:.1f} s (pruning {m['timings_s']['prune']:.1f} s)")
    print(f"  saved  {result.folder}")
    return 0


# --- compress bench -------------------------------------------------------------------------------


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="alias or folder: a dense model, a GPTQ-format or a bitsandbytes checkpoint")
    p.add_argument("--base", help="uncompressed model for KL divergence / top-1 agreement (same tokenizer)")
    p.add_argument("--name", help="label of this row in reports")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda if present)")
    p.add_argument("--dtype", default="auto", help="auto (the backend's dtype, else float32 on CPU and float16 on "
                   "CUDA), float32, bfloat16, float16")
    p.add_argument("--backend", default="auto", help="what runs the model: auto (fastest that can), dense, dequant "
                   "(reference), torch (fused int4/int8 CPU kernels), gptqmodel, bitsandbytes, onnxruntime (an "
                   "export-onnx folder), llamacpp (a .gguf file), vllm (vLLM's CPU build in its own processes, after `compress "
                   "setup vllm`: perplexity and KL from its prompt log-probabilities, serving figures from its server "
                   "at 1, 4 and 16 clients)")
    p.add_argument("--base-dtype", dest="base_dtype", help="dtype of --base (default: --dtype)")
    p.add_argument("--transform", help="a peer's in-memory scheme applied after loading: torchao-int8wo")
    p.add_argument("--eval", default="wikitext2", help="perplexity text: NAME[:SPLIT] or a file (default wikitext2 test)")
    p.add_argument("--windows", type=int, help="number of windows from the start of the text (default: all)")
    p.add_argument("--seqlen", type=int, help="tokens per window (default min(2048, model context))")
    p.add_argument("--bos", default="auto", choices=["auto", "yes", "no"],
                   help="start each perplexity window with the BOS token: auto = as the tokenizer does (default)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="windows per scoring pass (default: auto)")
    p.add_argument("--top-k", dest="top_k", type=int, default=256, help="base log-probs kept per token for KL")
    p.add_argument("--task", default="sst2:dev", help="labelled task for classifiers (default sst2:dev)")
    p.add_argument("--tasks", type=lambda s: [t for t in s.split(",") if t],
                   help="language models: lm-evaluation-harness tasks, comma-separated (e.g. lambada_openai,"
                        "arc_easy,arc_challenge,piqa,hellaswag,winogrande); needs the [eval] extra")
    p.add_argument("--limit", type=int, help="--tasks: the first N examples of each task (default all)")
    p.add_argument("--num-fewshot", dest="num_fewshot", type=int, help="--tasks: examples in each prompt (default 0)")
    p.add_argument("--no-speed", dest="speed", action="store_false", help="skip the prefill/decode timings")
    p.add_argument("--decode-tokens", dest="decode_tokens", type=int, default=32, help="timed decode steps")
    p.add_argument("--decode-batches", dest="decode_batches", type=int, nargs="+", default=[1, 8],
                   help="decode batch sizes (default 1 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per speed figure (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones (default 1)")
    p.add_argument("--prompt-tokens", dest="prompt_tokens", type=int, default=128,
                   help="prompt length before the timed decode (default 128)")
    p.add_argument("--task-batch", dest="task_batch", type=int, default=32,
                   help="classifiers: batch size of the timed pass over the task (default 32)")
    p.add_argument("--trust-remote-code", dest="trust_remote_code", action="store_true")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--out", help="write the result JSON here")


def _bench_run(args: argparse.Namespace) -> int:
    _preflight(args.model, allow_gguf=True)
    if args.base:
        _preflight(args.base)
    from compress.bench.run import BenchRequest, bench
    from compress.bench.summary import summary_lines

    values = {k: v for k, v in vars(args).items() if k not in ("command", "handler") and v is not None}
    result = bench(BenchRequest(**values))
    for line in summary_lines(result):
        print(line)
    if args.out:
        print(f"  saved  {args.out}")
    return 0


# --- compress export-onnx -------------------------------------------------------------------------


def _export_onnx_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="alias or folder: a dense model or one of our GPTQ-format checkpoints")
    p.add_argument("--weights", default="auto", help="auto (packed for a quantized checkpoint, else float), float, "
                   "int8 (ONNX Runtime dynamic INT8) or packed (the checkpoint's codes in MatMulNBits)")
    p.add_argument("--accuracy-level", dest="accuracy_level", type=int, default=4,
                   help="packed: MatMulNBits compute, 4 = int8 activations per block (default, fast), 0 = float32")
    p.add_argument("--out", help="output folder (default out/<model>-onnx-<weights>)")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument("--trust-remote-code", dest="trust_remote_code", action="store_true")


def _export_onnx_run(args: argparse.Namespace) -> int:
    _preflight(args.model)
    from compress.bench.summary import human_bytes
    from compress.ort.build import OnnxExportRequest, export_onnx

    manifest = export_onnx(OnnxExportRequest(**{k: v for k, v in vars(args).items() if k not in ("command", "handler")}))
    nodes = ", ".join(f"{k} x{v}" for k, v in sorted(manifest["nodes"].items())) or "float MatMul"
    print(f"exported {args.model} to ONNX ({manifest['weights']} weights: {nodes})")
    print(f"  size   {human_bytes(manifest['bytes'])}, {manifest['timings_s']['export']:.1f} s")
    print(f"  saved  {manifest['folder']}  (run it: compress bench {manifest['folder']})")
    return 0


# --- compress export-gguf -------------------------------------------------------------------------


def _export_gguf_args(p: argparse.ArgumentParser) -> None:
    from compress.data import SOURCES

    S = argparse.SUPPRESS  # quantize settings: only those given reach the quantize request
    p.add_argument("model", help="one of our GPTQ-format checkpoints (Llama or Mistral) whose grid fits the type, "
                   "or a float model (with --method, or --type f16)")
    p.add_argument("--type", dest="type_name", default="q4_0",
                   help="q4_0 (4-bit symmetric, group 32), q4_1 (4-bit asymmetric, group 32) or q8_0 (8-bit "
                        "symmetric, group 32) from our checkpoints; a K file type (q2_k, q3_k_s, q3_k_m, q3_k_l, "
                        "q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k: llama.cpp's mix of types) fitted from a float model "
                        "with --method gptq, awq or rtn; or f16 from a float model (what llama.cpp's own quantizer "
                        "takes); default q4_0")
    p.add_argument("--out", help="output file (default out/<checkpoint>-<type>.gguf)")
    p.add_argument("--force", action="store_true", help="replace an existing GGUF file that compress-workbench wrote (never another file)")
    p.add_argument("--float-embedding", dest="keep_float", action="store_true",
                   help="write the embedding and a float output head in float16 (default: the types llama.cpp's own "
                        "quantizer gives them, Q8_0 for the head or a tied embedding, the file's type for an untied "
                        "embedding: the same file size as llama.cpp's)")
    p.add_argument("--bpw", type=float, default=S,
                   help="with --type auto: bits per weight of the blocks' linear layers as stored; each one's K type "
                        "is chosen under it from its measured sensitivity (Q4_K_M's mix stores about 4.9)")
    p.add_argument("--imatrix-out", dest="imatrix_out", default=S,
                   help="with a K type and --method gptq or awq (or --type auto): also write the calibration statistics "
                        "(each layer's input mean squares) as llama.cpp's importance matrix, for llama-quantize "
                        "--imatrix")
    p.add_argument("--method", help="quantize a float model on the way, with the grid the type needs: gptq, awq "
                   "or rtn (the checkpoint is kept, see --checkpoint); K types: gptq (calibrated codes on the "
                   "format's grids), awq (AWQ's channel scales folded in, then the grids weighted by the inputs) or "
                   "rtn (the grids fitted to the weights), no checkpoint")
    p.add_argument("--checkpoint", dest="out_checkpoint", default=S,
                   help="with --method: folder of the quantized checkpoint (default out/<model>-<method>-<tag>)")
    p.add_argument("--calib", default=S, help=f"with --method: calibration text: auto (default), "
                   f"{', '.join(SOURCES)} (NAME:SPLIT), or a .txt/.raw/.jsonl/.tsv file")
    p.add_argument("--nsamples", type=int, default=S, help=f"with --method: calibration windows (default {_default('nsamples')})")
    p.add_argument("--seqlen", type=int, default=S, help=f"with --method: tokens per calibration window "
                   f"(default {_default('seqlen')})")
    p.add_argument("--seed", type=int, default=S, help=f"with --method: seed of the window starts (default {_default('seed')})")
    p.add_argument("--device", default=S, help="with --method: cpu, cuda or auto (default: cuda if present)")
    p.add_argument("--resume", action="store_const", const=True, default=S,
                   help="with --method: continue an interrupted quantization from its last finished block")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=S,
                   help="no progress bar")


def _export_gguf_run(args: argparse.Namespace) -> int:
    from compress.registry import check_method_name

    _preflight(args.model, *([lambda: check_method_name(args.method)] if args.method else []))
    from compress.bench.summary import human_bytes
    from compress.export_gguf.run import export_gguf

    settings = {k: v for k, v in vars(args).items()
                if k not in ("command", "handler", "model", "type_name", "out", "force", "method", "keep_float")}
    if "out_checkpoint" in settings:
        settings["out"] = settings.pop("out_checkpoint")
    record = export_gguf(args.model, args.type_name, args.out, args.force, args.method, settings, args.keep_float)
    if "tensor_types" in record:  # a K file: fitted on the way, no checkpoint
        kinds = ", ".join(f"{count} {kind}" for kind, count in record["tensor_types"].items())
        chosen = (f"types chosen under {record['auto']['bpw']:g} bits per weight, {record['auto']['reached']:g} "
                  "reached" if record["auto"] else "the types llama.cpp's quantizer gives this file type")
        print(f"exported {args.model} to GGUF {record['type']} ({record['method']}, {chosen}): {kinds}")
        if record["fallbacks"]:
            name, kind = next(iter(record["fallbacks"].items()))
            print(f"  {len(record['fallbacks'])} tensors have rows that hold no K blocks (not a multiple of 256 "
                  f"weights) and take llama.cpp's fallbacks, e.g. {name} in {kind}")
        if record["awq"]:
            print(f"  awq    {record['awq']['scaled']} groups of layers scaled, {record['awq']['unscaled']} left as "
                  "they were (no producer to fold into, experts, or no scaling beat plain rounding)")
        print(f"  size   {human_bytes(record['bytes'])}, {record['seconds']:.1f} s")
        print(f"  saved  {record['file']}  (llama.cpp runs it as it is)")
        if record["imatrix"]:
            print(f"  imatrix {record['imatrix']['file']}  ({record['imatrix']['entries']} tensors' input statistics: "
                  "llama-quantize --imatrix takes it)")
        return 0
    counts = record["tensors"]
    if "checkpoint" in record:
        made = record["checkpoint"]
        print(f"quantized {args.model} with {made['method']} in {made['seconds']:.0f} s: {made['folder']}")
    rounded = "".join(f", {name} {kind} (ggml's rounding, as llama.cpp's quantizer)"
                      for name, kind in record["rounded"].items())
    print(f"exported {args.model} to GGUF {record['type']}: {counts['blocks']} quantized tensors with our codes, "
          f"{counts['float16']} float16, {counts['float32']} float32{rounded}")
    print(f"  size   {human_bytes(record['bytes'])}, {record['seconds']:.1f} s")
    print(f"  saved  {record['file']}  (llama.cpp runs it as it is)")
    return 0


# --- compress report ------------------------------------------------------------------------------


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+", type=Path, help="result files of `compress bench --out`, or folders of them")
    p.add_argument("--out", type=Path, required=True, help="report folder, e.g. reports/NAME")
    p.add_argument("--title", help="page title")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)


def _report_run(args: argparse.Namespace) -> int:
    from compress.report import build_report

    out = build_report(args.results, args.out, args.title, force=args.force)
    print(f"report written: {out / 'README.md'} and {out / 'report.html'}")
    return 0


# --- compress sweep and compress recipe run (a matrix, or a chain, of runs: here or on Ray) --------


def _executor_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--device", help="override the config's device (cpu, cuda, auto)")
    p.add_argument("--executor", choices=["local", "ray"],
                   help=f"where the {what} run: local (default: one after another here) or ray (each one a Ray task, "
                        "gathered as they finish; the [ray] extra)")
    p.add_argument("--address", help="ray: the cluster's address (HOST:PORT, ray://HOST:PORT or auto; default: a "
                                     "local instance of this machine's CPUs)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None)


def _executor_overrides(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """(the config keys the command line overrides, those options as the reproduce line shows them)."""
    given = {"device": args.device, "progress": args.progress, "executor": args.executor, "address": args.address}
    shown = [item for key in ("device", "executor", "address") if given[key]
             for item in (f"--{key}", given[key])]
    return {k: v for k, v in given.items() if v is not None}, shown


def _reproduce(*words: str) -> list[str]:
    threads = [f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] if os.environ.get("OMP_NUM_THREADS") else []
    return threads + ["compress", *words]


def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="sweep YAML (see configs/sweep/)")
    _executor_args(p, "variants")


def _sweep_run(args: argparse.Namespace) -> int:
    from compress.sweep import load_config, run_sweep

    overrides, shown = _executor_overrides(args)
    cfg = load_config(args.config, overrides)
    report = run_sweep(cfg, _reproduce("sweep", str(args.config), *shown))
    print(f"report written: {report / 'README.md'} and {report / 'report.html'}")
    return 0


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["run"], help="run: the stages in order, then bench and report")
    p.add_argument("recipe", type=Path, help="recipe YAML (see configs/recipes/)")
    p.add_argument("--resume", action="store_true", help="continue a stage that was stopped half-way (finished "
                   "stages are reused in any case)")
    _executor_args(p, "stages and bench rows")


def _recipe_run(args: argparse.Namespace) -> int:
    from compress.recipe.config import load_recipe

    overrides, shown = _executor_overrides(args)
    recipe, stages = load_recipe(args.recipe, overrides)
    from compress.recipe.run import run_recipe

    report = run_recipe(recipe, stages, args.resume, _reproduce("recipe", "run", str(args.recipe), *shown))
    print(f"report written: {report / 'README.md'} and {report / 'report.html'}")
    return 0


def _setup_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("engine", choices=["vllm"], help="vllm: vLLM's CPU build in a virtual environment of its own "
                   "(it pins its own transformers), used by the vLLM read-back tests and benchmarks")
    p.add_argument("--force", action="store_true", help="make the environment again")


def _setup_run(args: argparse.Namespace) -> int:
    from compress.backends.vllm_env import setup_vllm

    python = setup_vllm(args.force, say=lambda line: print(line, file=sys.stderr))
    print(f"vLLM: {python}")
    return 0


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "models": ("list the model aliases", _models_args, _models_run),
    "quantize": ("quantize a model's linear layers and save a checkpoint that vLLM and transformers load "
                 "(compressed-tensors; or GPTQ)", _quantize_args, _quantize_run),
    "prune": ("prune a model (magnitude, Wanda, SparseGPT, N:M or structured) and save it", _prune_args, _prune_run),
    "export-onnx": ("export a decoder with its KV cache to ONNX (float, INT8 dynamic, or packed INT4/INT8)",
                    _export_onnx_args, _export_onnx_run),
    "export-gguf": ("write one of our GPTQ checkpoints as a GGUF file for llama.cpp, codes unchanged",
                    _export_gguf_args, _export_gguf_run),
    "bench": ("measure memory, speed, perplexity and agreement with a base model", _bench_args, _bench_run),
    "report": ("Markdown + HTML report with plots from bench results", _report_args, _report_run),
    "sweep": ("quantize and benchmark a matrix of variants of one model, then report", _sweep_args, _sweep_run),
    "recipe": ("run a recipe: prune -> distill -> quantize -> export stages, each benchmarked, one report",
               _recipe_args, _recipe_run),
    "setup": ("set up an engine that lives in an environment of its own (vllm)", _setup_args, _setup_run),
}


def command_parser(prog: str, description: str, commands: dict) -> argparse.ArgumentParser:
    """A parser with one subcommand per row of a COMMANDS table (shared by `compress` and `distill`)."""
    from compress import __version__

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"compress-workbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, run) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(handler=run)
    return parser


def dispatch(parser: argparse.ArgumentParser, argv: list[str] | None, nothing_kept: str) -> int:
    """Run the chosen subcommand; user errors become one line and exit code 2. Ctrl-C (exit code 130) and
    SIGTERM (143) end with one line saying what was kept (``nothing_kept`` when the run kept nothing)."""
    from compress import interrupt
    from compress.quiet import silence_known_noise

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    silence_known_noise()
    args = parser.parse_args(argv)
    interrupt.forget()
    with interrupt.sigterm_unwinds():
        try:
            return args.handler(args)
        except UserError as exc:
            print(f"error: {interrupt.with_kept(str(exc))}", file=sys.stderr)
            return EXIT_USER_ERROR
        except OSError as exc:
            if exc.errno not in DISK_FULL:
                _say_kept(interrupt.kept())
                raise
            print(f"error: {interrupt.with_kept(disk_full_message(exc))}", file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt as exc:
            line, code = interrupt.closing_line(exc, nothing_kept)
            print(line, file=sys.stderr)
            return code
        except Exception:
            _say_kept(interrupt.kept())  # before the traceback: where the work went
            raise


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full_message(exc: OSError) -> str:
    where = f" writing {exc.filename}" if exc.filename else ""
    return (f"the disk is full ({exc.strerror}{where}): free space or point --out (and COMPRESS_CACHE_DIR) at a disk "
            "with room, then run the same command again")


def _say_kept(lines: list[str]) -> None:
    for line in lines:
        print(line, file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    return command_parser("compress", "Make open LLMs smaller and measure the cost.", COMMANDS)


def main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser(), argv, "nothing was written")


if __name__ == "__main__":
    sys.exit(main())
