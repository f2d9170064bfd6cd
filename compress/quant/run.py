"""``quantize(QuantizeRequest)``: quantize's run, as compress/prune/run.py is prune's. Load (streaming by default)
-> check before any work -> the head and everything outside the blocks -> [mixed precision's sensitivities] ->
the blocks through the driver, checkpointed with a ``QuantizeProgress`` -> config, manifest, exchange. Methods
that write their own checkpoint (bitsandbytes) are handed the request whole."""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torch import nn

from compress import __version__
from compress.checkpoint import gptq_quantization_config
from compress.errors import UserError
from compress.formats import CheckpointFormat, LayerWidth, choose_format, first_misfit
from compress.formats.compressed_tensors import quantization_config as compressed_tensors_config
from compress.fingerprint import source_hash
from compress.models import source_license, weight_bytes_on_disk
from compress.quant.apply import quantize_model
from compress.quant.config import WeightQuantConfig
from compress.quant.head import (check_reproducible, head_and_embedding, head_file_tensors, head_record, pack_head,
                                  quantize_head)
from compress.quant.mixed import LayerOption, average_bits, choose_options, fuse, fused_units, unfuse
from compress.quant.progress import QuantizeProgress
from compress.quant.request import QuantizeRequest
from compress.quant.sensitivity import grid_option, measure_sensitivities
from compress.run_skeleton import Loaded, RunOutput, open_for_run, run_output
from compress.runtime import environment, peak_rss_bytes
from compress.writer import CheckpointWriter


@dataclass
class QuantizeResult:
    folder: Path
    source_bytes: int
    output_bytes: int
    seconds: float
    peak_rss_bytes: int
    manifest: dict
    model: object = field(default=None, repr=False)
    """The quantized model still in memory (on the CPU) after an ``in_memory`` run; None when it streamed."""


def write_outside_blocks(run: Loaded, writer: CheckpointWriter, head_cfg: WeightQuantConfig | None,
                         layout: str = "gptq") -> dict | None:
    """Everything outside the blocks, first: as stored, except a head quantized with ``head_cfg`` (from
    its float weights, before any block changes) and the float16 copy other loaders read. Returns the
    head's manifest record."""
    if head_cfg is None:
        writer.copy_outside_blocks()
        return None
    name, head, tied = head_and_embedding(run.model)
    bias = run.lazy.read(f"{name}.bias").to(run.lazy.dtype) if head.bias is not None else None
    # In its stored dtype: pack_head converts a chunk of rows at a time (no whole float32 copy).
    weight = run.lazy.read(f"{name}.weight")
    if tied:
        check_reproducible(run.model.get_submodule(tied), weight)
    packed = pack_head(weight, bias, head_cfg, layout)
    del weight
    record = head_record(name, head_cfg, tied)
    # The source's float head is never copied: a tied source may store it beside the embedding, and loaders that
    # read ``lm_head.weight`` would run it instead of the packed one.
    writer.copy_outside_blocks(skip={f"{name}.weight", f"{name}.bias"} | ({f"{tied}.weight"} if tied else set()))
    writer.write_tensors(head_file_tensors(record, packed), cast=False)
    return record


MIXED_BITS = (3, 4, 8)
"""The bit widths a mixed-precision run chooses among, at the run's group size, besides 4 bits at group 32."""


def mixed_options(cfg: WeightQuantConfig, allowed_bits: tuple[int, ...] = MIXED_BITS) -> list[LayerOption]:
    """The options mixed precision chooses among: ``MIXED_BITS`` that the output's format holds."""
    options = {LayerOption(bits, cfg.group_size) for bits in (*MIXED_BITS, cfg.bits) if bits in allowed_bits}
    if cfg.group_size == -1 or cfg.group_size > 32:
        options.add(LayerOption(4, 32))
    return sorted(options, key=lambda o: (o.bits, -o.group_size if o.group_size != -1 else -10**9))


def mixed_precision(request: QuantizeRequest, cfg: WeightQuantConfig, run: Loaded,
                    spill_folder: Path | None = None, allowed_bits: tuple[int, ...] = MIXED_BITS,
                    fused: bool = False) -> dict | None:
    """With ``avg_bits``: measure every layer's sensitivity, choose its option within the budget, and
    return the manifest's record of it (which the quantizing pass and a resumed run read). The measuring
    pass carries its activations under the run's budget, spilling beyond it into ``spill_folder``. With
    ``fused``, the layers vLLM fuses into one (q/k/v, gate/up) get one option together."""
    if request.avg_bits is None:
        return None
    options = mixed_options(cfg, allowed_bits)
    request.say(f"measuring each layer's sensitivity to {', '.join(o.label for o in options)} ...")
    try:
        costs = measure_sensitivities(run.source, run.windows, options, grid_option(cfg.sym), request.selection,
                                      run.device, request.progress, spill_folder, request.activation_budget)
    finally:
        if spill_folder is not None:
            shutil.rmtree(spill_folder, ignore_errors=True)
    units = fused_units([c.name for c in costs]) if fused else [[c.name] for c in costs]
    try:
        choice = unfuse(choose_options(fuse(costs, units), request.avg_bits, LayerOption(cfg.bits, cfg.group_size)))
    except UserError as exc:
        if 3 in MIXED_BITS and 3 not in allowed_bits:
            raise UserError(f"{exc} (--format gptq also offers 3-bit layers)") from None
        raise
    achieved = average_bits(costs, choice)
    counts = {o.label: sum(1 for c in choice.values() if c == o) for o in options}
    request.say(f"mixed precision: {achieved:.3f} bits per weight (target {request.avg_bits:g}); layers per "
                 "option: " + ", ".join(f"{label} {n}" for label, n in counts.items()))
    return {
        "target_avg_bits": request.avg_bits,
        "avg_bits": round(achieved, 4),
        "predicted_loss": sum(c.losses[choice[c.name]] for c in costs),
        "measure": "block output mean squared error with the layer alone quantized (RTN, min/max grids)",
        # The sibling layers given one option together (vLLM fuses them), by their names within a block.
        "fused": [list(leaves) for leaves in sorted({tuple(name.rpartition(".")[2] for name in unit)
                                                     for unit in units if len(unit) > 1})],
        "layers": {c.name: {"option": dataclasses.asdict(choice[c.name]),
                            "sensitivity": {o.label: loss for o, loss in c.losses.items()}} for c in costs},
    }


PACK_WIDTH = 32
"""Both formats pack codes into int32 words along the input features, and zero points along the output
features: both must be multiples of 32."""


def check_packable(model, selection, head: bool = False) -> list[LayerWidth]:
    """One-line error, on the skeleton before any calibration, for a selected layer (or, with ``head``, the
    output head) that cannot be packed; the selected layers' input widths otherwise."""
    from compress.select import block_linears, find_blocks

    prefix, blocks = find_blocks(model)
    widths = []
    for name, linear in block_linears(blocks[0], selection).items():  # the blocks are alike
        for what, size in (("input", linear.in_features), ("output", linear.out_features)):
            if size % PACK_WIDTH:
                raise UserError(f"{name} has {size} {what} features, not a multiple of {PACK_WIDTH}: neither format "
                                f"can pack it; leave it in float with --exclude '{name}'")
        widths.append(LayerWidth(f"{prefix}.0.{name}", linear.in_features))
    if head:
        name, linear, _ = head_and_embedding(model)
        for what, size in (("a vocabulary", linear.out_features), ("a hidden size", linear.in_features)):
            if size % PACK_WIDTH:
                raise UserError(f"--lm-head-bits: the head ({name}) has {what} of {size}, not a multiple of "
                                f"{PACK_WIDTH}, so neither format can pack it: drop --lm-head-bits to keep the "
                                "head in float")
    return widths


def linear_names(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


@dataclass
class Planned:
    """What quantize settles on the model's skeleton, before any work: the method's config with the group size
    the format takes, and every linear layer's name (a compressed-tensors config lists those left in float)."""
    cfg: WeightQuantConfig
    format: CheckpointFormat | None = None
    linears: list[str] = field(default_factory=list)


def plan_on_skeleton(request: QuantizeRequest, planned: Planned, head_bits: int | None) -> Callable:
    """The output folder's tag, made from the skeleton once the format is chosen for the settings and the widths (a
    default group size that does not divide them steps down, said aloud)."""
    def settle(model) -> str:
        cfg = planned.cfg
        widths = check_packable(model, request.selection, head_bits is not None)
        choice = choose_format(request.format, cfg, widths, request.group_size is not None, head_bits)
        if choice.note:
            request.say(choice.note)
        if choice.group_size != cfg.group_size:
            misfit = first_misfit(cfg.group_size, widths)
            request.say(f"group size {choice.group_size}: {cfg.group_size} does not divide the {misfit.in_features} "
                        f"input features of {misfit.name}, and --format {choice.format.name} needs groups that "
                        "divide every width")
            cfg = dataclasses.replace(cfg, group_size=choice.group_size)
        planned.cfg, planned.format, planned.linears = cfg, choice.format, linear_names(model)
        return run_tag(request, cfg)
    return settle


def run_tag(request: QuantizeRequest, cfg: WeightQuantConfig) -> str:
    head_cfg = request.head_config()
    tag = cfg.tag + (f"-head{head_cfg.bits}" if head_cfg else "")
    if request.avg_bits is not None:
        tag += f"-avg{request.avg_bits:g}"
    return tag


def checkpoint_config(fmt: CheckpointFormat, cfg: WeightQuantConfig, method: str, record: QuantizeProgress,
                      overrides: dict, linears: list[str]) -> dict:
    """config.json's quantization_config for the output's format."""
    stats = record.stats
    if fmt.name == "gptq":
        return gptq_quantization_config(cfg, method, __version__, stats.block_prefix,
                                        [layer.shape[1] for layer in stats.layers], record.head, overrides)
    options = {layer.name: (overrides[layer.name].bits, overrides[layer.name].group_size) if layer.name in overrides
               else (cfg.bits, cfg.group_size) for layer in stats.layers}
    return compressed_tensors_config(cfg, method, __version__, options, sorted(set(linears) - set(options)),
                                     record.head)


def quantize(request: QuantizeRequest) -> QuantizeResult:
    method, cfg = request.method_config()
    if method.writes_own_checkpoint:
        if request.lm_head_bits is not None:
            raise UserError(f"--lm-head-bits applies to gptq, awq and rtn; {method.name} decides its own head")
        if request.avg_bits is not None:
            raise UserError(f"--avg-bits applies to gptq, awq and rtn; {method.name} has one precision")
        if request.format is not None:
            raise UserError(f"--format applies to gptq, awq and rtn; {method.name} writes its own format")
        return method.quantize_checkpoint(request, cfg)
    if cfg.act_bits is not None and request.avg_bits is not None:
        raise UserError("--avg-bits mixes weight widths; W8A8 (--act-bits) has one: drop one of them")
    head_cfg = request.head_config()
    if cfg.act_bits is not None and head_cfg is not None:
        raise UserError("--lm-head-bits packs the head for float activations; a W8A8 (--act-bits) head is not "
                        "written: drop --lm-head-bits")
    started = time.perf_counter()
    planned = Planned(cfg)
    opened = open_for_run(request, plan_on_skeleton(request, planned, head_cfg.bits if head_cfg else None),
                          method.needs_data(cfg) or request.avg_bits is not None)
    cfg, fmt = planned.cfg, planned.format
    layout = fmt.layout(cfg)
    run = opened.load()
    with run_output(request, run, packed=True, record_kind=QuantizeProgress) as output:
        quant_started = time.perf_counter()
        record = output.record
        if not output.resumed:  # what comes before the blocks, done once: a resumed run reads it from the record
            record.head = write_outside_blocks(run, output.writer, head_cfg, layout)
            record.mixed = mixed_precision(request, cfg, run, output.partial.folder / "activations" / "sensitivity",
                                           fmt.bits, fused=fmt.name == "compressed-tensors")
        overrides = {name: LayerOption(**c["option"]) for name, c in (record.mixed or {}).get("layers", {}).items()}
        quantize_model(run.source, method, cfg, run.windows if method.needs_data(cfg) else None, run.device,
                       request.selection, request.progress, emit=output.writer.write_module,
                       plan=output.driver_plan(), report=output.report, stats=record.stats, overrides=overrides,
                       layout=layout)
        if head_cfg and not run.source.streaming:  # the model in memory gets the head the file has
            quantize_head(run.model, head_cfg, run.lazy.dtype, layout)
        manifest = _manifest(request, method, cfg, run, output, record, time.perf_counter() - quant_started)
        mixed_bits = frozenset(option.bits for option in overrides.values()) if record.mixed else None
        manifest["format"] = {"name": fmt.name,
                              "engines": fmt.engines(cfg, head_cfg.bits if head_cfg else None, mixed_bits,
                                                     run.model.config.model_type)}
        qcfg = checkpoint_config(fmt, cfg, method.name, record, overrides, planned.linears)
        # A compressed-tensors head is packed apart from the embedding's float copy: a loader that tied them would
        # run that copy as the head (vLLM does).
        untie = fmt.name == "compressed-tensors" and bool(record.head and record.head["tied_embedding"])
        folder = output.finish(qcfg, manifest, {"tie_word_embeddings": False} if untie else None)
    return QuantizeResult(folder, manifest["source"]["bytes"], weight_bytes_on_disk(folder),
                          time.perf_counter() - started, peak_rss_bytes(), manifest,
                          None if run.source.streaming else run.model)


def _manifest(request: QuantizeRequest, method, cfg, run: Loaded, output: RunOutput, record: QuantizeProgress,
              seconds: float) -> dict:
    resolved, stats = run.resolved, record.stats
    return {
        "tool": "compress-workbench",
        "method": method.name,
        "config": dataclasses.asdict(cfg),
        "source": {"reference": request.model, "path": str(resolved.path), "origin": resolved.origin,
                   "license": source_license(resolved),
                   "sha256_safetensors": source_hash(resolved.path), "bytes": weight_bytes_on_disk(resolved.path)},
        "calibration": run.calibration.to_dict() if run.calibration else None,
        "selection": {"include": request.include, "exclude": request.exclude},
        "layers": [dataclasses.asdict(layer) for layer in stats.layers],
        # One record per group of layers: AWQ's scales, or SmoothQuant's smoothing (its ratio is the alpha folded).
        ("smoothing" if cfg.act_bits else "awq_scales"): [dataclasses.asdict(s) for s in stats.scalings] or None,
        "mixed_precision": record.mixed,
        "lm_head": record.head,
        "device": str(run.device),
        "timings_s": {"load": round(run.load_seconds, 3), "quantize": round(seconds, 3)},
        "blocks": output.report.blocks,
        "experts": output.experts_record(output.report, "RTN"),
        "peak_rss_bytes": peak_rss_bytes(),
        "environment": environment(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
