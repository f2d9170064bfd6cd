"""Which modules a method touches: the repeated blocks of a model, the linear layers inside them,
and include/exclude patterns over module names (shared by every method)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from compress.errors import UserError

if TYPE_CHECKING:  # torch is imported where modules are walked, not by the settings that name them
    from torch import nn


@dataclass
class ModuleSelection:
    include: list[str] = field(default_factory=lambda: ["*"])
    """Glob patterns over module names relative to the block (e.g. 'self_attn.*')."""
    exclude: list[str] = field(default_factory=list)
    """Glob patterns that win over include (e.g. '*.down_proj')."""

    def accepts(self, name: str) -> bool:
        matches = lambda patterns: any(fnmatch.fnmatchcase(name, p) for p in patterns)  # noqa: E731
        return matches(self.include) and not matches(self.exclude)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the ModuleList of identical modules holding the most parameters.

    This finds model.layers (Llama, Mistral), transformer.h (Falcon, GPT-J, BLOOM), transformer.blocks
    (MPT), gpt_neox.layers, model.decoder.layers (OPT) and encoder.layer (BERT) without a table of
    architectures.
    """
    from torch import nn

    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise UserError(f"{type(model).__name__} has no stack of transformer blocks: this method cannot handle it")
    return best[1], best[2]


def block_linears(block: nn.Module, selection: ModuleSelection) -> dict[str, nn.Linear]:
    """The nn.Linear layers of one block (subclasses included) that the selection accepts, in order, gates aside."""
    from torch import nn

    return {name: m for name, m in block.named_modules()
            if isinstance(m, nn.Linear) and not is_gate(m) and selection.accepts(name)}


def is_gate(linear: nn.Linear) -> bool:
    """A linear layer with one output is a gate (Qwen2-MoE's shared_expert_gate scales the whole shared expert): no
    method touches it, as GPTQModel and llm-compressor leave it, and no packed format holds a 1-wide layer."""
    return linear.out_features == 1


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
