"""Run lm-eval tasks on a loaded model and return typed results (accuracy, acc_norm, stderr, examples)."""

from __future__ import annotations

import functools
import logging
import math
import os
import time

import torch

from compress.errors import UserError
from compress.tasks.result import TaskResult, TaskRun

DEFAULT_TASKS = ("lambada_openai", "arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande")


@functools.cache
def _lm_eval():
    """lm-eval's task manager, made once per process: indexing its task folders takes about 4.5 s here, and
    `compress bench --tasks` needs it to check the tasks before loading and again to run them."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("--tasks runs lm-evaluation-harness: pip install 'compress-workbench[eval]'")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1" if os.environ.get("HF_HUB_OFFLINE") == "1" else "0")
    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _check_counts(limit: int | None, num_fewshot: int) -> None:
    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be positive, not {limit}")
    if num_fewshot < 0:
        raise UserError(f"--num-fewshot must be 0 or more, not {num_fewshot}")


def check_tasks(names: list[str], limit: int | None = None, num_fewshot: int = 0) -> None:
    """Fail fast (before any model is loaded) on an unknown task, missing data or a bad count."""
    from compress.tasks.sources import resolve_tasks

    _check_counts(limit, num_fewshot)
    resolve_tasks(names, _lm_eval())


def run_tasks(model, tokenizer, device: torch.device, names: list[str], max_length: int, vocab: int,
              limit: int | None = None, num_fewshot: int = 0, batch_size: int | None = None,
              progress: bool = False) -> TaskRun:
    import lm_eval
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import get_task_dict

    from compress.tasks.lm import CompressLM
    from compress.tasks.sources import resolve_tasks

    _check_counts(limit, num_fewshot)
    manager = _lm_eval()
    sources = resolve_tasks(names, manager)
    lm = CompressLM(model, tokenizer, device, max_length, vocab, batch_size, progress)
    results = []
    for source in sources:
        task_dict = get_task_dict([source.spec], manager)
        task = task_dict[source.name]
        task.set_config(key="num_fewshot", value=num_fewshot)
        started = time.perf_counter()
        out = evaluate(lm, task_dict, limit=limit, bootstrap_iters=1000, log_samples=False, verbosity="WARNING")
        values = out["results"][source.name]
        metrics = {k.split(",")[0]: float(v) for k, v in values.items()
                   if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
        stderr = {k.split(",")[0].replace("_stderr", ""): float(v) for k, v in values.items()
                  if "_stderr," in k and isinstance(v, (int, float)) and not math.isnan(float(v))}
        counts = out["n-samples"][source.name]
        results.append(TaskResult(source.name, metrics, stderr, int(counts["effective"]), int(counts["original"]),
                                  num_fewshot, source.source, source.note, round(time.perf_counter() - started, 1)))
    bos = "with the tokenizer's BOS" if tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id] else "no BOS"
    return TaskRun(results, lm_eval.__version__, batch_size, limit,
                   f"lm-eval's (context/continuation split as HFLM), {bos}")
