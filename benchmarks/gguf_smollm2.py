"""Our GPTQ W4 g32 codes in GGUF (Q4_0 / Q4_1) beside llama.cpp's own quantization of the same float model,
all run by llama.cpp (llama-cpp-python) on the same WikiText-2 token ids, with KL against our fp32 model.

    OMP_NUM_THREADS=2 COMPRESS_DATA_DIR=../shared/data python benchmarks/gguf_smollm2.py

writes reports/gguf_smollm2.json and reports/gguf_smollm2.md. Note (../shared/MODELS.md): the offline
SmolLM2 weights were dequantized from 4-bit blocks of 32, so every 4-bit grid of 32 lines up with them and
looks nearly lossless; the comparison between tools is still on equal terms.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, offline_defaults  # noqa: E402

offline_defaults()

import numpy as np  # noqa: E402
import torch  # noqa: E402

MODEL = "smollm2-135m"


def llama_cpp_scores(gguf: Path, windows: list[torch.Tensor], reference, threads: int) -> dict:
    """Perplexity, KL and top-1 against ``reference`` of llama.cpp running ``gguf`` on ``windows``."""
    from llama_cpp import Llama

    from compress.bench.agreement import kl_topk, top1_matches

    llm = Llama(model_path=str(gguf), n_ctx=len(windows[0]), n_threads=threads, n_threads_batch=threads,
                logits_all=True, verbose=False, n_batch=len(windows[0]))
    nll, count, kls, matches, offset = 0.0, 0, [], [], 0
    started = time.perf_counter()
    try:
        for window in windows:
            ids = window.tolist()
            llm.reset()
            llm.eval(ids)
            logits = torch.from_numpy(np.asarray(llm.scores[: len(ids)], dtype=np.float32))
            logprobs = torch.log_softmax(logits.double(), dim=1).float()
            targets = window[1:].long()
            nll -= float(logprobs[:-1].gather(1, targets[:, None]).sum())
            count += len(targets)
            rows = slice(offset, offset + len(targets))
            kls.append(kl_topk(reference.logprobs[rows], reference.token_ids[rows], logprobs[:-1]))
            matches.append(top1_matches(reference.token_ids[rows], logprobs[:-1]))
            offset += len(targets)
    finally:
        llm.close()
    return {"perplexity": float(np.exp(nll / count)), "kl_mean": float(torch.cat(kls).double().mean()),
            "top1_agreement": float(torch.cat(matches).double().mean()), "tokens": count,
            "seconds": round(time.perf_counter() - started, 1), "bytes": gguf.stat().st_size}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "gguf_smollm2")
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    threads = int(os.environ["OMP_NUM_THREADS"])
    torch.set_num_threads(threads)
    import llama_cpp

    from compress.api import QuantizeRequest, quantize
    from compress.bench.score import score_windows
    from compress.checkpoint import load_quantized
    from compress.data import eval_windows, load_text, tokenize
    from compress.export_gguf.run import export_gguf
    from compress.models import load_model, resolve

    model, tokenizer = load_model(resolve(MODEL).path)
    text, record = load_text("wikitext2:test")
    windows, info = eval_windows(tokenize(tokenizer, text), record, 512, args.eval_windows)
    fp32, reference = score_windows(model, windows, torch.device("cpu"), make_reference_k=256, tune_threads=False)
    del model
    rows = [{"name": "fp32 (ours, torch)", "perplexity": fp32.perplexity.perplexity}]
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        work = Path(work)
        f16 = work / "f16.gguf"
        export_gguf(MODEL, "f16", str(f16))
        rows.append({"name": "f16 GGUF (llama.cpp)", **llama_cpp_scores(f16, windows, reference, threads)})
        for kind, sym, ftype in (("q4_0", True, llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0),
                                 ("q4_1", False, llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1)):
            started = time.perf_counter()
            result = quantize(QuantizeRequest(model=MODEL, bits=4, group_size=32, sym=sym, act_order=False,
                                              nsamples=args.nsamples, out=str(work / f"gptq-{kind}"), progress=False,
                                              device="cpu"))
            ours_gguf = work / f"gptq-{kind}.gguf"
            export_gguf(str(result.folder), kind, str(ours_gguf))
            seconds = time.perf_counter() - started
            loader = score_windows(load_quantized(result.folder)[0], windows, torch.device("cpu"), reference=reference,
                                   tune_threads=False)[0]
            rows.append({"name": f"our GPTQ W4 g32 -> {kind} (llama.cpp)", "type": kind,
                         "settings": {k: result.manifest["config"][k] for k in ("sym", "scale_search", "act_order")},
                         "quantize_seconds": round(seconds, 1),
                         "our_loader_perplexity": loader.perplexity.perplexity,
                         **llama_cpp_scores(ours_gguf, windows, reference, threads)})
            theirs = work / f"llamacpp-{kind}.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            params.nthread = threads
            started = time.perf_counter()
            if llama_cpp.llama_model_quantize(str(f16).encode(), str(theirs).encode(), params) != 0:
                raise RuntimeError(f"llama.cpp could not quantize {f16} to {kind}")
            rows.append({"name": f"llama.cpp's own {kind} (llama.cpp)", "type": kind,
                         "quantize_seconds": round(time.perf_counter() - started, 1),
                         **llama_cpp_scores(theirs, windows, reference, threads)})
            print(json.dumps(rows[-2:]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"evaluation": info.to_dict(), "rows": rows}, indent=2))
    base = rows[0]["perplexity"]
    lines = [
        "# SmolLM2-135M: our GPTQ codes in GGUF beside llama.cpp's own quantization",
        "",
        f"Generated by `python benchmarks/gguf_smollm2.py` on {time.strftime('%Y-%m-%d')}, CPU, {threads} threads. "
        "CUDA was not measured.",
        "",
        f"- Every GGUF row is run by llama.cpp (llama-cpp-python {llama_cpp.__version__}) on the same token ids: the "
        f"first {info.count} x {info.seqlen} WikiText-2 test windows, no BOS. KL: KL(fp32 || row) per token on the "
        "fp32 model's top-256 tokens plus the rest as one bucket; the fp32 row is our torch model.",
        f"- Ours: `compress quantize {MODEL} --bits 4 --group-size 32 --no-act-order [--sym]` ({args.nsamples} x 512 "
        "calibration windows; asymmetric grids searched with the inputs' weights unless --sym), then "
        "`compress export-gguf --type q4_0|q4_1`: the codes unchanged. llama.cpp's own: `compress export-gguf "
        "--type f16` of the float model, then llama.cpp's quantizer (`llama_model_quantize`, its default "
        "settings: rounding within each block, the embedding and output in their default types).",
        "- llama.cpp's importance matrix is not compared: llama-cpp-python exposes no way to compute one.",
        "- The offline SmolLM2 weights were dequantized from Q4_1 blocks of 32, so every 4-bit grid of 32 lines up "
        "with them: all 4-bit rows here look nearly lossless.",
        "",
        "| row | perplexity | vs fp32 | KL | top-1 | file MiB | our loader's perplexity on the same codes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kl = f"{r['kl_mean']:.4f}" if "kl_mean" in r else "-"
        top1 = f"{100 * r['top1_agreement']:.1f}%" if "top1_agreement" in r else "-"
        size = f"{r['bytes'] / 2**20:.1f}" if "bytes" in r else "-"
        loader = f"{r['our_loader_perplexity']:.3f}" if "our_loader_perplexity" in r else "-"
        lines.append(f"| {r['name']} | {r['perplexity']:.3f} | x{r['perplexity'] / base:.3f} | {kl} | {top1} | {size} | "
                     f"{loader} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
