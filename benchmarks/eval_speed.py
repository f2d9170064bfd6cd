"""WikiText-2 scoring speed of `compress bench` beside a naive one-window-at-a-time loop, in one run.

The naive loop is the recipe most users write: ``model(ids, labels=ids)`` per window under
``torch.no_grad``. Ours is ``compress.bench.score.score_windows``: batched windows under
``torch.inference_mode``, one float32 log-softmax per window feeding perplexity (and KL). Both score
the same windows of the same fp32 model; the two are interleaved (naive, ours, naive, ours, ...) so
that a change of machine load hits both. With ``--load K``, K busy processes share the cores for the
whole run, to reproduce "measured under load".

    OMP_NUM_THREADS=2 COMPRESS_DATA_DIR=../shared/data python benchmarks/eval_speed.py [--load 1]

writes reports/eval_speed[_load1].{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _busy() -> None:
    while True:
        pass


def naive(model, windows) -> tuple[float, float]:
    started = time.perf_counter()
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for window in windows:
            ids = window.unsqueeze(0)
            out = model(ids, labels=ids)
            nll += float(out.loss) * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    seconds = time.perf_counter() - started
    return math.exp(nll / tokens), len(windows) * windows[0].numel() / seconds


def ours(model, windows) -> tuple[float, float]:
    from compress.bench.score import score_windows

    started = time.perf_counter()
    result, _ = score_windows(model, windows, torch.device("cpu"))
    seconds = time.perf_counter() - started
    return result.perplexity.perplexity, len(windows) * windows[0].numel() / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--load", type=int, default=0, help="busy processes sharing the cores during the run")
    args = parser.parse_args()

    from compress.data import eval_windows, load_text, tokenize
    from compress.models import load_model, resolve

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    model, tokenizer = load_model(resolve(args.model).path)
    text, record = load_text("wikitext2:test")
    windows, _ = eval_windows(tokenize(tokenizer, text), record, args.seqlen, args.windows)
    ours(model, windows[:2])  # warm-up of both paths
    naive(model, windows[:2])
    load = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(args.load)]
    for p in load:
        p.start()
    rounds = []
    try:
        for _ in range(args.rounds):
            ppl_naive, tps_naive = naive(model, windows)
            ppl_ours, tps_ours = ours(model, windows)
            rounds.append({"naive_tokens_per_s": tps_naive, "ours_tokens_per_s": tps_ours,
                           "naive_ppl": ppl_naive, "ours_ppl": ppl_ours})
            print(f"naive {tps_naive:7.1f} tok/s   ours {tps_ours:7.1f} tok/s   ratio {tps_ours / tps_naive:.2f}",
                  flush=True)
    finally:
        for p in load:
            p.terminate()
    naive_med = statistics.median(r["naive_tokens_per_s"] for r in rounds)
    ours_med = statistics.median(r["ours_tokens_per_s"] for r in rounds)
    summary = {
        "model": args.model, "windows": args.windows, "seqlen": args.seqlen, "rounds": args.rounds,
        "busy_processes": args.load, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "naive_tokens_per_s_median": naive_med, "ours_tokens_per_s_median": ours_med, "ratio": ours_med / naive_med,
        "perplexity_naive": rounds[0]["naive_ppl"], "perplexity_ours": rounds[0]["ours_ppl"],
        "rounds_detail": rounds, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    suffix = f"_load{args.load}" if args.load else ""
    out = ROOT / "reports" / f"eval_speed{suffix}"
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    command = "OMP_NUM_THREADS=2 COMPRESS_DATA_DIR=../shared/data python benchmarks/eval_speed.py" + (
        f" --load {args.load}" if args.load else "")
    out.with_suffix(".md").write_text("\n".join([
        f"# WikiText-2 scoring speed: `compress bench` vs a naive loop ({args.model}, CPU)", "",
        f"Reproduce: `{command}`", "",
        f"{args.windows} windows x {args.seqlen} tokens of WikiText-2 test, fp32, {summary['threads']} threads on "
        f"{summary['cpu_count']} cores, {args.load} busy process(es) beside it; {args.rounds} interleaved rounds, "
        "medians.", "",
        "| scorer | tokens/s | perplexity |", "|---|---|---|",
        f"| naive loop (`model(ids, labels=ids)`, one window at a time) | {naive_med:.1f} | {summary['perplexity_naive']:.4f} |",
        f"| `compress bench` scorer (batched, inference mode) | {ours_med:.1f} | {summary['perplexity_ours']:.4f} |",
        "", f"Ratio ours / naive, same run: **{summary['ratio']:.2f}x**.", ""]))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
