"""The hidden states the block-by-block driver carries from one block to the next, one tensor per
calibration window: in memory, or, when they would pass the activation budget, in files (a new set is
written beside the old one and swapped in whole, so a killed run never leaves a half-updated set), and
saved beside a checkpoint so that --resume restores exactly what the interrupted run carried."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from compress.shards import DTYPE_NAMES, DTYPES, _tensor_bytes


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
        return count * int(torch.Size(shape).numel()) * dtype.itemsize

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
        return self.spill_folder / f"set-{which}"

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

    def replacing(self) -> "Replacement":
        """The next set of states, put window by window (each made from window i's current state alone) and made
        current by ``commit``. In memory each is replaced in place, so at most one window is held twice; on disk
        the current set stays readable until the new one is complete."""
        return Replacement(self)

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


class Replacement:
    """The set of states a block makes from the current one (see ``Activations.replacing``)."""

    def __init__(self, store: Activations) -> None:
        self.store = store
        self.target = None if store._memory is not None else store._slot_dir(1 - store._set)
        if self.target is not None:
            shutil.rmtree(self.target, ignore_errors=True)
            self.target.mkdir(parents=True)

    def put(self, i: int, state: torch.Tensor) -> None:
        if self.target is None:
            self.store._memory[i] = state
        else:
            self.store._write(self.target, i, state)

    def commit(self) -> None:
        if self.target is not None:
            self.store._set = 1 - self.store._set
