"""Task accuracy of a sequence classifier on labelled rows (SST-2 dev for sentiment students)."""

from __future__ import annotations

import torch

from compress.bench.result import TaskAccuracyResult


def is_classifier(config) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


@torch.inference_mode()
def task_accuracy(model, tokenizer, rows: list[tuple[str, int]], device: torch.device, task: str,
                  batch_size: int = 32, max_length: int = 128) -> TaskAccuracyResult:
    correct = 0
    for first in range(0, len(rows), batch_size):
        texts, labels = zip(*rows[first:first + batch_size])
        enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        logits = model(**{k: v.to(device) for k, v in enc.items()}).logits
        correct += int((logits.argmax(-1).cpu() == torch.tensor(labels)).sum())
    return TaskAccuracyResult(task, correct / len(rows), len(rows), batch_size, max_length)
