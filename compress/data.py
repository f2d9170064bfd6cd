"""Calibration and evaluation text -> token windows.

A text source is ``NAME[:SPLIT]`` from the table below, or a local file (.txt/.raw plain text,
.jsonl with a "text" field, .tsv with a "text" column). Named sources come from the ``datasets`` hub
when it is reachable and otherwise from offline copies under ``$COMPRESS_DATA_DIR`` (the layout of
the project's shared data folder). Everything that decides the windows is recorded.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from compress.errors import UserError
from compress.hub import hub_reachable

DATA_DIR_ENV = "COMPRESS_DATA_DIR"


@dataclass(frozen=True)
class NamedSource:
    name: str
    default_split: str
    hub: Callable[[str], str]
    """split -> text, from the datasets hub."""
    local: Callable[[Path, str], Path]
    """(data dir, split) -> path of the offline copy."""
    reader: Callable[[Path], str]
    """path -> text."""


@dataclass
class TextRecord:
    source: str
    split: str
    origin: str
    sha256: str
    characters: int


@dataclass
class WindowRecord:
    text: TextRecord
    tokens: int
    seqlen: int
    count: int
    seed: int | None = None
    starts: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _read_plain(path: Path) -> str:
    # Bytes as they are (no newline translation), so the recorded hash is the file's own.
    return path.read_bytes().decode("utf-8")


def _read_tsv(path: Path) -> str:
    with path.open(encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if "text" not in (rows.fieldnames or []):
            raise UserError(f"{path} has no 'text' column (columns: {rows.fieldnames}): add a header row with 'text'")
        return "\n\n".join(row["text"] for row in rows)


def _read_jsonl(path: Path) -> str:
    texts = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"{path}:{number} is not a JSON object with a 'text' field: fix that line")
    return "\n\n".join(texts)


_READERS = {".txt": _read_plain, ".raw": _read_plain, ".tsv": _read_tsv, ".jsonl": _read_jsonl}


def _hub_wikitext(split: str) -> str:
    from datasets import load_dataset

    rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    return "\n\n".join(rows)


def _hub_c4(split: str) -> str:
    from datasets import load_dataset

    files = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
    rows = load_dataset("allenai/c4", data_files={split: files[split]}, split=split)["text"]
    return "\n\n".join(rows)


def _hub_sst2(split: str) -> str:
    from datasets import load_dataset

    rows = load_dataset("glue", "sst2", split={"dev": "validation"}.get(split, split))["sentence"]
    return "\n\n".join(rows)


SOURCES: dict[str, NamedSource] = {s.name: s for s in [
    NamedSource("wikitext2", "test", _hub_wikitext,
                lambda d, split: d / "wikitext-2-raw" / f"wiki.{ {'validation': 'valid'}.get(split, split) }.raw",
                _read_plain),
    NamedSource("c4", "validation", _hub_c4, lambda d, split: d / "c4" / f"c4-{split}.jsonl", _read_jsonl),
    NamedSource("sst2", "train", _hub_sst2, lambda d, split: d / "sst2" / f"{split}.tsv", _read_tsv),
]}

# Calibration must not come from the evaluation text: WikiText-2 train when it can be had, else
# SST-2 train sentences (real English from another domain, shipped offline).
AUTO_CALIBRATION = ("wikitext2:train", "sst2:train")


def load_text(source: str) -> tuple[str, TextRecord]:
    """Text of ``NAME[:SPLIT]`` or of a local file, with a record of where it came from."""
    path = Path(source).expanduser()
    if path.suffix in _READERS and not source.split(":")[0] in SOURCES:
        if not path.is_file():
            raise UserError(f"text file {source} does not exist: check the path")
        text = _READERS[path.suffix](path)
        return text, _record(str(path), "file", f"file:{path.resolve()}", text)
    name, _, split = source.partition(":")
    if name not in SOURCES:
        raise UserError(f"unknown text source '{source}': use one of {', '.join(SOURCES)} (optionally NAME:SPLIT), "
                        f"or a .txt/.raw/.jsonl/.tsv file")
    named = SOURCES[name]
    split = split or named.default_split
    if hub_reachable():
        try:
            text = named.hub(split)
            return text, _record(name, split, "hub", text)
        except Exception:  # unreachable hub, missing split: try the offline copy next
            pass
    data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir:
        local = named.local(Path(data_dir), split)
        if local.is_file():
            text = named.reader(local)
            return text, _record(name, split, f"local:{local}", text)
    raise UserError(f"text source {name}:{split} is not available: no hub here and no offline copy "
                    f"(set {DATA_DIR_ENV} to a folder with {named.local(Path('<dir>'), split).relative_to('<dir>')}, "
                    "or pass a text file)")


def _hub_sst2_labelled(split: str) -> list[tuple[str, int]]:
    from datasets import load_dataset

    rows = load_dataset("glue", "sst2", split={"dev": "validation"}.get(split, split))
    return list(zip(rows["sentence"], rows["label"]))


def _read_labelled_tsv(path: Path) -> list[tuple[str, int]]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if not {"text", "label"} <= set(rows.fieldnames or []):
            raise UserError(f"{path} needs 'text' and 'label' columns (has {rows.fieldnames})")
        return [(row["text"], int(row["label"])) for row in rows]


# Labelled task data: (hub loader, offline path under the data dir).
TASKS = {"sst2": (_hub_sst2_labelled, lambda d, split: d / "sst2" / f"{split}.tsv")}


def load_labelled(source: str) -> tuple[list[tuple[str, int]], TextRecord]:
    """(text, label) rows of a task split such as ``sst2:dev`` (hub first, then $COMPRESS_DATA_DIR), or
    of a .tsv file with 'text' and 'label' columns."""
    path = Path(source).expanduser()
    if path.suffix == ".tsv" and source.split(":")[0] not in TASKS:
        if not path.is_file():
            raise UserError(f"task file {source} does not exist: check the path")
        rows = _read_labelled_tsv(path)
        if not rows:
            raise UserError(f"task file {source} has no rows")
        return rows, _record(str(path), "file", f"file:{path.resolve()}",
                             "\n".join(f"{label}\t{text}" for text, label in rows))
    name, _, split = source.partition(":")
    if name not in TASKS:
        raise UserError(f"unknown labelled task '{source}': use one of {', '.join(TASKS)} as NAME:SPLIT")
    split = split or "dev"
    hub, local = TASKS[name]
    rows = None
    origin = "hub"
    if hub_reachable():
        try:
            rows = hub(split)
        except Exception:  # unreachable hub or missing split: the offline copy next
            rows = None
    if rows is None:
        data_dir = os.environ.get(DATA_DIR_ENV)
        path = local(Path(data_dir), split) if data_dir else None
        if path is None or not path.is_file():
            raise UserError(f"task data {name}:{split} is not available: no hub here and no offline copy "
                            f"(set {DATA_DIR_ENV} to a folder with {local(Path('<dir>'), split).relative_to('<dir>')})")
        rows, origin = _read_labelled_tsv(path), f"local:{path}"
    if not rows:
        raise UserError(f"task data {name}:{split} is empty")
    joined = "\n".join(f"{label}\t{text}" for text, label in rows)
    return rows, _record(name, split, origin, joined)


def load_calibration_text(source: str) -> tuple[str, TextRecord]:
    if source != "auto":
        return load_text(source)
    for candidate in AUTO_CALIBRATION:
        try:
            return load_text(candidate)
        except UserError:
            continue
    raise UserError(f"no calibration text is available ({' or '.join(AUTO_CALIBRATION)}): set {DATA_DIR_ENV} "
                    "or pass --calib FILE")


def _record(source: str, split: str, origin: str, text: str) -> TextRecord:
    return TextRecord(source, split, origin, hashlib.sha256(text.encode("utf-8")).hexdigest(), len(text))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D id tensor, without special tokens (labelled so in every result)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(ids: torch.Tensor, record: TextRecord, nsamples: int, seqlen: int,
                        seed: int) -> tuple[list[torch.Tensor], WindowRecord]:
    """GPTQ-style: ``nsamples`` windows of ``seqlen`` tokens at random starts drawn with ``seed``."""
    if nsamples <= 0 or seqlen <= 0:
        raise UserError(f"nsamples ({nsamples}) and seqlen ({seqlen}) must be positive")
    if ids.numel() <= seqlen:
        raise UserError(f"calibration text {record.source} has {ids.numel()} tokens, fewer than seqlen {seqlen}: "
                        "use a longer text or a smaller --seqlen")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    windows = [ids[s:s + seqlen].clone() for s in starts]
    return windows, WindowRecord(record, ids.numel(), seqlen, nsamples, seed, starts)


def eval_windows(ids: torch.Tensor, record: TextRecord, seqlen: int,
                 max_windows: int | None = None) -> tuple[list[torch.Tensor], WindowRecord]:
    """Non-overlapping windows of ``seqlen`` tokens from the start; the remainder is dropped."""
    count = ids.numel() // seqlen
    if count == 0:
        raise UserError(f"evaluation text {record.source} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        count = min(count, max_windows)
    windows = [ids[i * seqlen:(i + 1) * seqlen].clone() for i in range(count)]
    return windows, WindowRecord(record, ids.numel(), seqlen, count, None, [i * seqlen for i in range(count)])
