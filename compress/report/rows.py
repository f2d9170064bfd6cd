"""Bench results -> report rows: the figures a reader compares, with ratios to the base model."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from compress.bench.result import BenchResult
from compress.errors import UserError
from compress.report.task_rows import TaskScore, mean_recovery, recovery, task_scores


@dataclass
class Row:
    name: str
    method: str
    bits: float
    group_size: int | None
    kernel: str
    parameters: int
    weight_bytes: int
    artifact_bytes: int
    peak_bytes: int
    """Peak during the timed prefill/decode (the whole run's peak where speed was not measured)."""
    perplexity: float | None
    kl_mean: float | None
    top1: float | None
    task_accuracy: float | None
    prefill_tps: float | None
    decode_tps: float | None
    """Batch-1 decode tokens/s."""
    decode_batch_tps: float | None
    decode_batch: int | None
    classify_eps: float | None
    """Classifiers: examples/s over the task at ``classify_batch``."""
    classify_batch: int | None
    achieved_gbps: float | None
    bandwidth_gbps: float | None
    isa: str | None = None
    """The CPU instruction sets that picked the kernels (compress.cpu_features); None in results made
    before they were recorded, or on CUDA."""
    is_base: bool = False
    tasks: dict[str, TaskScore] = field(default_factory=dict)
    """lm-eval task scores (``compress bench --tasks``)."""
    task_recovery: dict[str, float | None] = field(default_factory=dict)
    """Each task's score / the base row's (None where the two ran different examples or settings)."""
    mean_task_recovery: float | None = None
    ratios: dict = field(default_factory=dict)
    result: BenchResult | None = field(default=None, repr=False)


def result_files(paths: list[Path]) -> list[Path]:
    """The given files, and every *.json directly inside the given folders (hidden files, such as an output's
    inventory, are not results)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.glob("*.json") if not p.name.startswith("."))
            if not found:
                raise UserError(f"folder {path} holds no result files (*.json)")
            files.extend(found)
        else:
            files.append(path)
    if not files:
        raise UserError("no result files given: pass files written by `compress bench --out` or their folders")
    return files


def _row(result: BenchResult) -> Row:
    model, mem, acc, speed = result.model, result.memory, result.accuracy, result.speed
    batch1 = speed.decode_at(1) if speed else None
    larger = speed.largest_decode_batch() if speed else None
    classify = speed.classify if speed else None
    return Row(
        name=result.name, method=model.method, bits=model.weight_bits,
        group_size=(model.quantization or {}).get("group_size"), kernel=model.kernel, parameters=model.parameters,
        weight_bytes=mem.weight_bytes, artifact_bytes=mem.artifact_bytes, peak_bytes=mem.inference_peak_bytes,
        perplexity=acc.perplexity.perplexity if acc.perplexity else None,
        kl_mean=acc.agreement.kl_mean if acc.agreement else None,
        top1=acc.agreement.top1_agreement if acc.agreement else None,
        task_accuracy=acc.task.accuracy if acc.task else None,
        prefill_tps=speed.prefill.tokens_per_s if speed else None,
        decode_tps=batch1.tokens_per_s if batch1 else None,
        decode_batch_tps=larger.tokens_per_s if larger else None, decode_batch=larger.batch if larger else None,
        classify_eps=classify.examples_per_s if classify else None,
        classify_batch=classify.batch if classify else None,
        achieved_gbps=speed.achieved_gbps if speed else None,
        bandwidth_gbps=speed.memory_bandwidth_gbps if speed else None,
        isa=result.isa, tasks=task_scores(result), result=result)


def _base_index(results: list[BenchResult]) -> int:
    """The row every other one was compared with: the model named as --base (same dtype), else the
    largest dense row."""
    bases = Counter((r.base.path, r.base.dtype) for r in results if r.base)
    for (path, dtype), _ in bases.most_common():
        for i, r in enumerate(results):
            if r.model.path == path and r.model.dtype == dtype and not r.model.transform and not r.model.quantization:
                return i
    dense = [i for i, r in enumerate(results) if not r.model.quantization]
    candidates = dense or list(range(len(results)))
    return max(candidates, key=lambda i: results[i].memory.weight_bytes)


def _check_comparable(results: list[BenchResult], files: list[Path]) -> None:
    protocols = {r.protocol.windows_key() for r in results if r.accuracy.perplexity}
    if len(protocols) > 1:
        raise UserError(f"the results were scored on different texts or windows ({len(protocols)} protocols among "
                        f"{', '.join(map(str, files))}): report runs made with the same --eval/--seqlen/--windows/--bos")


def load_rows(paths: list[Path]) -> list[Row]:
    files = result_files(paths)
    results = [BenchResult.read(f) for f in files]
    _check_comparable(results, files)
    base = _base_index(results)
    rows = [_row(r) for r in results]
    rows[base].is_base = True
    ref = rows[base]
    for row in rows:
        row.ratios = {key: _ratio(getattr(row, key), getattr(ref, key)) for key in
                      ("weight_bytes", "artifact_bytes", "peak_bytes", "perplexity", "prefill_tps", "decode_tps",
                       "decode_batch_tps", "task_accuracy", "classify_eps")}
        row.task_recovery = recovery(row.tasks, ref.tasks)
        row.mean_task_recovery = mean_recovery(row.task_recovery)
    return rows


def _ratio(value, reference):
    if value is None or reference in (None, 0):
        return None
    return value / reference
