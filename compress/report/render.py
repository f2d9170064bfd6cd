"""Report pages: a Markdown summary (README.md beside its PNGs) and one self-contained HTML file."""

from __future__ import annotations

import base64
import html
import math

from compress.report.pareto import pareto_front
from compress.report.rows import Row

MIB = 1 << 20
PLOT_TITLES = {
    "perplexity_vs_size.png": "Perplexity vs size",
    "decode_vs_size.png": "Decode tokens/s vs size",
    "kl_vs_bits.png": "KL divergence vs bits",
    "task_recovery.png": "Task accuracy recovery vs the base",
}


def _num(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "inf"
    return f"{value:,.{digits}f}"


def _kl(value) -> str:
    """Four decimals (1.0016, not '1'; 0.1001, not '0.1'); below 0.001 in scientific notation, so a small KL
    keeps its digits."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    return f"{value:.2e}" if abs(value) < 1e-3 else f"{value:.4f}"


def _ratio(value) -> str:
    return "" if value is None else f" ({value:.2f}x)"


def _variant(row: Row) -> str:
    if row.group_size is None:
        return f"{row.method}"
    group = "per channel" if row.group_size == -1 else f"g{row.group_size}"
    act_bits = ((row.result.model.quantization or {}).get("act_bits") if row.result else None)
    return f"{row.method} W{row.bits:g}{f'A{act_bits}' if act_bits else ''} {group}"


CACHE_MARK = "†"


def _achieved(achieved: float | None, bandwidth: float | None) -> str:
    """Weight bytes x decode tokens/s, as a share of the measured memory bandwidth. Above 100% the weights are
    partly read from the CPU's caches, and the share says nothing: the cell says that instead."""
    if achieved is None:
        return "-"
    if not bandwidth:
        return f"{achieved:.1f}"
    if achieved > bandwidth:
        return f"{achieved:.1f} (above measured{CACHE_MARK})"
    return f"{achieved:.1f} ({100 * achieved / bandwidth:.0f}%)"


def cache_note(rows: list[Row]) -> list[str]:
    if any(r.achieved_gbps and r.bandwidth_gbps and r.achieved_gbps > r.bandwidth_gbps for r in rows):
        return [f"{CACHE_MARK} Weight bytes x decode tokens/s exceed the measured memory read bandwidth: part of the "
                "weights is served from the CPU's caches, so the row is not bandwidth-bound and no share is given."]
    return []


def table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    front = set(pareto_front([(r.weight_bytes, r.perplexity) for r in rows]))
    has_task = any(r.task_accuracy is not None for r in rows)
    header = ["", "variant", "scheme", "weights MiB", "disk MiB", "peak MiB (inference)", "perplexity", "KL", "top-1 %",
              "prefill tok/s", "decode tok/s (b1)", "decode tok/s (batch)", "GB/s (% of measured)"]
    if has_task:
        header[9:9] = ["task acc %", "task examples/s"]
    body = []
    for i, r in enumerate(rows):
        mark = ("base " if r.is_base else "") + ("★" if i in front else "")
        gbps = _achieved(r.achieved_gbps, r.bandwidth_gbps)
        line = [mark.strip(), r.name, _variant(r),
                _num(r.weight_bytes / MIB, 1) + _ratio(r.ratios.get("weight_bytes")),
                _num(r.artifact_bytes / MIB, 1), _num(r.peak_bytes / MIB, 0),
                _num(r.perplexity, 3) + _ratio(r.ratios.get("perplexity")), _kl(r.kl_mean),
                _num(None if r.top1 is None else 100 * r.top1, 2),
                _num(r.prefill_tps, 1) + _ratio(r.ratios.get("prefill_tps")),
                _num(r.decode_tps, 1) + _ratio(r.ratios.get("decode_tps")),
                "-" if r.decode_batch_tps is None else f"{r.decode_batch_tps:,.1f} @{r.decode_batch}"
                + _ratio(r.ratios.get("decode_batch_tps")), gbps]
        if has_task:
            line[9:9] = [_num(None if r.task_accuracy is None else 100 * r.task_accuracy, 2)
                         + _ratio(r.ratios.get("task_accuracy")),
                         "-" if r.classify_eps is None else f"{r.classify_eps:,.1f} @{r.classify_batch}"
                         + _ratio(r.ratios.get("classify_eps"))]
        body.append(line)
    return _drop_empty_columns(header, body)


def _drop_empty_columns(header: list[str], body: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """Columns no row has a figure for (perplexity for classifiers, decode for encoders) are left out."""
    keep = [i for i in range(len(header)) if i < 3 or any(row[i] not in ("-", "") for row in body)]
    return [header[i] for i in keep], [[row[i] for i in keep] for row in body]


def protocol_lines(rows: list[Row]) -> list[str]:
    base = next(r for r in rows if r.is_base).result
    proto, env = base.protocol, base.environment
    lines = []
    if proto.eval is not None:
        ev = proto.eval
        lines.append(f"Perplexity: {ev.source}:{ev.split} ({ev.origin}, sha256 {ev.sha256[:16]}…), "
                     f"{ev.convention}, tokenized without special tokens, "
                     f"{proto.windows} non-overlapping windows of {proto.seqlen} tokens (stride "
                     f"{proto.stride}, {'each starting with BOS' if proto.bos else 'no BOS'}, remainder "
                     "dropped), "
                     f"{proto.scored_tokens:,} predicted tokens; ppl = exp(mean NLL).")
        # The base row is often benched alone: the reference is recorded by the rows measured against it.
        ref = next((r.result.protocol.base_reference for r in rows if r.result.protocol.base_reference), None)
        lines.append(f"KL and top-1: against {ref.reference if ref else 'the base'} ({ref.dtype if ref else '?'}) on "
                     f"the same windows; KL over the base's top-{ref.top_k if ref else '?'} tokens per position plus "
                     "one bucket for the rest (a lower bound of the full KL); top-1 agreement is exact.")
    speed = base.speed
    if speed and speed.classify:
        c = speed.classify
        lines.append(f"Task accuracy and speed: {base.accuracy.task.task} ({c.examples} examples), batches of "
                     f"{c.batch} padded to their longest sentence, tokenization outside the timed region; examples/s "
                     f"= median of {c.repeats} passes over the whole task after {speed.warmup} warm-up; prefill = one "
                     f"{speed.prefill.seqlen}-token input at batch 1.")
    if speed and speed.decode:
        decode = speed.decode[0]
        lines.append(f"Speed: prefill of one {speed.prefill.seqlen}-token window at batch 1; greedy decode of "
                     f"{decode.new_tokens} tokens after a {decode.prompt_tokens}-token "
                     f"prompt with the KV cache; median of {speed.repeats} runs after {speed.warmup} warm-up. "
                     f"Achieved GB/s = weight bytes x batch-1 decode tokens/s, against a measured memory read "
                     f"bandwidth of {speed.memory_bandwidth_gbps or float('nan'):.1f} GB/s.")
    lines.append(f"Memory: weights = parameters and buffers in memory, tied tensors once; peak (inference) = "
                 f"{base.memory.peak_kind} over the timed prefill and decode (the whole run's peak, with "
                 "the scoring pass, is in each result file).")
    lines.append(f"Machine: {env['device_name']}, {env['threads']} threads (OMP_NUM_THREADS={env.get('OMP_NUM_THREADS')}),"
                 f" torch {env['torch']}, transformers {env['transformers']}, compress-workbench {env['compress']}, "
                 f"Python {env['python']}.")
    cpu = _cpu_line(env)
    if cpu:
        lines.append(cpu)
    return lines


def _cpu_line(env: dict) -> str | None:
    cpu = env.get("cpu")
    if not cpu:
        return None
    features = ", ".join(cpu["features"]) or "none reported"
    return (f"CPU instruction sets: {cpu['isa']} ({cpu['arch']}; {features}; from {cpu['source']}); torch's kernels "
            f"dispatched for {cpu.get('torch_capability') or '?'}; onnxruntime {env.get('onnxruntime') or 'not installed'}.")


def isa_warnings(rows: list[Row]) -> list[str]:
    """A warning when CPU rows compared side by side ran on different instruction sets (or some did
    not record theirs): integer kernels take other paths on each, in speed and sometimes in accuracy."""
    groups: dict[str, list[str]] = {}
    for r in rows:
        if r.result.protocol.on_cuda:
            continue
        groups.setdefault(r.isa or "not recorded", []).append(r.name)
    if len(groups) <= 1:
        return []
    listed = "; ".join(f"{isa}: {', '.join(names)}" for isa, names in groups.items())
    return [f"These rows ran on CPUs with different instruction sets ({listed}). Integer kernels take other paths "
            "on each (ONNX Runtime's u8 x s8 MatMulInteger saturates without VNNI; torch and oneDNN pick AVX-512, "
            "AVX2, AMX or NEON kernels), so speed, and for some kernels accuracy, is only comparable between rows "
            "of the same set."]


def kernels(rows: list[Row]) -> list[str]:
    lines = []
    for r in rows:
        threads = r.result.environment.get("backend_threads") or {}
        pools = " [" + ", ".join(f"{pool.replace('_', ' ')} threads {n}" for pool, n in threads.items()) + "]" \
            if threads else ""
        notes = r.result.model.notes
        lines.append(f"{r.name}: {r.kernel}{pools}" + (f" ({'; '.join(notes)})" if notes else ""))
    return lines


def task_table(rows: list[Row]) -> tuple[list[str], list[list[str]]] | None:
    """Rows x tasks: score (recovery vs the base), and the mean recovery; None when no row ran tasks."""
    names = list(dict.fromkeys(task for r in rows for task in r.tasks))
    if not names:
        return None
    metrics = {task: next(r.tasks[task].metric for r in rows if task in r.tasks) for task in names}
    header = ["variant", *[f"{task} {metrics[task]} %" for task in names], "mean recovery"]
    body = []
    for r in rows:
        cells = [("base " if r.is_base else "") + r.name]
        for task in names:
            score = r.tasks.get(task)
            if score is None:
                cells.append("-")
                continue
            spread = f" ±{100 * score.stderr:.1f}" if score.stderr is not None else ""
            rec = r.task_recovery.get(task)
            cells.append(f"{100 * score.value:.1f}{spread}" + ("" if r.is_base or rec is None else f" ({100 * rec:.1f}%)"))
        cells.append("-" if r.is_base or r.mean_task_recovery is None else f"{100 * r.mean_task_recovery:.1f}%")
        body.append(cells)
    return header, body


def serving_table(rows: list[Row]) -> tuple[list[str], list[list[str]]] | None:
    """Rows served by an engine's own server (``--backend vllm``) x concurrency: requests/s, output tokens/s (and
    its ratio to the first served row's at the same level, the base where it was served), TTFT, ITL; None when no
    row was served."""
    served = [r for r in rows if r.result is not None and r.result.serving]
    if not served:
        return None
    reference = next((r for r in served if r.is_base), served[0])
    header = ["variant", "kernel", "clients", "requests/s", "output tok/s", f"x {reference.name}", "TTFT ms", "ITL ms",
              "server peak MiB"]
    body = []
    for r in served:
        serving = r.result.serving
        for level in serving.levels:
            ref = reference.result.serving.at(level.clients)
            ratio = level.output_tokens_per_s / ref.output_tokens_per_s if ref and ref.output_tokens_per_s else None
            body.append([r.name, r.kernel, str(level.clients), _num(level.requests_per_s, 3),
                         _num(level.output_tokens_per_s, 1), _num(ratio, 2), _num(level.ttft_ms, 0),
                         _num(level.itl_ms, 1),
                         _num(None if serving.peak_rss_bytes is None else serving.peak_rss_bytes / MIB, 0)])
    return header, body


def serving_lines(rows: list[Row]) -> list[str]:
    served = [r.result.serving for r in rows if r.result is not None and r.result.serving]
    levels = [level for serving in served for level in serving.levels]
    return [f"{served[0].server}: each client streams greedy completions of {levels[0].output_tokens} tokens after a "
            f"{levels[0].prompt_tokens}-token prompt (end of text ignored), its requests one after another; TTFT = "
            "time to the first token, ITL = time per token after it (first to last token over the tokens after the "
            "first), both means over requests; peak = VmHWM summed over the server's processes"] if levels else []


def task_lines(rows: list[Row]) -> list[str]:
    settings = sorted({(task, *s.setting) for r in rows for task, s in r.tasks.items()})
    return [f"{task}: {n} examples, {shots}-shot, {source}" for task, n, shots, source in settings]


def markdown(title: str, rows: list[Row], plots: dict[str, bytes], reproduce: list[str], notes: list[str]) -> str:
    header, body = table(rows)
    out = [f"# {title}", ""]
    if reproduce:
        out += ["Reproduce:", "", "```", *reproduce, "```", ""]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cells) + " |" for cells in body]
    out += ["", "★ = on the Pareto frontier of size and perplexity; ratios are to the base row.", *cache_note(rows), ""]
    tasks = task_table(rows)
    if tasks:
        out += ["## Tasks (lm-evaluation-harness)", "", "| " + " | ".join(tasks[0]) + " |", "|" + "---|" * len(tasks[0])]
        out += ["| " + " | ".join(cells) + " |" for cells in tasks[1]]
        out += ["", "Score ± standard error, (recovery = score / the base's); recovery only between runs of the same "
                "examples, few-shot count and data.", "", *[f"- {line}" for line in task_lines(rows)], ""]
    serving = serving_table(rows)
    if serving:
        out += ["## Serving", "", "| " + " | ".join(serving[0]) + " |", "|" + "---|" * len(serving[0])]
        out += ["| " + " | ".join(cells) + " |" for cells in serving[1]]
        out += ["", *[f"- {line}" for line in serving_lines(rows)], ""]
    warnings = isa_warnings(rows)
    if warnings:
        out += ["## Warnings", "", *[f"- {w}" for w in warnings], ""]
    for name, caption in PLOT_TITLES.items():
        if name in plots:
            out += [f"![{caption}](plots/{name})", ""]
    if notes:
        out += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    out += ["## Protocol", "", *[f"- {line}" for line in protocol_lines(rows)], ""]
    out += ["## Kernels", "", *[f"- {line}" for line in kernels(rows)], ""]
    return "\n".join(out)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:4px 7px;text-align:right}
td:nth-child(2),td:nth-child(3),th{text-align:left}tr.base{background:#fff3e0}tr.front td:first-child{color:#e65100}
img{max-width:640px;margin:8px}pre{background:#f5f5f5;padding:8px;overflow-x:auto}"""


def html_page(title: str, rows: list[Row], plots: dict[str, bytes], reproduce: list[str], notes: list[str]) -> str:
    header, body = table(rows)
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1>"]
    if reproduce:
        parts.append("<p>Reproduce:</p><pre>" + esc("\n".join(reproduce)) + "</pre>")
    parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
    for row, cells in zip(rows, body):
        cls = " ".join(c for c, on in (("base", row.is_base), ("front", "★" in cells[0])) if on)
        parts.append(f"<tr class='{cls}'>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    parts.append("</table><p>★ = on the Pareto frontier of size and perplexity; ratios are to the base row."
                 + "".join(f" {esc(n)}" for n in cache_note(rows)) + "</p>")
    tasks = task_table(rows)
    if tasks:
        parts.append("<h2>Tasks (lm-evaluation-harness)</h2><table><tr>" +
                     "".join(f"<th>{esc(h)}</th>" for h in tasks[0]) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>" for cells in tasks[1]]
        parts.append("</table><p>Score ± standard error, (recovery = score / the base's).</p><ul>" +
                     "".join(f"<li>{esc(x)}</li>" for x in task_lines(rows)) + "</ul>")
    serving = serving_table(rows)
    if serving:
        parts.append("<h2>Serving</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in serving[0]) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>" for cells in serving[1]]
        parts.append("</table><ul>" + "".join(f"<li>{esc(x)}</li>" for x in serving_lines(rows)) + "</ul>")
    warnings = isa_warnings(rows)
    if warnings:
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{esc(w)}</li>" for w in warnings) + "</ul>")
    for name, caption in PLOT_TITLES.items():
        if name in plots:
            data = base64.b64encode(plots[name]).decode()
            parts.append(f"<figure><img alt='{esc(caption)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{esc(caption)}</figcaption></figure>")
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    parts.append("<h2>Protocol</h2><ul>" + "".join(f"<li>{esc(x)}</li>" for x in protocol_lines(rows)) + "</ul>")
    parts.append("<h2>Kernels</h2><ul>" + "".join(f"<li>{esc(x)}</li>" for x in kernels(rows)) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)

