"""Task accuracy in a report: each row's lm-eval figures and their recovery against the base row
(compressed / base, as llm-compressor reports it), only where both ran the same examples the same way."""

from __future__ import annotations

from dataclasses import dataclass

from compress.bench.result import BenchResult


@dataclass(frozen=True)
class TaskScore:
    metric: str
    """acc_norm where the task reports it (length-normalized multiple choice), else acc."""
    value: float
    stderr: float | None
    examples: int
    num_fewshot: int
    source: str

    @property
    def setting(self) -> tuple:
        """(examples, few-shot, data source): recovery is computed between equal settings only."""
        return self.examples, self.num_fewshot, self.source


def task_scores(result: BenchResult) -> dict[str, TaskScore]:
    tasks = result.accuracy.tasks
    scores = {}
    for row in tasks.results if tasks else []:
        metric = "acc_norm" if "acc_norm" in row.metrics else "acc"
        if metric not in row.metrics:
            continue
        scores[row.task] = TaskScore(metric, row.metrics[metric], row.stderr.get(metric), row.examples,
                                     row.num_fewshot, row.source)
    return scores


def recovery(scores: dict[str, TaskScore], base: dict[str, TaskScore]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for task, score in scores.items():
        reference = base.get(task)
        same = reference is not None and reference.setting == score.setting and reference.value > 0
        out[task] = score.value / reference.value if same else None
    return out


def mean_recovery(values: dict[str, float | None]) -> float | None:
    known = [v for v in values.values() if v is not None]
    return sum(known) / len(known) if known and len(known) == len(values) else None
