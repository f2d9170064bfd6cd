"""Where each task's examples come from: lm-eval's own task config, with its data source overridden to an
offline copy under ``$COMPRESS_DATA_DIR/tasks/`` when that folder holds the task, else the hub as lm-eval's
config says.

An offline copy is the evaluation split as released; it is converted once into the fields of the hub
dataset lm-eval's config reads (cached by the source files' checksum), and lm-eval runs its own config
(prompts, choices, targets, metrics) on it through an ``include`` of that config that changes only the
dataset. Where a copy is not the hub's data (HellaSwag here is llama.cpp's derived text), the result says so.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from compress.errors import UserError

DATA_DIR_ENV = "COMPRESS_DATA_DIR"


def _jsonl(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _lambada(folder: Path) -> Iterator[dict]:
    yield from _jsonl(folder / "lambada_test.jsonl")  # the hub's rows: {"text": ...}


def _arc(file_name: str) -> Callable[[Path], Iterator[dict]]:
    def convert(folder: Path) -> Iterator[dict]:
        for row in _jsonl(folder / file_name):
            choices = row["question"]["choices"]
            yield {"id": row["id"], "question": row["question"]["stem"],
                   "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
                   "answerKey": row["answerKey"]}
    return convert


def _piqa(folder: Path) -> Iterator[dict]:
    labels = (folder / "valid-labels.lst").read_text().split()
    for row, label in zip(_jsonl(folder / "valid.jsonl"), labels, strict=True):
        yield {"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"], "label": int(label)}


def _winogrande(folder: Path) -> Iterator[dict]:
    for row in _jsonl(folder / "dev.jsonl"):  # the hub's fields; answer "1"/"2"
        yield {k: row[k] for k in ("sentence", "option1", "option2", "answer")}


def _boolq(folder: Path) -> Iterator[dict]:
    for index, row in enumerate(_jsonl(folder / "dev.jsonl")):
        yield {"question": row["question"], "passage": row["passage"], "idx": index, "label": int(row["answer"])}


def _hellaswag(folder: Path) -> Iterator[dict]:
    """llama.cpp's derived file: per task the preprocessed context, the gold label, the 4 endings."""
    lines = bz2.decompress((folder / "hellaswag_val_full.txt.bz2").read_bytes()).decode("utf-8").split("\n")
    for at in range(0, len(lines) - 5, 6):
        yield {"query": lines[at], "label": lines[at + 1].strip(), "choices": lines[at + 2:at + 6]}


@dataclass(frozen=True)
class OfflineTask:
    name: str
    """lm-eval's task name."""
    folder: str
    """Its folder under $COMPRESS_DATA_DIR/tasks/."""
    split: str
    """The split key of lm-eval's config the rows fill (test or validation)."""
    convert: Callable[[Path], Iterator[dict]]
    overrides: dict | None = None
    """Config keys besides the data source (where the offline rows already are what process_docs makes)."""
    note: str | None = None


OFFLINE_TASKS: dict[str, OfflineTask] = {t.name: t for t in [
    OfflineTask("lambada_openai", "lambada_openai", "test", _lambada),
    OfflineTask("arc_easy", "arc_easy", "test", _arc("ARC-Easy-Test.jsonl")),
    OfflineTask("arc_challenge", "arc_challenge", "test", _arc("ARC-Challenge-Test.jsonl")),
    OfflineTask("piqa", "piqa", "validation", _piqa),
    OfflineTask("winogrande", "winogrande", "validation", _winogrande),
    OfflineTask("boolq", "boolq", "validation", _boolq),
    OfflineTask("hellaswag", "hellaswag", "validation", _hellaswag, overrides={"process_docs": None},
                note="HellaSwag from llama.cpp's derived text (ctx_b not capitalized, only some [tags] removed): "
                     "comparable across variants, not lm-eval's exact number"),
]}


@dataclass(frozen=True)
class TaskSource:
    name: str
    spec: str
    """What lm-eval's task manager loads: the task name (hub) or our override YAML's path (offline)."""
    source: str
    """'hub' or 'local:<folder>'."""
    note: str | None = None

    def to_dict(self) -> dict:
        return {"task": self.name, "source": self.source, "note": self.note}


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _offline_spec(task: OfflineTask, folder: Path, base_yaml: Path, cache: Path) -> Path:
    """Our override YAML for ``task`` (written once per source checksum), the converted rows beside it."""
    key = f"{task.name}-{_digest(folder)}"
    rows_path, yaml_path = cache / f"{key}.jsonl", cache / f"{key}.yaml"
    if yaml_path.is_file():
        return yaml_path
    cache.mkdir(parents=True, exist_ok=True)
    tmp = rows_path.with_name(f".{rows_path.name}.{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for row in task.convert(folder):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(rows_path)
    splits = {"training_split": None, "validation_split": None, "test_split": None, task.split + "_split": task.split}
    config = {"include": str(base_yaml), "task": task.name, "dataset_path": "json", "dataset_name": None,
              "dataset_kwargs": {"data_files": {task.split: str(rows_path)}}, **splits, **(task.overrides or {})}
    tmp = yaml_path.with_name(f".{yaml_path.name}.{os.getpid()}")
    # JSON is YAML: lm-eval's loader reads it, and no quoting rule of ours can go wrong.
    tmp.write_text(json.dumps(config, indent=1))
    tmp.replace(yaml_path)
    return yaml_path


def resolve_tasks(names: list[str], task_manager) -> list[TaskSource]:
    """Each task's source: the offline copy where $COMPRESS_DATA_DIR holds one, else the hub. One-line errors
    for a task lm-eval does not know and for a data folder without the task."""
    from compress.models import cache_dir

    index = task_manager.task_index
    data_dir = os.environ.get(DATA_DIR_ENV)
    sources = []
    for name in names:
        entry = index.get(name)
        if entry is None or entry.yaml_path is None:
            raise UserError(f"unknown task '{name}': lm-evaluation-harness has no such task (offline copies here: "
                            f"{', '.join(OFFLINE_TASKS)})")
        if not data_dir:
            sources.append(TaskSource(name, name, "hub"))
            continue
        offline = OFFLINE_TASKS.get(name)
        folder = Path(data_dir) / "tasks" / (offline.folder if offline else name)
        if offline is None or not folder.is_dir():
            raise UserError(f"task '{name}' has no offline copy in {folder} ({DATA_DIR_ENV} is set, so tasks are read "
                            f"from there): unset it to read the hub, or use one of {', '.join(OFFLINE_TASKS)}")
        try:
            spec = _offline_spec(offline, folder, Path(entry.yaml_path), cache_dir() / "tasks")
        except (OSError, KeyError, ValueError) as err:
            raise UserError(f"task '{name}': the offline copy in {folder} cannot be read ({err})")
        sources.append(TaskSource(name, str(spec), f"local:{folder}", offline.note))
    return sources
