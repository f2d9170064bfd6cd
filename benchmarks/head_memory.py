"""Peak memory of quantizing a large output head with --lm-head-bits 8, chunked vs whole-matrix.

A Llama-3-8B-shaped head (128,256 x 4,096, stored in bfloat16: 1 GiB; 2 GiB in float32) is quantized
to 8 bits per output channel (RTN), packed, and its float16 copy made, as `compress quantize
--lm-head-bits 8` does while streaming. Each variant runs in its own process; the figure is the peak
RSS (VmHWM, reset after the head is made) above the RSS with the head in memory:

* chunked: what the code does (compress.quant.head.pack_head / float16_rows, 8,192 rows at a time);
* whole matrix: the same functions with one chunk of every row, from a float32 copy of the head, and
  the float16 copy made through the layer's full embedding lookup (the path before chunking).

    OMP_NUM_THREADS=2 python benchmarks/head_memory.py

writes reports/head_memory.md and .json. The target: the chunked peak stays below 2 float32 copies
of the head (4 GiB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOCAB, WIDTH = 128_256, 4_096


def run_variant(variant: str) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    from compress.quant.config import WeightQuantConfig
    from compress.quant.head import float16_rows, pack_head
    from compress.runtime import current_rss_bytes, peak_rss_bytes

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    g = torch.Generator().manual_seed(0)
    head = torch.empty(VOCAB, WIDTH, dtype=torch.bfloat16)
    for start in range(0, VOCAB, 8192):  # made in chunks: no float32 copy of the whole head
        head[start:start + 8192] = torch.randn(min(8192, VOCAB - start), WIDTH, generator=g) * 0.02
    cfg = WeightQuantConfig(bits=8, group_size=-1, sym=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = current_rss_bytes()
    started = time.perf_counter()
    if variant == "chunked":
        layer = pack_head(head, None, cfg)
        rows = float16_rows(layer)
    else:
        layer = pack_head(head.float(), None, cfg, chunk_rows=VOCAB)
        rows = layer.embedding_rows(torch.arange(VOCAB)).to(torch.float16)
    seconds = time.perf_counter() - started
    kept = sum(t.numel() * t.element_size() for t in (*layer.state_dict().values(), rows))
    return {"variant": variant, "peak_above_head_bytes": peak_rss_bytes() - base, "seconds": round(seconds, 2),
            "output_bytes": kept, "head_bf16_bytes": head.numel() * 2, "head_fp32_bytes": head.numel() * 4}


def main() -> int:
    results = []
    for variant in ("chunked", "whole matrix"):
        done = subprocess.run([sys.executable, __file__, "--variant", variant], capture_output=True, text=True,
                              env=os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    gib = 1 << 30
    fp32 = results[0]["head_fp32_bytes"]
    lines = ["# Quantizing a 128k x 4096 output head (--lm-head-bits 8): peak memory", "",
             "Reproduce: `OMP_NUM_THREADS=2 python benchmarks/head_memory.py` (each variant in its own process; "
             "peak RSS = VmHWM, reset once the bfloat16 head is in memory).", "",
             "| variant | peak above the head (GiB) | in float32 copies of the head | output held (GiB) | seconds |",
             "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['variant']} | {r['peak_above_head_bytes'] / gib:.2f} | "
                     f"{r['peak_above_head_bytes'] / fp32:.2f} | {r['output_bytes'] / gib:.2f} | {r['seconds']} |")
    chunked = results[0]["peak_above_head_bytes"]
    lines += ["", f"Target: below 2 float32 copies of the head ({2 * fp32 / gib:.0f} GiB): "
              f"{'met' if chunked < 2 * fp32 else 'NOT met'} ({chunked / fp32:.2f} copies). The output itself "
              "(packed 8-bit head + float16 copy for other loaders) is most of what is held.",
              f"Machine: {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}."]
    out = ROOT / "reports" / "head_memory.md"
    out.write_text("\n".join(lines) + "\n")
    (ROOT / "reports" / "head_memory.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--variant":
        print(json.dumps(run_variant(sys.argv[2])))
        sys.exit(0)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
