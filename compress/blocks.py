"""Where the layer-by-layer driver gets its blocks from.

* :class:`BlockSource` hands the driver one block at a time. Streaming, the model is a meta skeleton
  (compress.lazy): the modules that run before the first block are read from the shards for the
  capture and given back after it, and each block is read when its turn comes and given back when it
  is done, so memory does not grow with depth. In memory, everything is already there and nothing is
  read or given back; the loop is the same.
(The hidden states the driver carries between blocks are compress.activations.)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from compress.lazy import LazyModel, release
from compress.runtime import return_freed_memory
from compress.select import find_blocks


class BlockSource:
    """The blocks of a model, as the driver visits them."""

    def __init__(self, model: nn.Module, lazy: LazyModel | None = None, streaming: bool = False) -> None:
        self.model = model
        self.lazy = lazy
        self.streaming = streaming and lazy is not None
        self.prefix, self.blocks = find_blocks(model)

    @classmethod
    def in_memory(cls, model: nn.Module) -> "BlockSource":
        return cls(model)

    def front_names(self) -> list[str]:
        """Tensors outside the blocks that the capture needs: all but an untied output head's."""
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        head_params = {id(p) for p in head.parameters()} if head is not None else set()
        embedding = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        tied = {id(p) for p in embedding.parameters()} if embedding is not None else set()
        names = []
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            if name.startswith(self.prefix + "."):
                continue
            if id(tensor) in head_params and id(tensor) not in tied:
                continue
            names.append(name)
        return names

    @contextmanager
    def front(self, device: torch.device) -> Iterator[torch.device]:
        """Make the modules before the first block runnable; yields the device they run on."""
        in_blocks = {id(m) for m in self.blocks.modules()}
        front = [m for m in self.model.modules() if id(m) not in in_blocks]
        if not self.streaming:
            # Capture where the blocks will run (so a streaming and an in-memory run compute alike).
            home = next(self.model.parameters()).device
            _tensors_to(front, device)
            try:
                yield device
            finally:
                _tensors_to(front, home)
            return
        names = self.front_names()
        self.lazy.materialize_names(names, device)
        _computed_buffers_to(front, device)
        try:
            yield device
        finally:
            self.lazy.release_names(names)

    def load(self, index: int, device: torch.device) -> nn.Module:
        block = self.blocks[index]
        if self.streaming:
            self.lazy.materialize(block, f"{self.prefix}.{index}", device)
            _computed_buffers_to(list(block.modules()), device)
        else:
            block.to(device)
        return block

    def unload(self, block: nn.Module, device: torch.device) -> None:
        if self.streaming:
            release(block)
            return_freed_memory()
        elif device.type != "cpu":
            block.to("cpu")


def _tensors_to(modules: list[nn.Module], device: torch.device) -> None:
    """Move the modules' own parameters and buffers (not their children's); tied tensors stay one."""
    moved: dict[int, torch.Tensor] = {}
    for module in modules:
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is None or tensor.is_meta or tensor.device == device:
                    continue
                if id(tensor) not in moved:
                    data = tensor.data.to(device)
                    moved[id(tensor)] = nn.Parameter(data, tensor.requires_grad) if isinstance(
                        tensor, nn.Parameter) else data
                store[name] = moved[id(tensor)]


def _computed_buffers_to(modules: list[nn.Module], device: torch.device) -> None:
    """Buffers a module computes for itself (rotary frequencies) are built on the CPU with the skeleton;
    the modules that run on ``device`` need them there."""
    for module in modules:
        for name in module._non_persistent_buffers_set:
            buffer = module._buffers.get(name)
            if buffer is not None and not buffer.is_meta and buffer.device != device:
                module._buffers[name] = buffer.to(device)
