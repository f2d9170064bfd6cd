"""The figure a distillation is judged by: task accuracy for classifiers, perplexity for language
models; measured by the same code as ``compress bench``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.bench.score import score_windows
from compress.bench.task_accuracy import task_accuracy
from compress.data import eval_windows_of_text, load_labelled, load_text

DEFAULT_EVAL = {"classifier": "sst2:dev", "lm": "wikitext2"}


@dataclass
class Evaluator:
    kind: str
    source: str
    rows: list | None = None
    windows: list[torch.Tensor] | None = None
    record: dict | None = None
    max_length: int = 128

    @property
    def metric(self) -> str:
        return "accuracy" if self.kind == "classifier" else "perplexity"

    @property
    def higher_is_better(self) -> bool:
        return self.kind == "classifier"

    def __call__(self, model: nn.Module, tokenizer, device: torch.device) -> float:
        was_training = model.training
        model.eval()
        try:
            if self.kind == "classifier":
                return task_accuracy(model, tokenizer, self.rows, device, self.source,
                                     max_length=self.max_length).accuracy
            score, _ = score_windows(model, self.windows, device, tune_threads=False)
            return score.perplexity.perplexity
        finally:
            model.train(was_training)


def make_evaluator(kind: str, source: str | None, tokenizer, windows: int | None, seqlen: int,
                   max_length: int) -> Evaluator | None:
    """None for a bare encoder: it has no output to score."""
    if kind not in DEFAULT_EVAL:
        return None
    source = source or DEFAULT_EVAL[kind]
    if kind == "classifier":
        rows, record = load_labelled(source)
        return Evaluator(kind, source, rows=rows, record=vars(record), max_length=max_length)
    text, record = load_text(source)
    chosen, window_record = eval_windows_of_text(tokenizer, text, record, seqlen, windows)
    return Evaluator(kind, source, windows=chosen, record=window_record.to_dict())
