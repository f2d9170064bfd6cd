"""`compress sweep CONFIG.yaml`: methods x bits x group sizes (plus dense baselines and peers) on
one model, each variant quantized, benchmarked, then one report.

Everything a variant produces is kept under ``runs/<name>/`` and reused on a rerun: a quantized
folder is named by a fingerprint of its settings and is complete once it exists (folders are written
atomically); a result file counts only when its recorded fingerprint matches. An interrupted sweep
therefore resumes where it stopped. Each benchmark runs in its own process, so its peak memory is
its own; the base model's reference logits are made once, before the first variant.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from compress.bench.command import bench_in_child
from compress.config_io import check_fields, read_yaml_mapping
from compress.errors import UserError
from compress.executors import BatchSettings, make_executor
from compress.fingerprint import IN_FOLDER_NAMES, fingerprint

DTYPE_LABELS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass
class SweepConfig(BatchSettings):
    dtypes: list[str] = field(default_factory=lambda: ["float32", "bfloat16"])
    """Dense baselines; the first is the base every variant is compared with."""
    methods: list[str] = field(default_factory=lambda: ["rtn", "gptq"])
    bits: list[int] = field(default_factory=lambda: [8, 4, 3])
    group_sizes: list[int] = field(default_factory=lambda: [128])
    peers: list[str] = field(default_factory=lambda: ["gptqmodel", "torchao-int8wo"])
    gguf: list[str] = field(default_factory=list)
    """GGUF types (q4_0, q4_1, q8_0): each of our methods quantized at the type's grid (group 32, its symmetry,
    no act-order), exported with its codes and run by llama.cpp (the [llamacpp] extra)."""
    """Peer rows where installed: gptqmodel (bits x group_sizes), torchao-int8wo."""
    # Quantization (ours and GPTQModel alike)
    calib: str = "auto"
    nsamples: int = 128
    calib_seqlen: int = 512
    seed: int = 0
    act_order: bool = True
    damp_percent: float = 0.01
    # Benchmark
    eval: str = "wikitext2"
    seqlen: int | None = None
    windows: int | None = None
    top_k: int = 256
    tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks run on every row (needs the [eval] extra): their recovery in the report."""
    limit: int | None = None
    """Examples per task (the first N; default all)."""
    num_fewshot: int = 0
    decode_tokens: int = 32
    decode_batches: list[int] = field(default_factory=lambda: [1, 8])
    repeats: int = 3
    isolate: bool = True
    """Benchmark each variant in its own process (honest peak memory)."""


@dataclass
class Variant:
    name: str
    kind: str
    """dense | ours | peer-quantizer | peer-transform | gguf"""
    dtype: str
    method: str | None = None
    bits: int | None = None
    group_size: int | None = None
    peer: str | None = None


QUANTIZER_PEERS = {"gptqmodel": ("gptqmodel", "gptqmodel")}  # name -> (module, extra)


def load_config(path: Path, overrides: dict | None = None) -> SweepConfig:
    values = check_fields(SweepConfig, read_yaml_mapping(path), str(path))
    values.update(overrides or {})
    cfg = SweepConfig(**values)
    cfg.name = cfg.name or path.stem
    return cfg


def expand(cfg: SweepConfig) -> tuple[list[Variant], list[str]]:
    """The variants of a sweep, and notes on peers that cannot run here."""
    import importlib.util

    from compress.bench.load import DTYPES
    from compress.peers import TRANSFORMS
    from compress.quant.config import WeightQuantConfig
    from compress.registry import get_method

    if not cfg.dtypes:
        raise UserError("a sweep needs at least one dense dtype in 'dtypes' (the first is the base)")
    for dtype in cfg.dtypes:
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype '{dtype}' in 'dtypes': choose from {', '.join(DTYPES)}")
    base_dtype = cfg.dtypes[0]
    variants = [Variant(DTYPE_LABELS[d], "dense", d) for d in cfg.dtypes]
    for method in cfg.methods:
        get_method(method)
    for bits in cfg.bits:
        for group in cfg.group_sizes:
            WeightQuantConfig(bits=bits, group_size=group)  # validates both, with the quantize command's errors
            tag = f"w{bits}" + ("" if group == -1 else f"g{group}")
            variants += [Variant(f"{m}-{tag}", "ours", base_dtype, m, bits, group) for m in cfg.methods]
    notes = []
    variants += _gguf_variants(cfg, base_dtype, notes)
    for peer in cfg.peers:
        if peer in QUANTIZER_PEERS:
            module, extra = QUANTIZER_PEERS[peer]
            if importlib.util.find_spec(module) is None:
                notes.append(f"{peer}: not installed here (pip install 'compress-workbench[{extra}]'), no rows")
                continue
            variants += [Variant(f"{peer}-w{b}" + ("" if g == -1 else f"g{g}"), "peer-quantizer", base_dtype, "gptq",
                                 b, g, peer) for b in cfg.bits for g in cfg.group_sizes]
        elif peer in TRANSFORMS:
            if not TRANSFORMS[peer].available():
                notes.append(f"{peer}: not installed here (pip install 'compress-workbench[{TRANSFORMS[peer].extra}]'), "
                             "no row")
                continue
            variants.append(Variant(peer, "peer-transform", base_dtype, peer=peer))
        else:
            known = ", ".join([*QUANTIZER_PEERS, *TRANSFORMS])
            raise UserError(f"unknown peer '{peer}' in 'peers': choose from {known}")
    return variants, notes


def _gguf_variants(cfg: SweepConfig, dtype: str, notes: list[str]) -> list[Variant]:
    import importlib.util

    from compress.export_gguf.blocks import BLOCK_TYPES
    from compress.export_gguf.run import QUANTIZE_METHODS

    for kind in cfg.gguf:
        if kind not in BLOCK_TYPES:
            raise UserError(f"unknown GGUF type '{kind}' in 'gguf': choose from {', '.join(BLOCK_TYPES)}")
    if cfg.gguf and importlib.util.find_spec("llama_cpp") is None:
        notes.append("gguf: llama-cpp-python is not installed here (pip install 'compress-workbench[llamacpp]'), "
                     "no GGUF rows")
        return []
    return [Variant(f"{m}-{kind}-gguf", "gguf", dtype, m, BLOCK_TYPES[kind].bits, 32, kind)
            for kind in cfg.gguf for m in cfg.methods if m in QUANTIZE_METHODS]


def _quant_settings(cfg: SweepConfig, variant: Variant) -> dict:
    return {"model": cfg.model, "variant": dataclasses.asdict(variant), "calib": cfg.calib, "nsamples": cfg.nsamples,
            "calib_seqlen": cfg.calib_seqlen, "seed": cfg.seed, "act_order": cfg.act_order,
            "damp_percent": cfg.damp_percent, "device": cfg.device}


def _bench_settings(cfg: SweepConfig, variant: Variant) -> dict:
    return _quant_settings(cfg, variant) | {
        "base_dtype": cfg.dtypes[0], "eval": cfg.eval, "seqlen": cfg.seqlen, "windows": cfg.windows,
        "top_k": cfg.top_k, "decode_tokens": cfg.decode_tokens, "decode_batches": cfg.decode_batches,
        "repeats": cfg.repeats} | ({"tasks": cfg.tasks, "limit": cfg.limit, "num_fewshot": cfg.num_fewshot}
                                  if cfg.tasks else {})


# --- one variant ---------------------------------------------------------------------------------


def _calibration(cfg: SweepConfig, source: Path):
    from transformers import AutoTokenizer

    from compress.data import calibration_windows_of_text, load_calibration_text

    text, record = load_calibration_text(cfg.calib)
    windows, _ = calibration_windows_of_text(AutoTokenizer.from_pretrained(source), text, record, cfg.nsamples,
                                             cfg.calib_seqlen, cfg.seed)
    return windows


def _variant_folder(cfg: SweepConfig, variant: Variant, root: Path) -> Path:
    return root / "models" / f"{variant.name}-{fingerprint(_quant_settings(cfg, variant), IN_FOLDER_NAMES)}"


def quantized_path(cfg: SweepConfig, variant: Variant, root: Path) -> Path:
    """Where the variant's checkpoint (or GGUF file) is, once made: named by a fingerprint of its settings."""
    folder = _variant_folder(cfg, variant, root)
    return folder.with_suffix(".gguf") if variant.kind == "gguf" else folder


def quantized_folder(cfg: SweepConfig, variant: Variant, root: Path) -> Path:
    """The variant's checkpoint, made now unless a finished one with the same settings exists."""
    folder = _variant_folder(cfg, variant, root)
    if variant.kind == "gguf":
        return _gguf_file(cfg, variant, folder)
    if folder.is_dir():
        _say(cfg, f"  reusing {folder}")
        return folder
    if variant.kind == "ours":
        from compress.api import QuantizeRequest, quantize

        quantize(QuantizeRequest(model=cfg.model, method=variant.method, bits=variant.bits,
                                 group_size=variant.group_size, **_gptq_options(cfg, variant.method),
                                 calib=cfg.calib, nsamples=cfg.nsamples, seqlen=cfg.calib_seqlen, seed=cfg.seed,
                                 device=cfg.device, out=str(folder), progress=cfg.progress))
    else:
        from compress.models import resolve
        from compress.peers.gptqmodel_quant import quantize_with_gptqmodel

        source = resolve(cfg.model).path
        quantize_with_gptqmodel(source, variant.bits, variant.group_size, cfg.act_order, cfg.damp_percent,
                                _calibration(cfg, source), folder, device=cfg.device)
    return folder


def _gptq_options(cfg: SweepConfig, method: str) -> dict:
    """The sweep's act_order / damp_percent, for the methods that take them (quantize refuses them elsewhere)."""
    from compress.api import takes_option

    return {k: getattr(cfg, k) for k in ("act_order", "damp_percent") if takes_option(method, k)}


def _gguf_file(cfg: SweepConfig, variant: Variant, folder: Path) -> Path:
    """The variant's GGUF file: our codes at the type's grid (the checkpoint kept beside it), exported."""
    from compress.export_gguf.run import export_gguf

    target = folder.with_suffix(".gguf")
    if target.is_file():
        _say(cfg, f"  reusing {target}")
        return target
    checkpoint = folder.with_name(folder.name + "-checkpoint")
    export_gguf(cfg.model, variant.peer, str(target), force=True, method=variant.method, quantize_settings={
        "calib": cfg.calib, "nsamples": cfg.nsamples, "seqlen": cfg.calib_seqlen, "seed": cfg.seed,
        "device": cfg.device, "out": str(checkpoint), "force": True, "progress": cfg.progress,
        **{k: v for k, v in _gptq_options(cfg, variant.method).items() if k != "act_order"}})
    return target


def bench_request(cfg: SweepConfig, variant: Variant, model_ref: str, out: Path):
    from compress.bench.run import BenchRequest

    return BenchRequest(model=model_ref, base=cfg.model, name=variant.name, device=cfg.device, dtype=variant.dtype,
                        base_dtype=cfg.dtypes[0], transform=variant.peer if variant.kind == "peer-transform" else None,
                        eval=cfg.eval, seqlen=cfg.seqlen, windows=cfg.windows, top_k=cfg.top_k,
                        decode_tokens=cfg.decode_tokens, decode_batches=list(cfg.decode_batches),
                        repeats=cfg.repeats, progress=cfg.progress, out=str(out), tasks=list(cfg.tasks) or None,
                        limit=cfg.limit, num_fewshot=cfg.num_fewshot)


def result_path(root: Path, variant: Variant) -> Path:
    return root / "results" / f"{variant.name}.json"


def bench_fingerprint(cfg: SweepConfig, variant: Variant) -> str:
    return fingerprint(_bench_settings(cfg, variant), IN_FOLDER_NAMES)


def kept_result(cfg: SweepConfig, variant: Variant, root: Path) -> Path | None:
    """The variant's result from an earlier run with these settings, or None (it is measured again)."""
    from compress.bench.result import kept_result as kept

    path = kept(result_path(root, variant), bench_fingerprint(cfg, variant))
    if path is not None:
        _say(cfg, f"  reusing {path}")
    return path


def measure_variant(cfg: SweepConfig, variant: Variant, root: Path, out: Path):
    """Quantize the variant unless its checkpoint exists, benchmark it into ``out``; -> its BenchResult, tagged."""
    from compress.bench.result import SweepTag
    from compress.bench.run import bench

    model_ref = cfg.model if variant.kind in ("dense", "peer-transform") else str(quantized_folder(cfg, variant, root))
    request = bench_request(cfg, variant, model_ref, out)
    result = bench_in_child(request) if cfg.isolate else bench(request)
    result.sweep = SweepTag(cfg.name, dataclasses.asdict(variant), bench_fingerprint(cfg, variant))
    result.write(out)
    return result


def run_variant(cfg: SweepConfig, variant: Variant, root: Path) -> Path:
    """The variant's result file: kept from an earlier run, or measured now."""
    path = kept_result(cfg, variant, root)
    if path is None:
        path = result_path(root, variant)
        measure_variant(cfg, variant, root, path)
    return path


# --- the sweep -------------------------------------------------------------------------------------


def prepare_reference(cfg: SweepConfig) -> None:
    """Make the base model's reference once, in this process, before any child needs it."""
    from compress.bench.run import ensure_reference

    ensure_reference(bench_request(cfg, Variant("base", "dense", cfg.dtypes[0]), cfg.model, Path("unused")))


def run_sweep(cfg: SweepConfig, command: list[str]) -> Path:
    from compress.output import refuse_existing
    from compress.report import build_report
    from compress.runtime import resolve_device

    resolve_device(cfg.device)
    report = Path(cfg.report or Path("reports") / cfg.name)
    refuse_existing(report, force=True)  # the report replaces only an earlier report of ours: said before any work
    variants, notes = expand(cfg)
    if cfg.tasks:
        from compress.tasks.run import check_tasks

        check_tasks(list(cfg.tasks), cfg.limit, cfg.num_fewshot)  # before any quantizing
    executor = make_executor(cfg.executor, cfg.address)
    root = Path(cfg.runs) / cfg.name
    _say(cfg, f"sweep {cfg.name}: {len(variants)} variants of {cfg.model} on {cfg.device} -> {root} "
              f"({executor.name} executor)")
    prepare_reference(cfg)
    paths = executor.run(cfg, variants, root)
    build_report(paths, report, cfg.title or f"{cfg.model} sweep on {cfg.device}: {cfg.name}",
                 reproduce=[" ".join(command)], notes=list(cfg.notes) + notes, force=True)
    return report


def _say(cfg: SweepConfig, message: str) -> None:
    if cfg.progress:
        print(message, file=sys.stderr, flush=True)
