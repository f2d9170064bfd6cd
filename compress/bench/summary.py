"""A few human lines from a bench result (the JSON holds everything)."""

from __future__ import annotations

from compress.bench.result import BenchResult


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def summary_lines(result: BenchResult) -> list[str]:
    model, mem, acc, speed, proto = result.model, result.memory, result.accuracy, result.speed, result.protocol
    env = result.environment
    lines = [f"{result.name}: {model.kernel} on {env['device_name']} ({env['threads']} threads)"]
    lines.append(f"  memory   weights {human_bytes(mem.weight_bytes)} in memory, {human_bytes(mem.artifact_bytes)} "
                 f"on disk, peak {human_bytes(mem.peak_bytes)}")
    ppl = acc.perplexity
    if ppl:
        lines.append(f"  ppl      {ppl.perplexity:.4f} on {proto.eval.source}:{proto.eval.split} "
                     f"({ppl.windows} x {proto.seqlen} tokens, {'BOS first' if proto.bos else 'no BOS'}), scored at "
                     f"{acc.scoring_tokens_per_s:.0f} tokens/s")
    agreement = acc.agreement
    if agreement:
        lines.append(f"  vs base  KL {agreement.kl_mean:.5f} (top-{agreement.top_k}), "
                     f"top-1 agreement {100 * agreement.top1_agreement:.2f}%")
    for row in acc.tasks.results if acc.tasks else []:
        shown = ", ".join(f"{k} {100 * v:.2f}%" if k.startswith("acc") else f"{k} {v:.3f}"
                          for k, v in row.metrics.items())
        lines.append(f"  {row.task:<8} {shown} ({row.examples} of {row.split_examples} examples, "
                     f"{row.num_fewshot}-shot, {row.source})")
    task = acc.task
    if task:
        lines.append(f"  task     {task.task} accuracy {100 * task.accuracy:.2f}% ({task.examples} examples)")
    if speed:
        lines.append(f"  prefill  {speed.prefill.tokens_per_s:.1f} tokens/s ({speed.prefill.seqlen} tokens)")
        for d in speed.decode:
            lines.append(f"  decode   {d.tokens_per_s:.1f} tokens/s at batch {d.batch}")
        if speed.achieved_gbps is not None:
            share = (f"{100 * speed.bandwidth_fraction:.0f}%" if speed.bandwidth_fraction <= 1 else
                     "above it: part of the weights is served from the CPU's caches")
            lines.append(f"  bandwidth {speed.achieved_gbps:.1f} GB/s achieved of {speed.memory_bandwidth_gbps:.1f} "
                         f"GB/s measured ({share})")
    return lines
