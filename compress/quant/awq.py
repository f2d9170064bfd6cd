"""AWQ (Lin et al., 2024): activation-aware per-channel scales, folded into the model before quantizing.

A weight column that a large activation multiplies matters more to the layer's output than the others.
AWQ multiplies such columns by s > 1 before quantizing (their relative rounding error shrinks) and
divides the input by s, which costs nothing at inference when the division is folded into whatever
produced the input: a norm's weight (and bias), or the rows of a preceding linear (v_proj before o_proj,
up_proj before down_proj). The saved model is an ordinary model with changed weights.

Per group of layers sharing one input (q/k/v, gate/up, ...) the scales are
``s = x_mean^r / w_mean^(1-r)`` normalised so that max * min = 1, with ``r`` searched on a grid
(``n_grid`` points in [0, 1)) as AutoAWQ, llm-compressor and GPTQModel do (``duo_scaling``). What the
search minimises is the squared error of the group's own outputs on the calibration inputs (up to
SEARCH_TOKENS tokens spread over every window) when its layers are quantized with the scales: AutoAWQ
measures a whole attention or MLP module instead, which on a CPU costs a forward pass of the module per
candidate, where ours costs one matrix product per layer. No scaling is a candidate too, so the search
never makes that error worse than plain quantization.

The producer of a group's input is found by trying, not from a table of architectures: a module of
the block with a per-channel weight of the right length (a norm) or a linear with as many outputs as
the group has inputs is a producer when dividing it by random positive scales and multiplying the
group's columns by the same scales leaves the block's output unchanged. A group without one (GPT-NeoX's
fused attention output, o_proj under grouped-query attention) is quantized without scales.

The math (scales from statistics, folding, the search loop) is here as pure functions; the driver
glue is ``awq_prepare_block``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from compress.block_inputs import BlockInputs, for_each_layer_call
from compress.quant.config import N_GRID, WeightQuantConfig
from compress.quant.rtn import rtn_quantize

FOLD_TOLERANCE = 1e-4
"""Largest relative change of the block's output for a fold to count as exact (float32 rounding only)."""


@dataclass
class GroupScaling:
    """What AWQ did to one group of layers: the producer it folded into and the ratio chosen."""

    layers: list[str]
    producer: str | None
    ratio: float | None
    """None: no scaling (no producer, or no candidate beat plain quantization)."""
    loss_plain: float | None = None
    loss_scaled: float | None = None
    fold: str | None = None
    """How the scales went into the producer where it is not plain (``1 + weight``, ``rows 128:256``)."""
    unscaled_because: str | None = None
    """Why the group was left unscaled, where it was."""


def weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Per input channel: the mean over the group's layers and rows of |w| / max|w| of its group."""
    total = None
    rows = 0
    for w in weights:
        w = w.detach().float().abs()
        out_features, in_features = w.shape
        step = in_features if group_size == -1 else group_size
        normalised = torch.empty_like(w)
        for start in range(0, in_features, step):
            block = w[:, start:start + step]
            normalised[:, start:start + step] = block / block.amax(dim=1, keepdim=True).clamp(min=1e-12)
        summed = normalised.sum(dim=0)
        total = summed if total is None else total + summed
        rows += out_features
    return total / rows


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, ratio: float) -> torch.Tensor:
    """AWQ's scales for one ratio, normalised so that max * min = 1."""
    scales = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    scales = scales / (scales.max() * scales.min()).sqrt()
    return torch.where(torch.isfinite(scales), scales, torch.ones_like(scales))


def fake_quantize_weight(weight: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """``weight`` [out, in] quantized with min/max grids per group and dequantized (AWQ's search quantizer):
    round-to-nearest itself, so the search and the sensitivity pass round as ``--method rtn`` does."""
    return rtn_quantize(weight, WeightQuantConfig(bits, group_size, sym)).dequantize()


def search_ratio(loss: Callable[[torch.Tensor | None], float], x_mean: torch.Tensor, w_mean: torch.Tensor,
                 n_grid: int = N_GRID) -> tuple[float | None, torch.Tensor | None, float, float]:
    """(best ratio or None, its scales or None, plain loss, best loss) over the grid; ``loss(scales)``
    measures the output error with the group quantized under ``scales`` (None: unscaled)."""
    plain = best = loss(None)
    best_ratio, best_scales = None, None
    for i in range(n_grid):
        ratio = i / n_grid
        scales = candidate_scales(x_mean, w_mean, ratio)
        value = loss(scales)
        if value < best:
            best, best_ratio, best_scales = value, ratio, scales
    return best_ratio, best_scales, plain, best


# --- folding --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Producer:
    """A module whose output channels are (a part of) the group's input, and how scales fold into it."""
    name: str
    rows: tuple[int, int] | None = None
    """The rows of a fused linear that make the input (Phi-3's gate_up_proj: its up half feeds down_proj)."""
    offset: float = 0.0
    """A norm that scales by ``offset + weight`` (Gemma's 1 + weight): the weight becomes (offset + w) / s - offset."""

    @property
    def fold_note(self) -> str | None:
        if self.rows is not None:
            return f"rows {self.rows[0]}:{self.rows[1]}"
        return f"{self.offset:g} + weight" if self.offset else None


def producer_candidates(block: nn.Module, group_layers: dict[str, nn.Linear]) -> dict[str, nn.Module]:
    """Modules of ``block`` whose output channels could be the group's input channels (or twice as many: a fused
    pair of projections, one half of which feeds the group)."""
    width = next(iter(group_layers.values())).in_features
    members = set(group_layers.values())
    found = {}
    for name, module in block.named_modules():
        if module in members or not name:
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or isinstance(weight, nn.UninitializedParameter):
            continue
        if isinstance(module, nn.Linear):
            if module.out_features in (width, 2 * width):
                found[name] = module
        elif weight.dim() == 1 and weight.numel() == width and not list(module.children()):
            found[name] = module
    return found


def fold_options(name: str, module: nn.Module, width: int) -> list[Producer]:
    """The ways scales could fold into a candidate, plain first; the probe in ``find_producer`` keeps the exact one."""
    if isinstance(module, nn.Linear):
        if module.out_features == width:
            return [Producer(name)]
        return [Producer(name, rows=(0, width)), Producer(name, rows=(width, 2 * width))]
    return [Producer(name), Producer(name, offset=1.0)]


def scale_producer(module: nn.Module, scales: torch.Tensor, producer: Producer | None = None) -> None:
    """Divide the producer's output channels by ``scales``: a norm's weight (and bias), a linear's rows (or the part
    of its rows that feeds the group)."""
    producer = producer or Producer("")
    s = scales.to(module.weight.device)
    weight = module.weight.data.float()
    if weight.dim() == 1:
        module.weight.data = ((producer.offset + weight) / s - producer.offset).to(module.weight.dtype)
    else:
        start, end = producer.rows or (0, weight.shape[0])
        weight[start:end] /= s[:, None]
        module.weight.data = weight.to(module.weight.dtype)
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        values = bias.data.float()
        start, end = producer.rows or (0, values.shape[0])
        values[start:end] /= s
        module.bias.data = values.to(bias.dtype)


def scale_columns(layers: list[nn.Linear], scales: torch.Tensor) -> None:
    for layer in layers:
        layer.weight.data = (layer.weight.data.float() * scales.to(layer.weight.device)).to(layer.weight.dtype)


def fold(module: nn.Module, layers: list[nn.Linear], scales: torch.Tensor, producer: Producer | None = None) -> None:
    """Move ``scales`` from the group's input onto its weights: the function the block computes is unchanged."""
    scale_producer(module, scales, producer)
    scale_columns(layers, scales)


def snapshot(modules: list[nn.Module]) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in m.named_parameters(recurse=False)} for m in modules]


def restore(modules: list[nn.Module], saved: list[dict[str, torch.Tensor]]) -> None:
    for module, params in zip(modules, saved):
        for name, value in params.items():
            getattr(module, name).data = value


def find_producer(block: nn.Module, group_layers: dict[str, nn.Linear], run_block: Callable[[], torch.Tensor],
                  seed: int = 0) -> Producer | None:
    """The module whose output the group reads, and the fold that is exact there: tried with a random scale on the
    block's output, so a fold that changes what the block computes is never taken."""
    reference = run_block()
    layers = list(group_layers.values())
    width = layers[0].in_features
    g = torch.Generator().manual_seed(seed)
    probe = torch.empty(width).uniform_(0.5, 2.0, generator=g)
    for name, module in producer_candidates(block, group_layers).items():
        for option in fold_options(name, module, width):
            saved = snapshot([module, *layers])
            fold(module, layers, probe, option)
            changed = run_block()
            restore([module, *layers], saved)
            gap = (changed.float() - reference.float()).abs().max() / reference.float().abs().max().clamp(min=1e-12)
            if gap < FOLD_TOLERANCE:
                return option
    return None


NO_PRODUCER = ("no module of the block produces its input alone (its input is computed after the last weight that "
               "could take the scales, as under grouped-query attention, or shared with layers outside the group)")
"""Why a group without an exact producer is left unscaled."""


# --- the per-block pre-step ------------------------------------------------------------------------

SEARCH_TOKENS = 4096
"""Calibration tokens (spread evenly over all windows) on which each candidate's output error is
measured; the activation means use every token."""


@dataclass
class GroupInputs:
    abs_mean: torch.Tensor
    """Mean |x| per input channel over every calibration token."""
    abs_max: torch.Tensor
    """Largest |x| per input channel over every calibration token (SmoothQuant's statistic)."""
    sample: torch.Tensor
    """[tokens, in_features]: up to SEARCH_TOKENS of the inputs, every stride-th token of each window."""


def group_inputs(block: nn.Module, first: nn.Linear, inputs: BlockInputs, max_tokens: int = SEARCH_TOKENS) -> GroupInputs:
    """What the search needs of the input the group shares, in one pass over the windows."""
    total, top, count, kept = None, None, 0, []
    windows = len(inputs.hidden)
    stride = None

    def add(x: torch.Tensor, _out) -> None:
        nonlocal total, top, count, stride
        x = x.reshape(-1, x.shape[-1]).float()
        total = x.abs().sum(dim=0) if total is None else total + x.abs().sum(dim=0)
        top = x.abs().amax(dim=0) if top is None else torch.maximum(top, x.abs().amax(dim=0))
        count += x.shape[0]
        if stride is None:
            stride = max(1, -(-x.shape[0] * windows // max_tokens))
        kept.append(x[::stride].clone())

    for_each_layer_call(block, first, inputs, add)
    return GroupInputs(total / max(count, 1), top, torch.cat(kept)[:max_tokens])


def output_error(x: torch.Tensor, weights: list[torch.Tensor], quantized: list[torch.Tensor]) -> float:
    """Mean squared error of the layers' outputs on ``x`` when ``weights`` become ``quantized``."""
    total = 0.0
    for w, q in zip(weights, quantized):
        total += float((x @ (w.float() - q).t()).square().mean())
    return total


Choice = tuple[float | None, torch.Tensor | None, float | None, float | None]
"""(ratio, scales or None for none, the group's loss unscaled, its loss scaled), as ``search_ratio`` gives them."""
Chooser = Callable[[list[str], list[torch.Tensor], "GroupInputs"], Choice]
"""Picks a group's scales from its layers' names (in the block), weights and inputs."""


@torch.no_grad()
def fold_groups(block_name: str, block: nn.Module, linears: dict[str, nn.Linear], groups: list[list[str]],
                inputs: BlockInputs, choose: Chooser, skip: set[str] = frozenset()) -> list[GroupScaling]:
    """For each group of ``block`` in call order, before any layer is quantized: find its producer, let ``choose``
    pick channel scales from the group's weights and inputs, and fold them. Groups without an exact producer, or
    holding a layer of ``skip`` (experts: each sees its own tokens), are left alone. What AWQ and SmoothQuant share;
    they differ in ``choose``."""
    records = []
    for group in groups:
        members = {name: linears[name] for name in group}
        layers = list(members.values())
        qualified = [f"{block_name}.{name}" for name in group]
        if skip & set(group):
            records.append(GroupScaling(qualified, None, None, unscaled_because="experts: each sees only the tokens "
                                                                                "routed to it"))
            continue
        producer = find_producer(block, members, lambda: inputs.call(block, 0))
        if producer is None:
            records.append(GroupScaling(qualified, None, None, unscaled_because=NO_PRODUCER))
            continue
        seen = group_inputs(block, layers[0], inputs)
        ratio, scales, plain, best = choose(group, [layer.weight.data for layer in layers], seen)
        if scales is not None:
            fold(block.get_submodule(producer.name), layers, scales, producer)
        records.append(GroupScaling(qualified, f"{block_name}.{producer.name}", ratio, plain, best, producer.fold_note,
                                    None if scales is not None else "no scaling beat plain quantization"))
        del seen
    return records


def awq_prepare_block(block_name: str, block: nn.Module, linears: dict[str, nn.Linear], groups: list[list[str]],
                      inputs: BlockInputs, bits: int, group_size: int, sym: bool, skip: set[str] = frozenset(),
                      n_grid: int = N_GRID,
                      fake_quantize: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> list[GroupScaling]:
    """Search and fold AWQ scales for each group of ``block``; ``fake_quantize(name, weight)`` rounds a layer as it
    will be stored (default: round-to-nearest on the ``bits``/``group_size``/``sym`` grid)."""
    quantize = fake_quantize or (lambda _name, w: fake_quantize_weight(w, bits, group_size, sym))

    def choose(names: list[str], weights: list[torch.Tensor], seen: GroupInputs) -> Choice:
        device = weights[0].device
        x = seen.sample.to(device)

        def loss(scales: torch.Tensor | None) -> float:
            quantized = []
            for name, w in zip(names, weights):
                if scales is None:
                    quantized.append(quantize(name, w))
                else:
                    quantized.append(quantize(name, w.float() * scales) / scales)
            return output_error(x, weights, quantized)

        return search_ratio(loss, seen.abs_mean.to(device), weight_mean(weights, group_size).to(device), n_grid)

    return fold_groups(block_name, block, linears, groups, inputs, choose, skip)
