"""Structured pruning: remove whole MLP channels, attention heads or decoder layers by an importance
score measured on calibration data, and write a smaller dense model (no sparse kernels needed).

Importance (pure functions below):
* an MLP channel or a head matters as much as what it adds to the block's output: for each input
  column j of the consuming layer (down / o projection), ||X_j||_2 * ||W[:, j]||_2 (the Wanda score
  summed over the column), summed over the columns a unit owns. Every block loses the same number of
  units, because a config has one MLP width and one head count;
* a layer matters as much as it changes its input: 1 - mean cosine similarity of the block's input
  and output hidden states (ShortGPT's block influence).

Channels and heads are chosen block by block on the shared driver, so each block is scored on what
the already-pruned blocks before it produce; removing a unit first zeroes its columns (which changes
the output exactly as deleting it will), and the surgery at the end cuts the tensors.
With grouped-query attention the unit is a whole kv group (one kv head and the query heads using it).
"""

from __future__ import annotations

import torch
from torch import nn

from compress.block_inputs import capture_block_inputs
from compress.driver import run_layerwise
from compress.errors import UserError
from compress.prune.apply import PruneStats
from compress.prune.config import StructuredConfig
from compress.prune.surgery import (Cut, attention_layout, cut_state, drop_blocks, mlp_layout, model_shape, rebuild,
                                    resized_config)
from compress.registry import PruneMethod, register_method
from compress.select import ModuleSelection, find_blocks

# --- pure importance math ---------------------------------------------------------------------------


def column_importance(input_sq_norms: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """||X_j|| * ||W[:, j]|| for each input column j of a consuming layer ([in] and [out, in] -> [in])."""
    return input_sq_norms.clamp(min=0).sqrt() * weight.float().norm(dim=0)


def unit_importance(columns: torch.Tensor, unit_width: int) -> torch.Tensor:
    """Sum the column scores of each unit of ``unit_width`` consecutive columns (a head owns head_dim)."""
    return columns.reshape(-1, unit_width).sum(dim=1)


def removal_count(total: int, sparsity: float, unit: str) -> int:
    """round(sparsity * total), refusing a count that would leave nothing."""
    remove = round(sparsity * total)
    if remove >= total:
        raise UserError(f"removing {sparsity:.0%} of {total} {unit} leaves a layer with zero {unit}: choose a "
                        "smaller --sparsity")
    return remove


def kept_units(scores: torch.Tensor, remove: int) -> torch.Tensor:
    """Indices (ascending) of the units that stay: all but the ``remove`` lowest scores."""
    keep = scores.numel() - remove
    return torch.sort(torch.topk(scores.float(), keep).indices).values


def block_influence(hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> float:
    """1 - mean over tokens of cos(input, output): how much a block changes the residual stream."""
    cos = torch.nn.functional.cosine_similarity(hidden_in.float().flatten(0, -2), hidden_out.float().flatten(0, -2),
                                                dim=-1)
    return float(1 - cos.mean())


def expand(units: torch.Tensor, width: int) -> torch.Tensor:
    """Unit indices -> the indices of the ``width`` consecutive columns each unit owns."""
    return (units[:, None] * width + torch.arange(width)[None, :]).flatten()


# --- glue -------------------------------------------------------------------------------------------


@register_method
class Structured(PruneMethod):
    name = "structured"
    config_cls = StructuredConfig
    needs_calibration = True
    summary = "remove whole MLP channels, heads or layers by importance; writes a smaller dense model"
    patterns = ()
    changes_shape = True

    def apply(self, model, cfg: StructuredConfig, windows, device, selection, quant=None, show_progress=True):
        if quant is not None:
            raise UserError("structured pruning writes a smaller dense model: quantize it afterwards with "
                            "`compress quantize OUT_FOLDER`, not with --bits here")
        if selection is not None and (selection.include != ["*"] or selection.exclude):
            raise UserError("structured pruning removes the same units from every block: --include/--exclude do not "
                            "apply to it")
        prefix, blocks = find_blocks(model)
        if cfg.target == "layers":
            return _prune_layers(model, cfg, windows, device, prefix, blocks, show_progress)
        return _prune_units(model, cfg, windows, device, prefix, show_progress)


def _prune_units(model, cfg: StructuredConfig, windows, device, prefix: str, show_progress: bool):
    shape = model_shape(model.config)
    if cfg.target == "mlp":
        layout = mlp_layout(model)
        consumer, producers = layout.output, {name: 1 for name in layout.inputs}
        units, unit_width, unit_name = shape.mlp, 1, "MLP channels"
        stacked = layout.stacked
    else:
        layout = attention_layout(model, windows[0])
        group = shape.heads // shape.kv_heads
        consumer = layout.output
        producers = {layout.query: group, **{name: 1 for name in layout.keys_values}}
        units, unit_width = shape.kv_heads, group * shape.head_dim
        unit_name = "heads" if group == 1 else "kv groups"
        stacked = {}
    remove = removal_count(units, cfg.sparsity, unit_name)
    if cfg.target == "heads":
        kept_heads = (units - remove) * (shape.heads // shape.kv_heads)
        if shape.hidden % kept_heads:
            valid = [f"{1 - k / units:.2f}" for k in range(units - 1, 0, -1)
                     if shape.hidden % (k * shape.heads // units) == 0]
            raise UserError(f"keeping {kept_heads} of {shape.heads} heads is not allowed: transformers requires the "
                            f"hidden size ({shape.hidden}) to be a multiple of the head count; sparsities that work: "
                            f"{', '.join(valid) or 'none'}")
    cuts: dict[int, Cut] = {}
    removed: dict[str, list[int]] = {}

    def score_and_zero(name: str, layer: nn.Linear, hessian: torch.Tensor | None) -> torch.Tensor:
        index = int(name[len(prefix) + 1:].split(".")[0])
        scores = unit_importance(column_importance(torch.diag(hessian), layer.weight.data), unit_width)
        keep = kept_units(scores, remove)
        removed[str(index)] = sorted(set(range(units)) - set(keep.tolist()))
        columns = expand(keep, unit_width)
        # Rows each producer keeps: a query layer owns `group` heads per kv group, k/v and MLP inputs one unit.
        head = 1 if cfg.target == "mlp" else shape.head_dim

        def rows(producer: str, per: int) -> torch.Tensor:
            # A stacked producer's parts each lose the same units: part j's rows start at j x units x width.
            kept = expand(keep, per * head)
            return torch.cat([kept + part * units * per * head for part in range(stacked.get(producer, 1))])
        cuts[index] = Cut({p: rows(p, per) for p, per in producers.items()}, (consumer, columns))
        weight = torch.zeros_like(layer.weight.data)
        weight[:, columns] = layer.weight.data[:, columns]
        return weight

    run_layerwise(model, windows, score_and_zero, ModuleSelection(include=[consumer]), device, lambda *_: None,
                  desc=f"structured {cfg.tag}", show_progress=show_progress)
    state = cut_state(model.state_dict(), prefix, cuts)
    if cfg.target == "mlp":
        config = resized_config(model.config, mlp=shape.mlp - remove)
    else:
        kv_kept = shape.kv_heads - remove
        config = resized_config(model.config, heads=(kv_kept * (shape.heads // shape.kv_heads), kv_kept))
    new = rebuild(model, config, state)
    structure = {"target": cfg.target, "unit": unit_name, "units_before": units, "units_after": units - remove,
                 "removed_per_block": removed, "consumer": consumer, "producers": list(producers)}
    return new, PruneStats(block_prefix=prefix, structure=structure)


@torch.no_grad()
def _prune_layers(model, cfg: StructuredConfig, windows, device, prefix: str, blocks: nn.ModuleList,
                  show_progress: bool):
    from tqdm.auto import tqdm

    remove = removal_count(len(blocks), cfg.sparsity, "layers")
    inputs = capture_block_inputs(model, blocks, windows,
                                  first_block_output=lambda first: first.raw_call(blocks[0], 0)).moved(device)
    influence = []
    for index, block in enumerate(tqdm(blocks, desc=f"structured {cfg.tag}", unit="block",
                                       disable=not show_progress)):
        inputs.use_block(index)
        block.to(device)
        outputs = [inputs.call(block, i) for i in range(len(inputs.hidden))]
        influence.append(sum(block_influence(a, b) for a, b in zip(inputs.hidden, outputs)) / len(outputs))
        inputs.hidden = outputs
        if device.type != "cpu":
            block.to("cpu")
    kept = kept_units(torch.tensor(influence), remove).tolist()
    config = resized_config(model.config, kept_layers=kept)
    new = rebuild(model, config, drop_blocks(model.state_dict(), prefix, kept))
    structure = {"target": "layers", "unit": "layers", "units_before": len(blocks), "units_after": len(kept),
                 "kept_layers": kept, "removed_layers": sorted(set(range(len(blocks))) - set(kept)),
                 "block_influence": [round(x, 6) for x in influence]}
    return new, PruneStats(block_prefix=prefix, structure=structure)
