"""What an lm-eval run gives back, as typed records (no torch: a report reads them)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TaskResult:
    task: str
    metrics: dict[str, float]
    """acc, acc_norm, perplexity (LAMBADA) as lm-eval reports them."""
    stderr: dict[str, float]
    examples: int
    """Examples scored (the first ``limit`` of the split, or all)."""
    split_examples: int
    num_fewshot: int
    source: str
    note: str | None = None
    seconds: float = 0.0


@dataclass
class TaskRun:
    results: list[TaskResult]
    lm_eval_version: str
    batch_size: int | None
    limit: int | dict[str, int | None] | None
    """Examples per task (None: all); per task where a record merges runs of different limits."""
    tokenization: str
    notes: list[str] = field(default_factory=list)
    dtype: str | None = None
    """The dtype the model ran the tasks in (set by the benchmark)."""
    max_length: int | None = None
    """Longest context lm-eval was allowed (set by the benchmark)."""
