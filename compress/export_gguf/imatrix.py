"""llama.cpp's importance matrix: per linear layer, the sum of each input column's squares over the calibration
tokens and how many tokens that was (per expert for a stacked expert tensor).

The file is what `llama-imatrix` writes (GGUF, ``general.type = imatrix``): for every weight named as in the model's
GGUF file, ``NAME.in_sum2`` (float32, one row of column sums per matrix) and ``NAME.counts`` (float32, one count per
matrix), with the datasets, chunk count and chunk size as metadata. llama.cpp's quantizer divides the sums by the
counts and weighs each column's rounding error by that mean square, the statistic our weighted scale search uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMATRIX_TYPE = "imatrix"
DATASETS_KEY = "imatrix.datasets"
CHUNK_COUNT_KEY = "imatrix.chunk_count"
CHUNK_SIZE_KEY = "imatrix.chunk_size"


@dataclass
class ImatrixEntry:
    """One weight's statistics: ``sums[m, j]`` the sum of input column j's squares over the ``counts[m]`` tokens
    that reached matrix m (one matrix, or one per expert of a stacked tensor)."""

    sums: np.ndarray
    counts: np.ndarray

    def mean_squares(self) -> np.ndarray:
        """What llama.cpp's quantizer weighs columns by, flat: sums over counts; a matrix no token reached gets 1
        (no preference), as llama.cpp reads a partial entry."""
        counts = self.counts.reshape(-1, 1).astype(np.float64)
        means = np.where(counts > 0, self.sums / np.maximum(counts, 1), 1.0)
        return means.astype(np.float32).reshape(-1)


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry]
    datasets: list[str]
    chunk_count: int
    chunk_size: int


def entry_from_hessian(hessian, tokens: int) -> ImatrixEntry:
    """A layer's entry from the driver's Hessian, H = 2/n sum(x x^T) over its n tokens: the column sums of squares
    are n/2 times H's diagonal."""
    diagonal = hessian.diagonal().double().cpu().numpy()
    return ImatrixEntry((diagonal * tokens / 2).astype(np.float32).reshape(1, -1), np.array([tokens], np.float32))


def stacked(entries: list[ImatrixEntry]) -> ImatrixEntry:
    """A block's experts of one kind as llama.cpp stacks them: one row of sums and one count per expert."""
    return ImatrixEntry(np.concatenate([e.sums for e in entries]), np.concatenate([e.counts for e in entries]))


def write_imatrix(path: Path, imatrix: Imatrix, written_by: str) -> None:
    """``imatrix`` in llama.cpp's GGUF imatrix format (entries in name order, as llama-imatrix writes them)."""
    import gguf

    writer = gguf.GGUFWriter(path, IMATRIX_TYPE)
    writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix's files name no architecture
    writer.add_type(IMATRIX_TYPE)
    writer.add_array(DATASETS_KEY, imatrix.datasets)
    writer.add_uint32(CHUNK_COUNT_KEY, imatrix.chunk_count)
    writer.add_uint32(CHUNK_SIZE_KEY, imatrix.chunk_size)
    writer.add_string("general.quantized_by", written_by)  # what --force checks before replacing a file
    for name in sorted(imatrix.entries):
        entry = imatrix.entries[name]
        writer.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(entry.sums, np.float32))
        writer.add_tensor(f"{name}.counts", np.ascontiguousarray(entry.counts.reshape(-1, 1), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_imatrix(path: Path) -> Imatrix:
    """An imatrix file (ours or llama-imatrix's GGUF one) back."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    sums, counts = {}, {}
    for tensor in reader.tensors:
        name, _, kind = tensor.name.rpartition(".")
        data = np.array(tensor.data, np.float32).reshape(-1, int(tensor.shape[0]))
        (sums if kind == "in_sum2" else counts if kind == "counts" else {})[name] = data
    if set(sums) != set(counts):
        raise ValueError(f"{path}: sums and counts do not pair up ({sorted(set(sums) ^ set(counts))[:3]})")

    def field(key):
        found = reader.fields.get(key)
        return None if found is None else found.contents()

    return Imatrix({name: ImatrixEntry(sums[name], counts[name].reshape(-1)) for name in sums},
                   list(field(DATASETS_KEY) or []), int(field(CHUNK_COUNT_KEY) or 0), int(field(CHUNK_SIZE_KEY) or 0))


def llama_cpp_imatrix(imatrix: Imatrix):
    """The null-terminated ``llama_model_imatrix_data`` array that ``llama_model_quantize_params.imatrix`` takes
    (what llama-quantize builds from a file), with the buffers it points into (keep them alive while it runs)."""
    import ctypes

    import llama_cpp

    names = sorted(imatrix.entries)
    values = [imatrix.entries[name].mean_squares() for name in names]
    array = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
    for slot, name, data in zip(array, names, values):
        slot.name = name.encode()
        slot.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        slot.size = data.size
    return array, values
