"""Model surgery for structured pruning: find which linear layers of a block play which role, cut the
kept rows/columns out of the weights, give the config its new shape, and rebuild the model from that
config so the result is an ordinary smaller dense model that ``from_pretrained`` loads.

Roles are found from the config's widths and one forward pass (which layers read the same input),
not from layer names: the MLP's output projection is the one linear that maps the MLP width back to
the hidden size; the attention's q, k and v are the group of three layers that read the same input
and produce heads x head_dim and kv_heads x head_dim features; o is the next layer, reading the heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from compress.block_inputs import capture_block_inputs, linear_call_groups
from compress.errors import UserError
from compress.moe import is_expert_list, is_fused_experts
from compress.select import ModuleSelection, block_linears, find_blocks

MLP_WIDTH_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")
"""Config fields that hold the MLP width, by the names the seed architectures use."""
# (MPT's expansion_ratio is not one: transformers' MPT always builds a 4 x hidden MLP.)


@dataclass
class Shape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int | None


def model_shape(config) -> Shape:
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = config.to_dict().get("head_dim") or hidden // heads
    return Shape(hidden, heads, kv_heads, head_dim, mlp_width(config))


def mlp_width(config) -> int | None:
    values = config.to_dict()
    for key in MLP_WIDTH_KEYS:
        if isinstance(values.get(key), int):
            return values[key]
    if "n_inner" in values:  # GPT-J: None means 4 x hidden
        return 4 * config.hidden_size
    return None


@dataclass
class MLPLayout:
    inputs: list[str]
    """Layers producing the MLP channels (gate and up, or fc1): their rows are cut."""
    output: str
    """The layer reading the MLP channels (down, fc2): its columns are cut."""
    stacked: dict[str, int] = field(default_factory=dict)
    """Inputs that hold several producers stacked (Phi-3's gate_up_proj: gate rows, then up rows) -> how many: a
    channel is cut from each part alike."""


@dataclass
class AttentionLayout:
    query: str
    keys_values: list[str]
    output: str


def mlp_layout(model: nn.Module) -> MLPLayout:
    shape = model_shape(model.config)
    kind = model.config.model_type
    if shape.mlp is None:
        raise UserError(f"{kind}'s config has no MLP width setting (its MLP is always a fixed multiple of the hidden "
                        "size), so MLP channels cannot be removed: use --target layers for this model")
    if shape.mlp == shape.hidden:
        raise UserError(f"{kind}'s MLP is as wide as its hidden size ({shape.hidden}), so its layers cannot be told "
                        "apart by shape: MLP channels cannot be removed from this model")
    _, blocks = find_blocks(model)
    if any(is_expert_list(module) or is_fused_experts(module) for module in blocks[0].modules()):
        raise UserError(f"{kind}'s MLPs are mixtures of experts, whose channels are each expert's own: MLP channels "
                        "cannot be removed from this model; use --target layers")
    linears = block_linears(blocks[0], ModuleSelection())
    outputs = [n for n, m in linears.items() if (m.in_features, m.out_features) == (shape.mlp, shape.hidden)]
    # Producers beside the output projection where there are any (Phi-3's fused qkv_proj is as wide as its MLP, in
    # another module), else anywhere in the block (BERT's intermediate and output are modules of their own).
    parent = outputs[0].rpartition(".")[0] if len(outputs) == 1 else None
    siblings = {n: m for n, m in linears.items() if n.rpartition(".")[0] == parent and n not in outputs}
    candidates = siblings or linears
    inputs = [n for n, m in candidates.items() if (m.in_features, m.out_features) == (shape.hidden, shape.mlp)]
    # A fused gate and up projection, twice the MLP width (Phi-3), where no single-width producer exists.
    fused = [n for n, m in candidates.items() if (m.in_features, m.out_features) == (shape.hidden, 2 * shape.mlp)]
    if len(outputs) != 1 or not (inputs or fused):
        raise UserError(f"could not find the MLP of {kind}'s blocks (one {shape.mlp}->{shape.hidden} layer fed by "
                        f"{shape.hidden}->{shape.mlp} layers): MLP channels cannot be removed from this model")
    if inputs:
        return MLPLayout(inputs, outputs[0])
    return MLPLayout(fused, outputs[0], {name: 2 for name in fused})


def attention_layout(model: nn.Module, window: torch.Tensor) -> AttentionLayout:
    config = model.config
    kind = config.model_type
    if "head_dim" not in config.to_dict():
        raise UserError(f"{kind}'s config derives the head size from hidden_size / num_attention_heads, so a model "
                        "with fewer heads cannot be described by it: use --target mlp or layers for this model")
    shape = model_shape(config)
    _, blocks = find_blocks(model)
    linears = block_linears(blocks[0], ModuleSelection())
    groups = linear_call_groups(blocks[0], linears, capture_block_inputs(model, blocks, [window]))
    q_width, kv_width = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    for i, group in enumerate(groups[:-1]):
        outs = sorted((linears[n].out_features for n in group), reverse=True)
        after = groups[i + 1]
        if len(group) == 3 and outs == [q_width, kv_width, kv_width] and len(after) == 1 \
                and linears[after[0]].in_features == q_width:
            # With as many kv heads as heads all three are alike and are cut alike, so any may be "query".
            query = next(n for n in group if linears[n].out_features == q_width)
            return AttentionLayout(query, [n for n in group if n != query], after[0])
    raise UserError(f"could not find separate q, k, v and output projections in {kind}'s blocks (fused "
                    "projections are not supported): heads cannot be removed from this model")


def _take(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    return tensor.index_select(dim, index.to(tensor.device)).contiguous()


@dataclass
class Cut:
    """Per block: which rows of the producing layers and columns of the consuming layer stay."""
    producers: dict[str, torch.Tensor] = field(default_factory=dict)
    consumer: tuple[str, torch.Tensor] | None = None


def cut_state(state: dict[str, torch.Tensor], prefix: str, cuts: dict[int, Cut]) -> dict[str, torch.Tensor]:
    """The state dict with rows/columns removed as the cuts say (weights and biases of the layers)."""
    state = dict(state)
    for index, cut in cuts.items():
        for layer, rows in cut.producers.items():
            for part in ("weight", "bias"):
                key = f"{prefix}.{index}.{layer}.{part}"
                if key in state:
                    state[key] = _take(state[key], 0, rows)
        if cut.consumer is not None:
            layer, cols = cut.consumer
            key = f"{prefix}.{index}.{layer}.weight"
            state[key] = _take(state[key], 1, cols)
    return state


def drop_blocks(state: dict[str, torch.Tensor], prefix: str, kept: list[int]) -> dict[str, torch.Tensor]:
    """The state dict without the removed blocks, the kept ones renumbered 0..k-1."""
    renumber = {old: new for new, old in enumerate(kept)}
    out = {}
    for key, tensor in state.items():
        if key.startswith(prefix + "."):
            index, _, rest = key[len(prefix) + 1:].partition(".")
            if int(index) not in renumber:
                continue
            key = f"{prefix}.{renumber[int(index)]}.{rest}"
        out[key] = tensor
    return out


def resized_config(config, *, mlp: int | None = None, heads: tuple[int, int] | None = None,
                   kept_layers: list[int] | None = None):
    """A copy of ``config`` with a new MLP width, (heads, kv heads) or subset of layers."""
    try:
        return _resized(config, mlp, heads, kept_layers)
    except (ValueError, TypeError) as exc:  # the config class's own validation
        raise UserError(f"{config.model_type}'s config refuses the pruned shape ({str(exc).splitlines()[-1].strip()}): "
                        "choose another --sparsity or --target")


def _resized(config, mlp, heads, kept_layers):
    new = config.__class__.from_dict(config.to_dict())
    if mlp is not None:
        values = config.to_dict()
        for key in (k for k in MLP_WIDTH_KEYS if k in values):
            setattr(new, key, mlp)
    if heads is not None:
        new.num_attention_heads = heads[0]
        if hasattr(config, "num_key_value_heads"):
            new.num_key_value_heads = heads[1]
    if kept_layers is not None:
        per_layer = getattr(config, "layer_types", None)
        new.num_hidden_layers = len(kept_layers)
        if isinstance(per_layer, list) and len(per_layer) == config.num_hidden_layers:
            new.layer_types = [per_layer[i] for i in kept_layers]
    return new


def rebuild(model: nn.Module, config, state: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh model of the same class from ``config``, holding ``state``; refuses if they disagree."""
    dtype = next(model.parameters()).dtype
    torch.manual_seed(0)  # every tensor is overwritten below; this only keeps the throwaway init quiet
    try:
        new = type(model)(config)
    except (ValueError, TypeError) as exc:  # the config class's own validation
        raise UserError(f"{config.model_type}'s config refuses the pruned shape ({str(exc).splitlines()[-1].strip()}): "
                        "choose another --sparsity or --target")
    expected = {k: tuple(v.shape) for k, v in new.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state.items()}
    if expected != given:
        wrong = sorted(k for k in expected.keys() | given.keys() if expected.get(k) != given.get(k))
        raise UserError(f"{config.model_type}'s config cannot describe the pruned shape (first mismatch: {wrong[0]} "
                        f"{given.get(wrong[0])} vs {expected.get(wrong[0])}): this architecture cannot be pruned "
                        "this way")
    new.load_state_dict(state, strict=True)
    new.to(dtype)
    if hasattr(new, "tie_weights"):
        new.tie_weights()
    new.eval()
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = model.generation_config
    return new
