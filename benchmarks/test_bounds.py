"""The figures the tests' quality bounds are set just above: each bound sits a little above what the method
reaches today, and below what a broken method (GPTQ fallen back to RTN, structured pruning that cut the wrong
channels) reaches. Writes reports/test_bounds.json and prints each figure; the tests quote them.

    OMP_NUM_THREADS=2 COMPRESS_DATA_DIR=../shared/data python benchmarks/test_bounds.py [--skip-real]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def smollm2_figures(tmp: Path) -> dict:
    """The slow real-model tests' protocol: 4 WikiText-2 windows of 256, SST-2 calibration 16 x 256."""
    from compress.api import PruneRequest, QuantizeRequest, prune, quantize
    from compress.bench.score import score_windows
    from compress.checkpoint import load_quantized
    from compress.data import eval_windows, load_text, tokenize
    from compress.models import load_model, resolve
    from distill.config import load_config
    from distill.run import run as distill

    cpu = torch.device("cpu")
    model, tokenizer = load_model(resolve("smollm2-135m").path)
    text, record = load_text("wikitext2:test")
    windows, _ = eval_windows(tokenize(tokenizer, text), record, 256, max_windows=4)

    def ppl(m):
        return score_windows(m, windows, cpu)[0].perplexity.perplexity

    fp = ppl(model)
    figures = {"fp32": fp}
    settings = dict(model="smollm2-135m", bits=4, group_size=128, calib="sst2:train", nsamples=16, seqlen=256,
                    progress=False, device="cpu")
    errors = {}
    for name, method in {"gptq": {"method": "gptq"}, "rtn": {"method": "rtn"},
                         "rtn_weighted": {"method": "rtn", "scale_search": "weighted"}}.items():
        result = quantize(QuantizeRequest(out=str(tmp / name), **settings | method))
        figures[f"{name}_w4g128_ratio"] = ppl(load_quantized(result.folder)[0]) / fp
        errors[name] = sum(layer["proxy_loss"] or 0 for layer in result.manifest["layers"])
    figures["gptq_layer_error"], figures["rtn_weighted_layer_error"] = errors["gptq"], errors["rtn_weighted"]
    figures["gptq_over_rtn_same_grid_layer_error"] = errors["gptq"] / errors["rtn_weighted"]
    from transformers import AutoModelForCausalLM

    pruned = prune(PruneRequest(model="smollm2-135m", method="structured", target="mlp", sparsity=0.25,
                                calib="sst2:train", nsamples=16, seqlen=256, out=str(tmp / "s"), progress=False,
                                device="cpu"))
    figures["structured_mlp25_ratio"] = ppl(AutoModelForCausalLM.from_pretrained(pruned.folder).eval()) / fp
    config = load_config(ROOT / "configs" / "distill" / "smollm2-l10.yaml", [
        "max_examples=48", "eval_windows=2", "stages.0.max_steps=6", "stages.1.max_steps=2", "checkpoint_every=0",
        "progress=false", f"out={tmp / 'smollm2-student'}"])
    distilled = distill(config)["figures"]
    figures["distill_smollm2_after_over_before"] = distilled["student_after"] / distilled["student_before"]
    return figures


def tiny_figures(tmp: Path, calib: Path) -> dict:
    """tests/test_api.py's 30 cases (every tiny architecture x rtn, gptq, awq) and tests/distill/test_run.py's
    student."""
    from compress.api import QuantizeRequest, quantize
    from compress.models import load_model, resolve
    from compress.tiny import TINY_CONFIGS
    from distill.config import config_from_dict
    from distill.run import run as distill
    from tests.conftest import model_output

    worst: dict[str, float] = {}
    for method in ("rtn", "gptq", "awq"):
        for arch in TINY_CONFIGS:
            result = quantize(QuantizeRequest(model=f"tiny-{arch}", method=method, bits=4, group_size=32,
                                              calib=str(calib), nsamples=8, seqlen=64, out=str(tmp / f"{arch}-{method}"),
                                              progress=False, device="cpu", in_memory=True))
            torch.manual_seed(0)
            ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
            ours = model_output(result.model, ids)
            original = model_output(load_model(resolve(f"tiny-{arch}").path)[0], ids)
            rel = float((ours - original).norm() / original.norm())
            worst[f"{method}:{arch}"] = rel
    from tests.distill.test_run import BASE

    values = json.loads(json.dumps(BASE)) | {"data": str(calib), "eval": str(calib), "out": str(tmp / "student")}
    figures = distill(config_from_dict(values))["figures"]
    return {"quantize_relative_logit_error": worst,
            "quantize_relative_logit_error_max": max(worst.values()),
            "distill_tiny_after_over_before": figures["student_after"] / figures["student_before"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-real", action="store_true", help="only the tiny-model figures")
    args = parser.parse_args()
    from compress.tiny import _TRAINING_TEXT

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        calib = tmp / "calib.txt"
        calib.write_text("\n\n".join(f"{i}. {_TRAINING_TEXT}" for i in range(20)))
        figures = tiny_figures(tmp, calib)
        if not args.skip_real:
            figures |= smollm2_figures(tmp)
    out = ROOT / "reports" / "test_bounds.json"
    out.write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
