"""Training data for distillation: sentences with labels (classifiers) or token windows (language
models), and a batch order that is a pure function of (seed, stage, step), so a resumed run sees
exactly the batches an uninterrupted run would."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from compress.data import TextRecord, load_labelled, load_text, tokenize
from compress.errors import UserError


@dataclass
class TrainingData:
    record: TextRecord
    rows: list[tuple[str, int]] | None = None
    """Classifier data: (sentence, label)."""
    windows: torch.Tensor | None = None
    """Language-model data: [count, seqlen] token ids."""
    augmented_from: int | None = None
    """Rows before augmentation, when augmented."""

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else int(self.windows.shape[0])

    def describe(self) -> dict:
        out = {"source": self.record.source, "split": self.record.split, "origin": self.record.origin,
               "sha256": self.record.sha256, "examples": len(self)}
        if self.windows is not None:
            out["seqlen"] = int(self.windows.shape[1])
        if self.augmented_from is not None:
            out["augmented_from"] = self.augmented_from
        return out


def subsample(count: int, limit: int | None, seed: int) -> list[int]:
    """Up to ``limit`` indices of ``count``, drawn with ``seed`` and kept in their original order."""
    if limit is None or limit >= count:
        return list(range(count))
    return sorted(random.Random(seed).sample(range(count), limit))


def classifier_data(source: str, limit: int | None, seed: int) -> TrainingData:
    rows, record = load_labelled(source)
    keep = subsample(len(rows), limit, seed)
    return TrainingData(record, rows=[rows[i] for i in keep])


def lm_data(source: str, tokenizer, seqlen: int, limit: int | None, seed: int) -> TrainingData:
    """Non-overlapping windows of ``seqlen`` tokens over the whole text (remainder dropped)."""
    text, record = load_text(source)
    ids = tokenize(tokenizer, text)
    count = ids.numel() // seqlen
    if count == 0:
        raise UserError(f"training text {source} has {ids.numel()} tokens, fewer than one window of {seqlen}: "
                        "use a longer text or a smaller seqlen")
    windows = ids[: count * seqlen].view(count, seqlen)
    keep = subsample(count, limit, seed)
    return TrainingData(record, windows=windows[keep].clone())


def steps_per_epoch(examples: int, batch_size: int) -> int:
    return math.ceil(examples / batch_size)


def total_steps(examples: int, batch_size: int, epochs: float, max_steps: int | None) -> int:
    steps = max(1, math.ceil(epochs * steps_per_epoch(examples, batch_size)))
    return min(steps, max_steps) if max_steps else steps


def batch_indices(step: int, examples: int, batch_size: int, seed: int, stage: int) -> list[int]:
    """The example indices of global step ``step``: each epoch is a fresh permutation drawn from
    (seed, stage, epoch); the last batch of an epoch may be short."""
    per_epoch = steps_per_epoch(examples, batch_size)
    epoch, position = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed((seed * 1_000_003 + stage * 10_007 + epoch) % (1 << 62))
    order = torch.randperm(examples, generator=generator)
    return order[position * batch_size:(position + 1) * batch_size].tolist()
