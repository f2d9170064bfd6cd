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
from typing import TYPE_CHECKING, Callable

from compress.errors import UserError
from compress.hub import hub_reachable

if TYPE_CHECKING:  # windows are tensors; naming and reading text needs no torch
    import torch

DATA_DIR_ENV = "COMPRESS_DATA_DIR"
AS_IS = "the file as it is"
"""The convention of a text used as read (a user's file; every result made before conventions were recorded)."""


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
    convention: str
    """How rows become one text: the same from the hub and from the offline copy (written into results)."""


@dataclass
class TextRecord:
    source: str
    split: str
    origin: str
    sha256: str
    characters: int
    convention: str = AS_IS
    """How the text was made from its rows (the same whatever the origin)."""


@dataclass
class WindowRecord:
    text: TextRecord
    tokens: int
    """Tokens the windows were cut from: the whole text, or the prefix ``rule`` says."""
    seqlen: int
    count: int
    seed: int | None = None
    starts: list[int] = field(default_factory=list)
    rule: str = "the whole text"
    """Which tokens of the text the windows could come from."""
    bos: bool = False
    """Each window starts with the BOS token, before its ``seqlen`` text tokens."""

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


WIKITEXT_CONVENTION = ("WikiText: its non-empty rows (lines), each with its line end as LF, concatenated; the hub's "
                      "rows and the offline file give the same text")


def wikitext_text(rows) -> str:
    """One WikiText text whatever its source. The hub's rows are the raw file's lines, whitespace-only lines as
    empty rows; the offline copy is the raw file with its empty lines removed and CRLF line ends. The text both
    can give is the non-empty lines in order, LF-terminated. (GPTQ's `"\n\n".join(rows)` needs the empty rows,
    which the offline copy has lost: it cannot be made from both, and two texts under one label would make
    perplexities that disagree by source.)"""
    lines = (row.replace("\r\n", "\n") for row in rows)
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines if line.strip())


def _hub_wikitext(split: str) -> str:
    from datasets import load_dataset

    return wikitext_text(load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])


def _read_wikitext(path: Path) -> str:
    return wikitext_text(path.read_bytes().decode("utf-8").splitlines(keepends=True))


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
                _read_wikitext, WIKITEXT_CONVENTION),
    NamedSource("c4", "validation", _hub_c4, lambda d, split: d / "c4" / f"c4-{split}.jsonl", _read_jsonl,
                "C4: documents joined with a blank line"),
    NamedSource("sst2", "train", _hub_sst2, lambda d, split: d / "sst2" / f"{split}.tsv", _read_tsv,
                "SST-2: sentences joined with a blank line"),
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
    hub_error = "no hub here"
    if hub_reachable():
        try:
            text = named.hub(split)
            return text, _record(name, split, "hub", text, named.convention)
        except Exception as exc:  # a missing split, a hub error: try the offline copy next, and say why
            first_line = (str(exc).splitlines() or [""])[0][:120]
            hub_error = f"the hub did not give it ({type(exc).__name__}: {first_line})"
    data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir:
        local = named.local(Path(data_dir), split)
        if local.is_file():
            text = named.reader(local)
            return text, _record(name, split, f"local:{local}", text, named.convention)
    raise UserError(f"text source {name}:{split} is not available: {hub_error} and no offline copy "
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


def _record(source: str, split: str, origin: str, text: str, convention: str = AS_IS) -> TextRecord:
    return TextRecord(source, split, origin, hashlib.sha256(text.encode("utf-8")).hexdigest(), len(text), convention)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D id tensor, without special tokens (labelled so in every result)."""
    import torch

    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


CALIBRATION_POOL = 4
"""Calibration windows are drawn from the text's first CALIBRATION_POOL x nsamples x seqlen tokens: the rule
depends only on the request, so the windows do not change when text is added at the end of a corpus, and a
large corpus (67k SST-2 sentences) is not tokenized whole to cut 128 windows."""
PREFIX_MARGIN = 64
"""Tokens tokenized beyond those used, so the last one used is the whole text's (a cut can split a token)."""
CHARACTERS_PER_TOKEN = 4
"""First guess of the characters a prefix needs per token; doubled until the prefix has enough."""


def tokenize_prefix(tokenizer, text: str, tokens: int | None) -> torch.Tensor:
    """The first ``tokens`` ids of the whole text's tokenization (all of them when the text has fewer, or
    ``tokens`` is None), tokenizing only a prefix: cut at a line end, grown until it holds ``tokens`` plus a
    margin. A cut at a line end keeps the ids before it the whole text's for the tokenizers we read (their
    pre-tokenizers split there); the margin covers a token that spans the cut."""
    if tokens is None:
        return tokenize(tokenizer, text)
    characters = (tokens + PREFIX_MARGIN) * CHARACTERS_PER_TOKEN
    while True:
        end = text.find("\n", characters)
        if end == -1 or characters >= len(text):
            return tokenize(tokenizer, text)[:tokens]
        ids = tokenize(tokenizer, text[:end + 1])
        if ids.numel() >= tokens + PREFIX_MARGIN:
            return ids[:tokens]
        characters *= 2


def leading_bos(tokenizer) -> int | None:
    """The BOS id the tokenizer puts before a text it encodes (Llama-2, Mistral, Gemma), or None (GPT-2-style
    tokenizers such as SmolLM2's): the convention the model was trained in, which calibration and scoring follow."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    return bos if tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos] else None


def calibration_windows_of_text(tokenizer, text: str, record: TextRecord, nsamples: int, seqlen: int,
                                seed: int) -> tuple[list[torch.Tensor], WindowRecord]:
    """``calibration_windows`` over the pool of CALIBRATION_POOL x nsamples x seqlen tokens from the start, in the
    tokenizer's convention: where it puts BOS before a text, each window is BOS and seqlen - 1 text tokens (a model
    trained always to see BOS first, such as Gemma, parks attention on it; without it the first positions'
    activations are unlike any the model meets in use)."""
    import torch

    bos = leading_bos(tokenizer) if seqlen > 1 else None
    text_tokens = seqlen - (bos is not None)
    pool = CALIBRATION_POOL * max(nsamples, 1) * max(seqlen, 1)
    windows, window_record = calibration_windows(tokenize_prefix(tokenizer, text, pool), record, nsamples,
                                                 text_tokens, seed)
    window_record.rule = f"random starts within the first {CALIBRATION_POOL} x nsamples x seqlen = {pool} tokens"
    if bos is not None:
        windows = [torch.cat([torch.tensor([bos], dtype=w.dtype), w]) for w in windows]
        window_record.bos = True
    return windows, window_record


def eval_windows_of_text(tokenizer, text: str, record: TextRecord, seqlen: int,
                         max_windows: int | None = None) -> tuple[list[torch.Tensor], WindowRecord]:
    """``eval_windows`` tokenizing only the windows' text (the whole text when every window is asked for)."""
    needed = None if max_windows is None or seqlen <= 0 else max_windows * seqlen
    windows, window_record = eval_windows(tokenize_prefix(tokenizer, text, needed), record, seqlen, max_windows)
    if needed is not None:
        window_record.rule = f"the first max_windows x seqlen = {needed} tokens"
    return windows, window_record


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
