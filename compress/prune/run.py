"""The pruning API: ``prune(PruneRequest)`` does load -> [calibrate] -> prune [-> quantize] -> save.

The saved folder is an ordinary Hugging Face model (weight methods keep the architecture with zeros
in place; structured pruning writes the smaller shape into config.json), or with ``bits`` a
GPTQ-format checkpoint whose zeros survived quantization. ``compress_manifest.json`` records the
sparsity of every layer (or what structured pruning removed).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compress import __version__
from compress.checkpoint import MANIFEST_NAME, gptq_quantization_config
from compress.errors import UserError
from compress.output import atomic_folder
from compress.models import source_license, weight_bytes_on_disk
from compress.prune.request import PruneRequest  # noqa: F401  (re-exported)
from compress.prune.apply import PruneStats, prune_layerwise
from compress.prune.progress import PruneProgress
from compress.run_skeleton import open_for_run, run_output
from compress.runtime import environment, peak_rss_bytes
from compress.select import ModuleSelection, block_linears, find_blocks

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class PruneResult:
    folder: Path
    source_bytes: int
    output_bytes: int
    seconds: float
    manifest: dict
    model: object = field(default=None, repr=False)
    """The pruned model still in memory (on the CPU)."""


def saved_dtype(folder: Path) -> torch.dtype:
    """The dtype the source model's config declares (what it is stored in); float32 when unknown."""
    values = json.loads((folder / "config.json").read_text())
    return _DTYPES.get(values.get("dtype") or values.get("torch_dtype"), torch.float32)


def check_pattern_fits(model, cfg, selection: ModuleSelection) -> None:
    """N:M needs every selected layer's input width to be a multiple of M: checked before any work."""
    pattern = getattr(cfg, "parsed_pattern", None)
    if pattern is None or not pattern.structured:
        return
    _, blocks = find_blocks(model)
    for name, layer in block_linears(blocks[0], selection).items():
        if layer.in_features % pattern.m:
            raise UserError(f"{pattern} sparsity needs input widths that are multiples of {pattern.m}, but {name} "
                            f"has {layer.in_features}: leave it out with --exclude '{name}'")


def prune(request: PruneRequest) -> PruneResult:
    method, cfg = request.method_config()
    quant = request.quant_config()
    started = time.perf_counter()
    opened = open_for_run(request, cfg.tag + (f"-{quant.tag}" if quant else ""),
                          method.needs_calibration or quant is not None, streaming=not method.changes_shape)
    check_pattern_fits(opened.model, cfg, request.selection)  # on the skeleton, before any work
    run = opened.load()
    if method.changes_shape:
        return _prune_whole_model(request, method, cfg, quant, run, started)

    with run_output(request, run, packed=quant is not None, record_kind=PruneProgress) as output:
        prune_started = time.perf_counter()
        record = output.record
        if not output.resumed:
            output.writer.copy_outside_blocks()
        prune_layerwise(run.source, method, cfg, run.windows, run.device, request.selection, quant, request.progress,
                        emit=output.writer.write_module, plan=output.driver_plan(), report=output.report,
                        stats=record.stats)
        manifest = _manifest(request, method, cfg, quant, run, record.stats, time.perf_counter() - prune_started)
        manifest["blocks"] = output.report.blocks
        manifest["experts"] = output.experts_record(output.report, "magnitude pruning" + (" + RTN" if quant else ""))
        qcfg = None if quant is None else gptq_quantization_config(
            quant, f"{method.name}+gptq", __version__, record.stats.block_prefix,
            [layer["shape"][1] for layer in manifest["layers"]])
        folder = output.finish(qcfg, manifest)
    return PruneResult(folder, manifest["source"]["bytes"], weight_bytes_on_disk(folder),
                       time.perf_counter() - started, manifest, None if run.source.streaming else run.model)


def _prune_whole_model(request: PruneRequest, method, cfg, quant, run, started: float) -> PruneResult:
    """A method that rebuilds the model (structured): the whole model in memory, saved whole."""
    prune_started = time.perf_counter()
    model, stats = method.apply(run.model, cfg, run.windows, run.device, request.selection, quant, request.progress)
    model = model.to("cpu")
    manifest = _manifest(request, method, cfg, quant, run, stats, time.perf_counter() - prune_started, model)
    save_dense(model.to(saved_dtype(run.resolved.path)), run.tokenizer, run.out, manifest, request.force,
               source=run.resolved.path)
    return PruneResult(run.out, manifest["source"]["bytes"], weight_bytes_on_disk(run.out),
                       time.perf_counter() - started, manifest, model)


def _manifest(request: PruneRequest, method, cfg, quant, run, stats: PruneStats, seconds: float, model=None) -> dict:
    resolved = run.resolved
    model = model if model is not None else run.model
    layers = [dataclasses.asdict(layer) for layer in stats.layers]
    total = sum(layer["shape"][0] * layer["shape"][1] for layer in layers)
    return {
        "tool": "compress-workbench",
        "kind": "prune",
        "method": method.name,
        "config": dataclasses.asdict(cfg),
        "quantization": dataclasses.asdict(quant) if quant else None,
        "source": {"reference": request.model, "path": str(resolved.path), "origin": resolved.origin,
                   "license": source_license(resolved),
                   "bytes": weight_bytes_on_disk(resolved.path)},
        "calibration": run.calibration.to_dict() if run.calibration else None,
        "selection": {"include": request.include, "exclude": request.exclude},
        "sparsity": {"pruned_layers": len(layers),
                     "overall": round(sum(layer["sparsity"] * layer["shape"][0] * layer["shape"][1]
                                          for layer in layers) / total, 6) if total else None},
        "layers": layers,
        "structure": stats.structure or None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(run.device),
        "timings_s": {"load": round(run.load_seconds, 3), "prune": round(seconds, 3)},
        "peak_rss_bytes": peak_rss_bytes(),
        "environment": environment(),
        "command": request_command(request),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def save_dense(model, tokenizer, folder: Path, manifest: dict, force: bool = False, source: Path | None = None) -> Path:
    """Write an ordinary Hugging Face folder (safetensors) plus the manifest, atomically."""
    from compress.models import quiet_transformers

    # transformers' "Writing model shards" bar is not ours to show: the command says what it wrote.
    with atomic_folder(folder, force=force, source=source) as tmp, quiet_transformers():
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return folder


def request_command(request: PruneRequest) -> str:
    """The `compress prune` command line that repeats this request (settings that differ from the defaults)."""
    defaults = PruneRequest()
    parts = ["compress", "prune", request.model]
    for f in dataclasses.fields(request):
        value = getattr(request, f.name)
        if f.name in ("model", "progress") or value == getattr(defaults, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "sym":
            parts.append("--asym")
        elif isinstance(value, bool):
            parts.append(flag)
        elif isinstance(value, list):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return " ".join(parts)
