"""Safetensors checkpoints read and written one tensor at a time.

A 7B model does not fit in memory, so neither side ever holds a whole shard:

* :class:`ShardReader` parses the headers of a folder's ``*.safetensors`` files (or the files its
  ``model.safetensors.index.json`` names) and reads a single tensor with one ``pread`` of exactly its
  bytes, into memory this process owns. No file is memory-mapped, so pages read once do not stay
  counted in the process's resident set.
* :class:`ShardWriter` appends each tensor's bytes to the data of the shard being written and frees
  it; a shard is closed (header + data) when the next tensor would pass the size limit. At the end
  the shards get their standard names, ``model-0000K-of-0000N.safetensors`` plus
  ``model.safetensors.index.json`` (or one ``model.safetensors``). Its state is a small dict, so a
  run killed after block k resumes from the bytes already written.

Both follow the format's specification (an 8-byte little-endian header length, a JSON header padded
with spaces to a multiple of 8, then the tensors' bytes back to back), so every safetensors reader
loads what the writer writes, and the same tensors added in the same order give the same bytes.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.errors import UserError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: torch.dtype | None
    """None for a dtype this tool does not read (U32, F8_E8M0...): an error only if the tensor is read."""
    shape: tuple[int, ...]
    start: int
    """Absolute byte offset of the tensor's data in ``file``."""
    nbytes: int
    dtype_name: str = ""


def read_header(file: Path) -> tuple[dict, int]:
    """(header JSON, offset where the data starts) of one safetensors file."""
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise UserError(f"{file} is corrupt or truncated (no safetensors header): re-download or re-create it")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 << 20:
            raise UserError(f"{file} is corrupt (a header of {length} bytes): re-download or re-create it")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{file} is corrupt (its safetensors header is not JSON): re-download or re-create it")
    return header, 8 + length


def weight_files(folder: Path) -> list[Path]:
    """A model folder's safetensors files: the ones its index names when it has one (the index is the
    truth: a ``consolidated.safetensors`` beside it, as Mistral repositories ship, is another copy of
    the same weights), else every ``*.safetensors``. A file the index names but the folder lacks is an
    error."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if not index.is_file():
        return sorted(folder.glob("*.safetensors"))
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, AttributeError):
        raise UserError(f"{index} is not a safetensors index (no weight_map): re-download or re-create it")
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise UserError(f"{folder} lacks {missing[0]}, which {INDEX_NAME} names"
                        f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: download the missing shards")
    return [folder / n for n in names]


class ShardReader:
    """Every tensor of a folder's safetensors files, by name, read on demand."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.entries: dict[str, TensorEntry] = {}
        for file in weight_files(self.folder):
            header, data_start = read_header(file)
            size = file.stat().st_size
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if name in self.entries:
                    raise UserError(f"tensor {name} is in both {self.entries[name].file.name} and {file.name}: keep one "
                                    f"copy of the weights in {self.folder} (or add the {INDEX_NAME} that names which)")
                begin, end = info["data_offsets"]
                dtype = DTYPES.get(info["dtype"])
                shape = tuple(info["shape"])
                needed = torch.Size(shape).numel() * dtype.itemsize if dtype is not None else end - begin
                if end - begin != needed:
                    raise UserError(f"{file}: tensor {name} has {end - begin} bytes, not the {needed} its shape "
                                    f"{list(shape)} and dtype {info['dtype']} need: re-download or re-create it")
                if data_start + end > size:
                    raise UserError(f"{file} is truncated ({name} ends past the end of the file): re-download or "
                                    "re-create it")
                self.entries[name] = TensorEntry(file, dtype, shape, data_start + begin, end - begin, info["dtype"])

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype_of(self, name: str) -> torch.dtype:
        return self.entries[name].dtype

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def nbytes(self, names=None) -> int:
        return sum(self.entries[n].nbytes for n in (self.entries if names is None else names))

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as stored (its own dtype), in fresh CPU memory."""
        entry = self.entries[name]
        if entry.dtype is None:
            raise UserError(f"{entry.file}: tensor {name} has dtype {entry.dtype_name}, which this tool does not read")
        buffer = bytearray(entry.nbytes)
        with open(entry.file, "rb", buffering=0) as f:
            view, done = memoryview(buffer), 0
            while done < entry.nbytes:
                got = os.preadv(f.fileno(), [view[done:]], entry.start + done)
                if got <= 0:
                    raise UserError(f"{entry.file} ended early while reading {name}: re-download or re-create it")
                done += got
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        return torch.frombuffer(buffer, dtype=entry.dtype).reshape(entry.shape)


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _header_bytes(entries: list[tuple[str, torch.dtype, tuple[int, ...], int, int]]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    for name, dtype, shape, begin, end in entries:
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [begin, end]}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(text)) + text


class ShardWriter:
    """Writes tensors into size-limited safetensors shards inside ``folder``, as they come."""

    def __init__(self, folder: Path, max_shard_bytes: int = 2 << 30) -> None:
        if max_shard_bytes <= 0:
            raise ValueError("max_shard_bytes must be positive")
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.closed: list[dict] = []
        """Finished shards: {"file": name, "names": [...], "bytes": n}."""
        self.current: list[tuple[str, torch.dtype, tuple[int, ...], int, int]] = []
        self.current_bytes = 0
        self._seen: set[str] = set()

    # --- state, for resuming -------------------------------------------------------------------

    def state(self) -> dict:
        return {"max_shard_bytes": self.max_shard_bytes, "closed": self.closed,
                "current": [[n, DTYPE_NAMES[d], list(s), b, e] for n, d, s, b, e in self.current],
                "current_bytes": self.current_bytes}

    @classmethod
    def resume(cls, folder: Path, state: dict) -> "ShardWriter":
        """A writer that continues exactly where ``state`` was taken: data written after it is dropped."""
        writer = cls(folder, state["max_shard_bytes"])
        writer.closed = state["closed"]
        writer.current = [(n, DTYPES[d], tuple(s), b, e) for n, d, s, b, e in state["current"]]
        writer.current_bytes = state["current_bytes"]
        writer._seen = {n for s in writer.closed for n in s["names"]} | {entry[0] for entry in writer.current}
        data = writer._data_path()
        closed_later = writer.folder / f".shard-{len(writer.closed) + 1:05d}.safetensors"
        if writer.current_bytes and not data.exists() and closed_later.is_file():
            # The shard was closed after the state was taken: its data starts with the bytes we need.
            _, start = read_header(closed_later)
            with open(closed_later, "rb") as src, open(data, "wb") as dst:
                _copy(src, dst, writer.current_bytes, start)
        if writer.current_bytes:
            if not data.exists() or data.stat().st_size < writer.current_bytes:
                raise UserError(f"the interrupted run in {folder} lost data it recorded: start again without --resume")
            with open(data, "r+b") as f:
                f.truncate(writer.current_bytes)
        elif data.exists():
            data.unlink()
        # Whatever was written after the state (later shards, their data) goes.
        keep = {shard["file"] for shard in writer.closed} | {data.name}
        for path in writer.folder.glob(".shard-*"):
            if path.name not in keep:
                path.unlink()
        published = writer.published_names() if not writer.current else [None] * len(writer.closed)
        for shard, final in zip(writer.closed, published):
            if not (writer.folder / shard["file"]).is_file():
                if final and (writer.folder / final).is_file():  # a failed finish had already renamed it
                    (writer.folder / final).rename(writer.folder / shard["file"])
                    continue
                raise UserError(f"the interrupted run in {folder} lacks {shard['file']}: start again without --resume")
        return writer

    # --- writing -------------------------------------------------------------------------------

    def _data_path(self) -> Path:
        return self.folder / f".shard-{len(self.closed) + 1:05d}.data"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._seen:
            raise ValueError(f"tensor {name} was already written")
        self._seen.add(name)
        data = _tensor_bytes(tensor)
        if self.current and self.current_bytes + len(data) > self.max_shard_bytes:
            self._close_shard()
        with open(self._data_path(), "ab") as f:
            f.write(data)
        begin = self.current_bytes
        self.current_bytes += len(data)
        self.current.append((name, tensor.dtype, tuple(tensor.shape), begin, self.current_bytes))

    def add_all(self, tensors: dict[str, torch.Tensor]) -> None:
        """Add a group of tensors (one block's) in name order, so the result does not depend on dict order."""
        for name in sorted(tensors):
            self.add(name, tensors[name])

    def sync(self) -> None:
        """Make the bytes written so far durable (before recording a resumable state)."""
        data = self._data_path()
        if data.exists():
            with open(data, "rb+") as f:
                os.fsync(f.fileno())

    def _close_shard(self) -> None:
        data = self._data_path()
        name = f".shard-{len(self.closed) + 1:05d}.safetensors"
        with open(self.folder / name, "wb") as out:
            out.write(_header_bytes(self.current))
            if self.current_bytes:
                with open(data, "rb") as src:
                    _copy(src, out, self.current_bytes)
            out.flush()
            os.fsync(out.fileno())
        if data.exists():
            data.unlink()
        self.closed.append({"file": name, "names": [entry[0] for entry in self.current], "bytes": self.current_bytes})
        self.current, self.current_bytes = [], 0

    def close(self) -> None:
        """Close the last shard: every tensor is then in a finished shard, under its hidden name (the
        state taken after this is what a failed ``finish`` resumes from)."""
        if self.current or not self.closed:
            self._close_shard()

    def published_names(self) -> list[str]:
        """The standard names the closed shards take."""
        count = len(self.closed)
        return [SINGLE_NAME] if count == 1 else [f"model-{k:05d}-of-{count:05d}.safetensors"
                                                 for k in range(1, count + 1)]

    def finish(self) -> list[Path]:
        """Close the last shard and give every shard its standard name; writes the index when there are
        several. Returns the weight files. Can be run again after it failed part way: a shard that
        already has its standard name keeps it."""
        self.close()
        count = len(self.closed)
        weight_map, files = {}, []
        for shard, final in zip(self.closed, self.published_names()):
            hidden = self.folder / shard["file"]
            if hidden.exists() or not (self.folder / final).is_file():
                hidden.rename(self.folder / final)
            files.append(self.folder / final)
            weight_map.update({name: final for name in shard["names"]})
        if count > 1:
            index = {"metadata": {"total_size": sum(s["bytes"] for s in self.closed)},
                     "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return files


def _copy(src, dst, length: int, src_start: int = 0) -> None:
    """Append ``length`` bytes of ``src`` from ``src_start`` to ``dst`` (open files), in the kernel where it can."""
    dst.flush()
    out_at = os.lseek(dst.fileno(), 0, os.SEEK_END)
    done = 0
    try:
        while done < length:
            n = os.copy_file_range(src.fileno(), dst.fileno(), length - done, src_start + done, out_at + done)
            if n == 0:
                break
            done += n
    except (AttributeError, OSError):
        pass
    while done < length:
        chunk = os.pread(src.fileno(), min(64 << 20, length - done), src_start + done)
        if not chunk:
            raise OSError("shard data ended early")
        os.pwrite(dst.fileno(), chunk, out_at + done)
        done += len(chunk)
