"""Structured pruning on the real SmolLM2-135M: the dense model beside the same model with 25% of its MLP
channels removed (and optionally other targets), measured side by side.

1. `compress prune smollm2-135m --method structured --target mlp --sparsity 0.25` (through the API);
2. `compress bench` on the dense model and on each pruned one (each in its own process; the pruned
   ones with the dense model as --base for KL and top-1 agreement);
3. an interleaved timing in one process (dense, pruned, dense, pruned, ...) of batch-1 prefill of a
   512-token window and batch-1 decode of 32 tokens, so a change of machine load hits both.

    OMP_NUM_THREADS=2 COMPRESS_DATA_DIR=../shared/data python benchmarks/structured_smollm2.py

writes reports/structured-smollm2/ (README.md, report.html, plots, results/ with side_by_side.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import offline_defaults, bench_subprocess, report_with_extras, timed_main  # noqa: E402

offline_defaults()
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"


def interleaved(folders: dict[str, Path], rounds: int, prompt_len: int, new_tokens: int) -> dict:
    from compress.bench import throughput
    from compress.data import load_text, tokenize
    from compress.models import load_model

    models, tokenizer = {}, None
    for name, folder in folders.items():
        models[name], tokenizer = load_model(folder)
    text, _ = load_text("wikitext2:test")
    ids = tokenize(tokenizer, text[:20000])[:prompt_len]
    cpu = torch.device("cpu")
    times: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "decode": []} for n in models}
    for model in models.values():  # warm-up
        throughput.prefill(model, ids, cpu, warmup=1, repeats=1)
        throughput.decode(model, ids[:16], new_tokens, 1, cpu, warmup=0, repeats=1)
    for _ in range(rounds):
        for name, model in models.items():
            times[name]["prefill"].append(throughput.prefill(model, ids, cpu, warmup=0, repeats=1).seconds_median)
            times[name]["decode"].append(throughput.decode(model, ids[:16], new_tokens, 1, cpu, warmup=0,
                                                           repeats=1).seconds_median)
    dense = times["dense"]
    out = {"rounds": rounds, "prefill_tokens": prompt_len, "decode_prompt": 16, "decode_tokens": new_tokens,
           "threads": torch.get_num_threads(), "models": {}}
    for name, t in times.items():
        entry = {"prefill_tokens_per_s": prompt_len / statistics.median(t["prefill"]),
                 "decode_tokens_per_s": new_tokens / statistics.median(t["decode"])}
        if name != "dense":
            for kind in ("prefill", "decode"):
                ratios = [d / s for d, s in zip(dense[kind], t[kind])]
                entry[f"{kind}_speedup_median"] = statistics.median(ratios)
                entry[f"{kind}_speedup_min"] = min(ratios)
                entry[f"{kind}_speedup_max"] = max(ratios)
        out["models"][name] = entry
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="mlp:0.25", help="comma-separated TARGET:SPARSITY (default mlp:0.25)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--windows", type=int, default=40, help="WikiText-2 windows of 512 for perplexity")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "structured-smollm2")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    from compress.models import resolve, weight_bytes_on_disk
    from compress.prune.run import PruneRequest, prune

    dense = resolve(MODEL).path
    work = Path(tempfile.mkdtemp(prefix="structured-"))
    folders, manifests = {"dense": dense}, {}
    for spec in args.targets.split(","):
        target, sparsity = spec.split(":")
        name = f"{target}-{round(float(sparsity) * 100)}"
        result = prune(PruneRequest(model=MODEL, method="structured", target=target, sparsity=float(sparsity),
                                    nsamples=args.nsamples, device="cpu", out=str(work / name), progress=False))
        folders[name], manifests[name] = result.folder, result.manifest
        print(f"pruned {name}: {result.manifest['parameters']:,} parameters, {result.seconds:.0f} s", file=sys.stderr)

    window_args = ["--windows", str(args.windows), "--seqlen", "512"]
    results = work / "results"
    results.mkdir()
    bench_subprocess(MODEL, results / "dense.json", ["--name", "dense", *window_args])
    for name, folder in folders.items():
        if name != "dense":
            bench_subprocess(str(folder), results / f"{name}.json", ["--name", f"structured {name}%", "--base", MODEL,
                                                           *window_args])
    side = interleaved(folders, args.rounds, 512, 32)
    (results / "side_by_side.json").write_text(json.dumps(side, indent=1))

    dense_bytes = weight_bytes_on_disk(dense)
    notes = []
    for name, manifest in manifests.items():
        s, m = manifest["structure"], side["models"][name]
        notes.append(f"{name}: {s['units_before']} -> {s['units_after']} {s['unit']} "
                     f"{'in the model' if s['target'] == 'layers' else 'per block'}, {manifest['parameters']:,} "
                     f"parameters; weights on disk {weight_bytes_on_disk(folders[name]) / 2**20:.1f} MiB vs "
                     f"{dense_bytes / 2**20:.1f} MiB dense ({dense_bytes / weight_bytes_on_disk(folders[name]):.2f}x "
                     f"smaller); pruning took {manifest['timings_s']['prune']:.0f} s on "
                     f"{manifest['calibration']['count']} x {manifest['calibration']['seqlen']} calibration tokens "
                     f"from {manifest['calibration']['text']['source']}:{manifest['calibration']['text']['split']}.")
        notes.append(f"Side by side with the dense model, interleaved over {side['rounds']} rounds in one process "
                     f"({side['threads']} threads): batch-1 prefill of {side['prefill_tokens']} tokens "
                     f"{m['prefill_speedup_median']:.2f}x faster (min {m['prefill_speedup_min']:.2f}x, max "
                     f"{m['prefill_speedup_max']:.2f}x; {m['prefill_tokens_per_s']:.0f} vs "
                     f"{side['models']['dense']['prefill_tokens_per_s']:.0f} tok/s); batch-1 decode of "
                     f"{side['decode_tokens']} tokens {m['decode_speedup_median']:.2f}x faster (min "
                     f"{m['decode_speedup_min']:.2f}x, max {m['decode_speedup_max']:.2f}x; "
                     f"{m['decode_tokens_per_s']:.1f} vs {side['models']['dense']['decode_tokens_per_s']:.1f} tok/s).")
    (results / "prune_manifests.json").write_text(json.dumps(manifests, indent=1, default=str))
    # The pruned models lived in a temporary folder: the commands show the default output instead.
    reproduce = [re.sub(r" --out \S+", "", m["command"]) for m in manifests.values()] + [f"python benchmarks/structured_smollm2.py --targets "
                                                              f"{args.targets} --out {args.out}"]
    bench_files = [results / "dense.json"] + [results / f"{n}.json" for n in folders if n != "dense"]
    report_with_extras(bench_files, args.out, "Structured pruning: SmolLM2-135M", reproduce, notes, results,
                       ("side_by_side.json", "prune_manifests.json"))
    return 0


if __name__ == "__main__":
    timed_main(main)
