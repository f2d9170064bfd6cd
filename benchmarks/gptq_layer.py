"""GPTQ and packing on one layer of each Llama-2-7B shape, today's code beside the code before the 7B work
(read from git history, commit BEFORE), on the same weight and Hessian, in one process.

    OMP_NUM_THREADS=2 python benchmarks/gptq_layer.py

writes reports/scale/gptq_layer.{json,md}: seconds per layer (median of --repeats), the ratio, and each
version's layer output error tr(dW H dW^T)/rows, so a speed-up that cost accuracy would show.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import offline_defaults, timed_main  # noqa: E402

offline_defaults()
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "3782203"
"""The last commit before GPTQ's inner loop, its inverse Hessian and the packing were reworked."""
SHAPES = {"down_proj 4096x11008": (4096, 11008), "gate/up_proj 11008x4096": (11008, 4096),
          "q/k/v/o_proj 4096x4096": (4096, 4096)}


def module_at(commit: str, path: str, name: str) -> types.ModuleType:
    """A module's source as of ``commit``, loaded under ``name`` (its method registration left out)."""
    source = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    source = source.split("@register_method")[0]
    module = types.ModuleType(name)
    sys.modules[name] = module  # dataclasses look their module up there
    exec(compile(source, f"{commit}:{path}", "exec"), module.__dict__)
    return module


def timed(fn, repeats: int) -> tuple[float, object]:
    seconds, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "scale")
    args = parser.parse_args()

    from compress.quant.apply import output_error
    from compress.quant.gptq import GPTQConfig, gptq_quantize
    from compress.quant.primitives import pack_weight

    old_gptq = module_at(BEFORE, "compress/quant/gptq.py", "gptq_before")
    old_primitives = module_at(BEFORE, "compress/quant/primitives.py", "primitives_before")
    cfg = GPTQConfig(bits=4, group_size=128, act_order=True)
    rows = []
    for label, (out_features, in_features) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        weight = torch.randn(out_features, in_features, generator=g) * 0.02
        x = torch.randn(2048, in_features, generator=g) @ (torch.eye(in_features) + 0.05 * torch.randn(
            in_features, in_features, generator=g))
        hessian = 2 * x.t() @ x / x.shape[0]
        del x
        before_s, before = timed(lambda: old_gptq.gptq_quantize(weight, hessian, cfg), args.repeats)
        after_s, after = timed(lambda: gptq_quantize(weight, hessian, cfg), args.repeats)
        pack_before_s, _ = timed(lambda: old_primitives.pack_weight(after), args.repeats)
        pack_after_s, _ = timed(lambda: pack_weight(after), args.repeats)
        rows.append({"layer": label, "shape": [out_features, in_features],
                     "gptq_seconds_before": round(before_s, 2), "gptq_seconds_after": round(after_s, 2),
                     "gptq_speedup": round(before_s / after_s, 2),
                     "output_error_before": output_error(weight, before.dequantize(), hessian),
                     "output_error_after": output_error(weight, after.dequantize(), hessian),
                     "pack_seconds_before": round(pack_before_s, 3), "pack_seconds_after": round(pack_after_s, 3)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    result = {"before_commit": BEFORE, "config": "W4 g128, act-order, damp 0.01, block 128",
              "hessian": "2/n X^T X of 2048 correlated random rows", "threads": torch.get_num_threads(),
              "repeats": args.repeats, "statistic": "median", "layers": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gptq_layer.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# GPTQ and packing on one Llama-2-7B layer: before and after",
             "",
             "Reproduce: `OMP_NUM_THREADS=2 python benchmarks/gptq_layer.py` "
             f"(before = commit {BEFORE}, read from git history; same weight and Hessian; median of "
             f"{args.repeats}; {torch.get_num_threads()} threads)",
             "",
             "| layer | GPTQ s before | GPTQ s after | speed-up | output error before | after | pack s before | after |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['gptq_seconds_before']:.2f} | {r['gptq_seconds_after']:.2f} | "
                     f"{r['gptq_speedup']:.2f}x | {r['output_error_before']:.4e} | {r['output_error_after']:.4e} | "
                     f"{r['pack_seconds_before']:.3f} | {r['pack_seconds_after']:.3f} |")
    (args.out / "gptq_layer.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    timed_main(main)
