"""The weights of a changed model, written as the run produces them, and for float tensors the source
holds, in the source's dtype. Names: a dense output keeps the source checkpoint's names (transformers
renames and fuses them as it loads, e.g. Mixtral's per-expert w1/w3/w2); in a packed (GPTQ) output the
blocks' tensors carry the model's own module names, where GPTQModel looks for packed layers (the two
differ only for mixture-of-experts blocks: ``mlp.experts.E.gate_proj`` instead of
``block_sparse_moe.experts.E.w1``).

Streaming and in-memory runs write through this one writer in the same order (the tensors outside
the blocks first, then block after block), so both give the same bytes for the same model.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.lazy import LazyModel
from compress.shards import ShardWriter


class CheckpointWriter:
    def __init__(self, lazy: LazyModel, shards: ShardWriter, block_prefix: str, packed: bool = False) -> None:
        self.lazy = lazy
        self.shards = shards
        self.block_prefix = block_prefix
        self.packed = packed

    def _stored(self, memory_name: str, tensor: torch.Tensor, cast: bool,
                own_name: bool = False) -> tuple[str, torch.Tensor]:
        disk = self.lazy.names.disk_name(memory_name)
        if cast and tensor.is_floating_point() and disk in self.lazy.reader:
            tensor = tensor.to(self.lazy.reader.dtype_of(disk))
        return (memory_name if own_name else disk), tensor

    def write_tensors(self, named: dict[str, torch.Tensor], cast: bool = True, own_names: bool = False) -> None:
        """Tensors given by memory name, written under the source's names (or, with ``own_names``, the
        model's); with ``cast`` a float tensor the source holds keeps its dtype."""
        self.shards.add_all(dict(self._stored(name, tensor, cast, own_names) for name, tensor in named.items()))

    def write_module(self, prefix: str, module: nn.Module) -> None:
        """Every persistent tensor of ``module`` (a finished block: packed layers, norms, biases)."""
        self.write_tensors(module.state_dict(prefix=f"{prefix}."), own_names=self.packed)

    def copy_outside_blocks(self, skip: set[str] = frozenset()) -> list[str]:
        """Copy the source's tensors outside the blocks (embeddings, final norm, head) as stored, except
        the memory names in ``skip``; returns the memory names copied."""
        copied = {}
        for disk, memory in self.lazy.names.to_memory.items():
            if memory.startswith(f"{self.block_prefix}.") or memory in skip:
                continue
            copied[disk] = memory
        for disk in sorted(copied):
            self.shards.add(disk, self.lazy.reader.read(disk))
        return sorted(copied.values())
