"""The ONE layer-by-layer driver shared by every method that changes blocks (RTN, GPTQ, magnitude,
Wanda, SparseGPT, structured scoring), streaming or in memory.

Memory stays at one block: the inputs of the first block are captured once (the model runs only
up to it), then each block in turn is loaded on the device (read from the shards when streaming),
observed, changed, handed to ``finish_block`` (which packs and writes it), run forward once more
with its changed weights to produce the next block's inputs, and given back.

Inside a block the linear layers are processed in groups, in the order the forward pass calls them
(q/k/v together, then o, then gate/up, then down for a Llama): a group is the run of layers that
read the same input tensor. Each group is observed after the groups before it were changed, so it
sees the inputs the quantized model will really give it ("true sequential"). The groups come from
watching one forward pass, not from a table of architectures.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.activations import Activations
from compress.block_inputs import BlockInputs, accumulate_hessian, capture_block_inputs, linear_call_groups
from compress.blocks import BlockSource
from compress.shards import DTYPES
from compress.errors import UserError
from compress.limits import DEFAULT_ACTIVATION_BUDGET
from compress.moe import expert_groups
from compress.runtime import current_rss_bytes
from compress.select import ModuleSelection, block_linears


LayerFn = Callable[[str, nn.Linear, "torch.Tensor | None"], "torch.Tensor | None"]
"""(qualified name, layer, hessian or None) -> the layer's new (dequantized) weight; without data (no
Hessian) it may return None when ``finish_block`` replaces the layer anyway."""

PrepareFn = Callable[[str, nn.Module, "dict[str, nn.Linear]", "list[list[str]]", BlockInputs, "set[str]"], None]
"""(block name, block, its selected linears, their call groups, the block's inputs, names of expert layers):
runs once per block, with data, before any of its layers is observed; it may change the block's float
weights without changing its function (AWQ folds its scales here)."""


@dataclass(frozen=True)
class DriverPlan:
    """What a run asks of the driver: where to start (resuming), where carried activations go when they
    would not fit in memory, how experts too few tokens reach are handled, and what to call after each
    block (to checkpoint it)."""

    start: int = 0
    """First block to process; the blocks before it were done by an earlier, interrupted run."""
    saved_hidden: dict | None = None
    """With ``start`` > 0: the hidden states that run carried out of block ``start - 1`` (Activations.save)."""
    spill_folder: Path | None = None
    activation_budget: int = DEFAULT_ACTIVATION_BUDGET
    block_done: Callable[[int, "Activations | None"], None] | None = None
    """(index of the block just finished, the states carried out of it) after it was handed over."""
    expert_min_fraction: float = 0.005
    """An expert that fewer than this fraction of the calibration tokens reach (at least 1 token) gets no
    Hessian: the method's data-free rule applies to it instead (RTN, magnitude), as in GPTQModel."""


@dataclass
class DriverReport:
    """What the driver measured while it ran (filled as it goes, so an interrupted run's report holds
    the blocks it finished)."""

    blocks: list[dict] = field(default_factory=list)
    """Per block processed: its index, seconds and the process's RSS after it."""
    experts: dict[str, dict] = field(default_factory=dict)
    """Expert layer -> tokens that reached it and whether the data-free rule applied."""
    expert_min_tokens: int | None = None
    """The token count below which an expert was handled data-free."""


def _first_block_output(source: BlockSource, first: BlockInputs, device: torch.device):
    """What the first block returns for window 0 (its shape tells the capture's stand-ins what to return)."""
    block = source.load(0, device)
    try:
        return first.moved(device).raw_call(block, 0)
    finally:
        source.unload(block, device)


class _Dropped:
    """Where a resumed run's capture puts the first block's states: nowhere (they come from its files)."""

    def append(self, _tensor) -> None:
        pass


def _restored(plan: DriverPlan, device: torch.device) -> Activations:
    saved = plan.saved_hidden
    size = Activations.nbytes(saved["count"], tuple(saved["shape"]), DTYPES[saved["dtype"]])
    spill = plan.spill_folder is not None and size > plan.activation_budget
    return Activations.restore(saved, device, plan.spill_folder if spill else None)


@torch.no_grad()
def run_layerwise(source: "BlockSource | nn.Module", windows: list[torch.Tensor] | None, layer_fn: LayerFn,
                  selection: ModuleSelection, device: torch.device, finish_block: Callable[[str, nn.Module], None],
                  desc: str, show_progress: bool = True, plan: DriverPlan | None = None,
                  report: DriverReport | None = None, prepare_block: PrepareFn | None = None,
                  observe: bool = True) -> str:
    """Visit every selected linear layer block by block, as ``plan`` says, recording into ``report``;
    returns the blocks' module path.

    ``source`` gives the blocks (a model in memory, or a streaming BlockSource). ``layer_fn`` returns
    the new weight for a layer; it is written into the layer at once so later groups and the next
    block see the changed model. ``finish_block`` is called when a block is done (to pack its layers
    and write them out). With ``windows`` None no data is observed and ``layer_fn`` gets no Hessian;
    with data, ``prepare_block`` sees each block first. With ``observe`` False the windows are carried
    through the blocks for ``prepare_block`` only: no Hessian is made and no layer is changed (a
    measuring pass).
    """
    source = source if isinstance(source, BlockSource) else BlockSource.in_memory(source)
    plan = plan or DriverPlan()
    report = report if report is not None else DriverReport()
    prefix, blocks = source.prefix, source.blocks
    if not any(block_linears(block, selection) for block in blocks):
        # Checked before any calibration work, for every method that uses this driver.
        raise UserError(f"no linear layer in the model's blocks matches --include {selection.include} / "
                        f"--exclude {selection.exclude}: widen the patterns")
    inputs = None
    if windows is not None and plan.start < len(blocks):  # a resumed run with every block done captures nothing
        carried = Activations([], device, plan.spill_folder, budget=plan.activation_budget) \
            if plan.saved_hidden is None else None
        with source.front(device) as front_device:
            inputs = capture_block_inputs(source.model, blocks, windows, front_device,
                                          first_block_output=lambda first: _first_block_output(source, first, device),
                                          hidden=carried if carried is not None else _Dropped())
        inputs = inputs.moved(device)
        inputs.hidden = carried if carried is not None else _restored(plan, device)
    tokens = sum(w.numel() for w in windows) if windows is not None else 0
    expert_min_tokens = report.expert_min_tokens = max(1, math.ceil(plan.expert_min_fraction * tokens))
    bar = tqdm(total=len(blocks), initial=plan.start, desc=desc, unit="block", disable=not show_progress,
               dynamic_ncols=True)
    try:
        for index in range(plan.start, len(blocks)):
            started = time.perf_counter()
            block_name = f"{prefix}.{index}"
            block = source.load(index, device)
            if inputs is not None:
                inputs.use_block(index)
            linears = block_linears(block, selection)
            if inputs is None:
                for name, layer in linears.items():
                    new_weight = layer_fn(f"{block_name}.{name}", layer, None)
                    if new_weight is not None:  # nothing runs the block again: a method may skip making it
                        layer.weight.data = new_weight.to(layer.weight.dtype)
            else:
                experts = {n for groups in expert_groups(block, set(linears)).values() for g in groups for n in g}
                groups = linear_call_groups(block, linears, inputs)
                if prepare_block is not None:
                    bar.set_postfix_str("preparing")
                    prepare_block(block_name, block, linears, groups, inputs, experts)
                for group in groups if observe else []:
                    bar.set_postfix_str(",".join(n.rsplit(".", 1)[-1] for n in group))
                    acc = accumulate_hessian(block, linears, group, inputs)
                    hessian = acc.h
                    if group[0] in experts:
                        starved = acc.n < expert_min_tokens
                        hessian = None if starved else hessian
                        for name in group:
                            report.experts[f"{block_name}.{name}"] = {"tokens": acc.n, "data_free": starved}
                    for name in group:
                        layer = linears[name]
                        layer.weight.data = layer_fn(f"{block_name}.{name}", layer, hessian).to(layer.weight.dtype)
                    del hessian, acc
                replacement = inputs.hidden.replacing()
                for i in range(len(inputs.hidden)):
                    replacement.put(i, inputs.call(block, i))
                replacement.commit()
            finish_block(block_name, block)
            source.unload(block, device)
            seconds = time.perf_counter() - started
            report.blocks.append({"index": index, "seconds": round(seconds, 3), "rss_bytes": current_rss_bytes()})
            if plan.block_done is not None:
                plan.block_done(index, inputs.hidden if inputs is not None else None)
            if tokens:
                bar.set_postfix_str(f"{tokens / seconds:,.0f} tok/s")
            bar.update(1)
    finally:
        bar.close()
    return prefix
