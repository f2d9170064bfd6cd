"""Where the layer-by-layer driver gets its blocks from, and where it keeps the activations it carries.

* :class:`BlockSource` hands the driver one block at a time. Streaming, the model is a meta skeleton
  (compress.lazy): the modules that run before the first block are read from the shards for the
  capture and given back after it, and each block is read when its turn comes and given back when it
  is done, so memory does not grow with depth. In memory, everything is already there and nothing is
  read or given back; the loop is the same.
* :class:`Activations` holds the hidden state each calibration window carries into the next block,
  in memory or, when they would not fit, in files (written to the side and swapped in whole, so a
  killed run never leaves a half-updated set behind).
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from compress.lazy import LazyModel, release
from compress.runtime import return_freed_memory
from compress.select import find_blocks
from compress.shards import DTYPE_NAMES, DTYPES, _tensor_bytes


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


class Activations:
    """One hidden-state tensor per calibration window, in memory or in files under ``folder``.

    Built window by window (``add``): kept in memory while the set fits ``budget`` bytes; the window
    that would pass it moves the set to files under ``spill_folder``, so the budget bounds memory
    during the capture too, not only once every window is in."""

    def __init__(self, tensors: list[torch.Tensor], device: torch.device, folder: Path | None = None,
                 budget: int | None = None) -> None:
        self.device = device
        self.count = 0
        self.shape: tuple[int, ...] = ()
        self.dtype = torch.float32
        self.folder: Path | None = None
        self.spill_folder = folder
        self.budget = budget
        self._memory: list[torch.Tensor] | None = []
        self._set = 0
        if folder is not None and budget is None:
            self._spill()  # asked for files from the start
        for t in tensors:
            self.add(t)

    @staticmethod
    def nbytes(count: int, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return count * int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()

    def add(self, tensor: torch.Tensor) -> None:
        """Append one window's state (all windows share a shape and dtype)."""
        if self.count == 0:
            self.shape, self.dtype = tuple(tensor.shape), tensor.dtype
        if (self._memory is not None and self.spill_folder is not None and self.budget is not None
                and self.nbytes(self.count + 1, self.shape, self.dtype) > self.budget):
            self._spill()
        if self._memory is not None:
            self._memory.append(tensor.to(self.device))
        else:
            self._write(self._slot_dir(self._set), self.count, tensor)
        self.count += 1

    append = add  # a list's name, so a capture can fill either

    def _spill(self) -> None:
        """Move the set to files: from here on every window lives on disk."""
        self.folder = self.spill_folder
        target = self._slot_dir(self._set)
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for i, t in enumerate(self._memory or []):
            self._write(target, i, t)
        self._memory = None

    @property
    def on_disk(self) -> bool:
        return self._memory is None

    def _slot_dir(self, which: int) -> Path:
        return self.folder / f"set-{which}"

    def _write(self, folder: Path, i: int, tensor: torch.Tensor) -> None:
        with open(folder / f"{i:06d}.bin", "wb") as f:
            f.write(_tensor_bytes(tensor))

    def _read(self, folder: Path, i: int) -> torch.Tensor:
        data = bytearray((folder / f"{i:06d}.bin").read_bytes())
        return torch.frombuffer(data, dtype=self.dtype).reshape(self.shape).to(self.device)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._memory is not None:
            return self._memory[i]
        return self._read(self._slot_dir(self._set), i)

    def replace_all(self, produce) -> None:
        """Replace every window's state by ``produce(i)`` (which reads only window i's state). In memory
        each is replaced in place, so at most one window is held twice; on disk the old set stays readable
        until the new one is complete."""
        if self._memory is not None:
            for i in range(self.count):
                self._memory[i] = produce(i)
            return
        target = self._slot_dir(1 - self._set)
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for i in range(self.count):
            self._write(target, i, produce(i))
        self._set = 1 - self._set

    # --- resuming ------------------------------------------------------------------------------

    def save(self, folder: Path) -> dict:
        """Copy the current set to ``folder`` (a file per window) and describe it; the copy stays valid
        while later blocks replace the live set."""
        shutil.rmtree(folder, ignore_errors=True)
        if self._memory is not None:
            folder.mkdir(parents=True)
            for i, t in enumerate(self._memory):
                self._write(folder, i, t)
        else:
            shutil.copytree(self._slot_dir(self._set), folder)
        return {"folder": str(folder), "count": self.count, "shape": list(self.shape),
                "dtype": DTYPE_NAMES[self.dtype]}

    @classmethod
    def restore(cls, saved: dict, device: torch.device, folder: Path | None) -> "Activations":
        """The set ``save`` described, in memory (``folder`` None) or in files under ``folder``."""
        where = Path(saved["folder"])
        dtype, shape, count = DTYPES[saved["dtype"]], tuple(saved["shape"]), saved["count"]
        if folder is None:
            return cls([torch.frombuffer(bytearray((where / f"{i:06d}.bin").read_bytes()), dtype=dtype).reshape(shape)
                        for i in range(count)], device)
        store = cls([], device, folder)
        store.count, store.shape, store.dtype = count, shape, dtype
        shutil.rmtree(store._slot_dir(0), ignore_errors=True)
        shutil.copytree(where, store._slot_dir(0))
        return store
