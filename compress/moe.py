"""Mixture-of-experts blocks with one linear layer per expert, so every method sees experts as layers.

transformers 5 keeps a Mixtral block's experts fused, as two 3-D parameters (all experts' gate+up and all
experts' down projections), and fuses the per-expert tensors of a checkpoint (``block_sparse_moe.experts.E.
w1/w3/w2``) while loading. :func:`unfuse_experts` puts one ``nn.Linear`` per expert matrix in place of the
fused module, with the same forward computation, so an expert is calibrated, quantized, pruned, packed,
written and loaded like any other layer. The layers are named as GPTQModel (through its Defuser) names them,
``mlp.experts.E.gate_proj/up_proj/down_proj``: that is where GPTQModel looks for a quantized expert.
Float checkpoints are read through :data:`CHECKPOINT_NAMES`. Each expert sees only the tokens routed to it;
the driver (compress.driver) counts them and applies the stated rule to experts that receive too few.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from compress.errors import UserError


class ExpertMLP(nn.Module):
    """One expert: down_proj(act(gate_proj x) * up_proj x)."""

    def __init__(self, hidden: int, intermediate: int, act_fn, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, dtype=dtype, device=device)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UnfusedExperts(nn.ModuleList):
    """Drop-in for a fused experts module: the same routing arithmetic, a list of ExpertMLP."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = torch.nn.functional.one_hot(top_k_index, num_classes=len(self)).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert in hit[:, 0].tolist():
            top_k_pos, token_idx = torch.where(mask[expert])
            out = self[expert](hidden_states[token_idx]) * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


# Fused experts modules this module knows how to unfuse (by class name): the same layout and call in both (Qwen2-MoE's
# shared expert is an ordinary MLP beside them, its scalar gate a linear layer left in float: compress.select).
FUSED_EXPERTS = {"MixtralExperts", "Qwen2MoeExperts"}
# model_type -> the per-expert names its float checkpoints use for (gate_proj, up_proj, down_proj).
CHECKPOINT_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}
EXPERT_LAYERS = ("gate_proj", "up_proj", "down_proj")


def is_expert_list(module: nn.Module) -> bool:
    """A list of per-expert MLPs: ours (UnfusedExperts), or GPTQModel's Defuser's, which replaces
    transformers' Mixtral block in any process that imported GPTQModel."""
    return isinstance(module, nn.ModuleList) and len(module) > 0 and all(
        all(hasattr(expert, name) for name in EXPERT_LAYERS) for expert in module)


def checkpoint_renames(model: nn.Module) -> list[tuple[re.Pattern, str]]:
    """(pattern, replacement) pairs that turn a float checkpoint's per-expert names into the model's
    names, for a model whose experts are one layer each."""
    theirs = CHECKPOINT_EXPERT_NAMES.get(getattr(getattr(model, "config", None), "model_type", None))
    if theirs is None or not any(is_expert_list(m) for m in model.modules()):
        return []
    return [(re.compile(rf"\.experts\.(\d+)\.{old}\."), rf".experts.\1.{new}.")
            for new, old in zip(EXPERT_LAYERS, theirs)]


def is_fused_experts(module: nn.Module) -> bool:
    return isinstance(getattr(module, "gate_up_proj", None), nn.Parameter) and \
        isinstance(getattr(module, "down_proj", None), nn.Parameter) and getattr(module, "gate_up_proj").dim() == 3


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module by UnfusedExperts (in place); a module on meta stays on meta,
    a loaded one has its tensors split. Returns how many were replaced."""
    from compress.select import set_submodule

    fused = [(name, m) for name, m in model.named_modules() if is_fused_experts(m)]
    for name, module in fused:
        kind = type(module).__name__
        if kind not in FUSED_EXPERTS:
            raise UserError(f"{type(model).__name__} has mixture-of-experts layers ({kind}) this tool cannot split "
                            "into experts yet: Mixtral and Qwen2-MoE are supported")
        gate_up, down = module.gate_up_proj, module.down_proj
        experts, two_i, hidden = gate_up.shape
        device = "meta" if gate_up.is_meta else gate_up.device
        replacement = UnfusedExperts(
            [ExpertMLP(hidden, two_i // 2, module.act_fn, gate_up.dtype, device) for _ in range(experts)])
        if not gate_up.is_meta:
            with torch.no_grad():
                for e, expert in enumerate(replacement):
                    gate, up = gate_up[e].chunk(2, dim=0)
                    expert.gate_proj.weight.copy_(gate)
                    expert.up_proj.weight.copy_(up)
                    expert.down_proj.weight.copy_(down[e])
        set_submodule(model, name, replacement)
    return len(fused)


def expert_groups(block: nn.Module, names: set[str]) -> dict[str, list[list[str]]]:
    """For each UnfusedExperts module of ``block`` (by its name in the block): the groups of its layers
    among ``names``, in call order: each expert's gate and up projections (they read the same tokens),
    then its down projection."""
    found = {}
    for path, module in block.named_modules():
        if is_expert_list(module):
            groups = []
            for e in range(len(module)):
                first = [n for n in (f"{path}.{e}.gate_proj", f"{path}.{e}.up_proj") if n in names]
                second = [n for n in (f"{path}.{e}.down_proj",) if n in names]
                groups += [g for g in (first, second) if g]
            found[path] = groups
    return found
