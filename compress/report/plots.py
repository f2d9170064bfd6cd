"""The report's plots as PNG bytes (matplotlib, no display): each point a variant, the Pareto
frontier drawn and its points ringed."""

from __future__ import annotations

import io

from compress.report.pareto import pareto_front
from compress.report.rows import Row

MIB = 1 << 20


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.4), dpi=110)
    ax.grid(True, alpha=0.3)
    return plt, fig, ax


def _png(plt, fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _scatter(rows: list[Row], xs, ys, xlabel: str, ylabel: str, title: str, maximize_y: bool,
             log_y: bool = False, log_x: bool = False) -> bytes | None:
    points = [(x, y) for x, y in zip(xs, ys)]
    usable = [i for i, (x, y) in enumerate(points) if x is not None and y is not None]
    if not usable:
        return None
    plt, fig, ax = _figure()
    front = [i for i in pareto_front(points, maximize_y) if i in usable]
    span = (max(points[i][0] for i in usable) - min(points[i][0] for i in usable)) or 1.0
    placed: list[float] = []
    for i in usable:
        x, y = points[i]
        ax.scatter([x], [y], s=42, color="tab:red" if rows[i].is_base else "tab:blue", zorder=3)
        # Variants of equal size (RTN and GPTQ at the same bits) share an x: stack their labels.
        stack = sum(1 for other in placed if abs(other - x) < 0.05 * span)
        placed.append(x)
        ax.annotate(rows[i].name, (x, y), textcoords="offset points", xytext=(5, 4 + 9 * stack), fontsize=7)
    if front:
        ordered = sorted(front, key=lambda i: points[i][0])
        ax.plot([points[i][0] for i in ordered], [points[i][1] for i in ordered], color="tab:orange", lw=1.5,
                label="Pareto frontier", zorder=2)
        ax.scatter([points[i][0] for i in ordered], [points[i][1] for i in ordered], s=120, facecolors="none",
                   edgecolors="tab:orange", linewidths=1.5, zorder=4)
        ax.legend(loc="best", fontsize=8)
    if log_y:
        from matplotlib.ticker import ScalarFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return _png(plt, fig)


def make_plots(rows: list[Row]) -> dict[str, bytes]:
    """{file name: PNG bytes} for every plot the figures allow."""
    size = [r.weight_bytes / MIB for r in rows]
    ppls = [r.perplexity for r in rows]
    finite = [p for p in ppls if p is not None and p != float("inf")]
    wide = bool(finite) and max(finite) / min(finite) > 3  # log scale only where the range needs it
    plots = {
        "perplexity_vs_size.png": _scatter(
            rows, size, ppls, "weights in memory (MiB)", "perplexity" + (" (log scale)" if wide else ""),
            "Perplexity vs size (lower-left is better)", maximize_y=False, log_y=wide),
        "decode_vs_size.png": _scatter(
            rows, size, [r.decode_tps for r in rows], "weights in memory (MiB)", "batch-1 decode tokens/s",
            "Decode speed vs size (upper-left is better)", maximize_y=True),
        "kl_vs_bits.png": _scatter(
            rows, [r.bits for r in rows], [r.kl_mean for r in rows], "weight bits (log2 scale)",
            "mean KL divergence to the base", "KL vs bits (lower-left is better)", maximize_y=False, log_x=True),
    }
    plots["task_recovery.png"] = _task_recovery(rows)
    return {name: png for name, png in plots.items() if png is not None}


def _task_recovery(rows: list[Row]) -> bytes | None:
    """Grouped bars: each task's recovery (score / the base's) per compressed row, 100% drawn."""
    compared = [r for r in rows if not r.is_base and any(v is not None for v in r.task_recovery.values())]
    tasks = list(dict.fromkeys(t for r in compared for t, v in r.task_recovery.items() if v is not None))
    if not compared or not tasks:
        return None
    plt, fig, ax = _figure()
    width = 0.8 / len(compared)
    for k, row in enumerate(compared):
        values = [100 * (row.task_recovery.get(t) or 0.0) for t in tasks]
        ax.bar([i + k * width for i in range(len(tasks))], values, width, label=row.name)
    ax.axhline(100, color="black", linewidth=0.8)
    ax.set_xticks([i + width * (len(compared) - 1) / 2 for i in range(len(tasks))])
    ax.set_xticklabels(tasks, rotation=20, fontsize=8)
    ax.set_ylabel("recovery, % of the base's score")
    ax.set_title("Task accuracy recovery (higher is better, 100% = the base)", fontsize=10)
    ax.legend(fontsize=7)
    return _png(plt, fig)
