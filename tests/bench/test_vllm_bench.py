"""compress bench --backend vllm: perplexity and KL from vLLM's top-k prompt log-probabilities (the math, checked on
synthetic distributions), the one-line refusals, and (slow) a real run in vLLM's CPU build whose figures match our
loader's, with serving figures at 1, 4 and 16 clients that the report shows."""

import json

import pytest
import torch

from compress.bench.agreement import Reference, kl_known, kl_topk, reference_rows
from compress.bench.vllm_bench import window_scores
from compress.cli import main


def logprobs(rows, vocab, seed, scale=3.0):
    return torch.log_softmax(scale * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)), -1)


def test_kl_on_known_tokens_equals_topk_kl_when_all_are_known_and_bounds_it_below_otherwise():
    base, cand = logprobs(30, 200, 0), logprobs(30, 200, 1)
    ref_lp, ref_ids = reference_rows(torch.cat([base, base[:1]]), k=16)
    at_ref = cand.gather(1, ref_ids.long()).double()
    assert torch.allclose(kl_known(ref_lp, at_ref), kl_topk(ref_lp, ref_ids, cand), rtol=1e-5, atol=1e-7)
    partial = at_ref.clone()
    partial[:, 8:] = float("nan")  # the candidate's top-k missed half of the base's
    coarse = kl_known(ref_lp, partial)
    assert (coarse <= kl_topk(ref_lp, ref_ids, cand) + 1e-6).all() and (coarse > 0).all()
    assert kl_known(ref_lp, ref_lp.double()).abs().max() < 1e-6


def as_vllm(window_logprobs: torch.Tensor, window: torch.Tensor, k: int) -> list[dict[int, float]]:
    """What vLLM returns for a window: nothing at the first position, then each position's top-k and its own token."""
    positions = [{}]
    for i in range(1, len(window)):
        row = window_logprobs[i - 1]
        values, ids = row.topk(k)
        known = dict(zip(ids.tolist(), values.tolist()))
        known[int(window[i])] = float(row[window[i]])
        positions.append(known)
    return positions


def test_window_scores_are_the_perplexity_kl_and_top1_of_the_same_distributions():
    vocab, length = 100, 12
    windows = [torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    base = [logprobs(length, vocab, 10 + s) for s in range(3)]
    cand = [logprobs(length, vocab, 20 + s) for s in range(3)]
    rows = [reference_rows(b, 8) for b in base]
    reference = Reference(torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]))
    perplexity, agreement = window_scores(windows, [as_vllm(c, w, vocab) for c, w in zip(cand, windows)],
                                          reference, vocab)
    nll = torch.cat([-c[:-1].gather(1, w[1:, None]).squeeze(1) for c, w in zip(cand, windows)])
    assert perplexity.tokens == 3 * (length - 1) and perplexity.perplexity == pytest.approx(float(nll.mean().exp()))
    exact = torch.cat([kl_topk(r[0], r[1], c[:-1]) for r, c in zip(rows, cand)])
    assert agreement.kl_mean == pytest.approx(float(exact.double().mean()), rel=1e-5)
    top1 = torch.cat([(c[:-1].argmax(1) == r[1][:, 0].long()) for r, c in zip(rows, cand)]).double().mean()
    assert agreement.top1_agreement == pytest.approx(float(top1)) and agreement.top_k == 8


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "lambada_openai"], "--tasks runs on a model loaded here"),
    (["--dtype", "float32"], "compute in bfloat16 or float16"),
])
def test_what_vllm_cannot_measure_is_refused_in_one_line(extra, message, tmp_path, capsys, monkeypatch, calib_file):
    from compress.api import QuantizeRequest, quantize

    monkeypatch.setenv("COMPRESS_VLLM_PYTHON", "/bin/true")  # counts as set up: the refusal comes first
    folder = quantize(QuantizeRequest(model="tiny-llama", method="rtn", out=str(tmp_path / "q"), progress=False,
                                      device="cpu")).folder
    assert main(["bench", str(folder), "--backend", "vllm", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_vllm_not_set_up_is_one_line_naming_the_setup_command(capsys, monkeypatch):
    monkeypatch.setattr("compress.backends.vllm_env.vllm_python", lambda: None)
    assert main(["bench", "tiny-llama", "--backend", "vllm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "compress setup vllm" in err


@pytest.mark.slow
def test_bench_in_vllm_scores_like_our_loader_and_serves_at_three_levels(tmp_path, calib_file):
    """A tiny Llama with 32-wide heads (vLLM's CPU attention needs them), W4 by default, against its float base."""
    from transformers import AutoModelForCausalLM

    from compress.api import QuantizeRequest, quantize
    from compress.backends.vllm_env import vllm_python
    from compress.bench.result import BenchResult
    from compress.tiny import tiny_config, tiny_tokenizer

    if vllm_python() is None:
        pytest.skip("vLLM is not set up here: run `compress setup vllm`")
    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size, config.head_dim = 128, 256, 32
    torch.manual_seed(0)
    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    folder = quantize(QuantizeRequest(model=str(base), method="rtn", out=str(tmp_path / "w4"), progress=False,
                                      device="cpu")).folder
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text(calib_file.read_text())
    common = ["--eval", str(eval_file), "--seqlen", "64", "--windows", "4", "--base-dtype", "float32", "--no-progress"]
    assert main(["bench", str(folder), "--base", str(base), "--out", str(tmp_path / "ours.json"), "--backend",
                 "dequant", "--dtype", "bfloat16", "--no-speed", *common]) == 0
    assert main(["bench", str(folder), "--base", str(base), "--out", str(tmp_path / "vllm.json"), "--backend", "vllm",
                 "--prompt-tokens", "16", "--decode-tokens", "8", *common]) == 0
    ours, theirs = (BenchResult.read(tmp_path / f"{n}.json") for n in ("ours", "vllm"))
    assert theirs.model.backend == "vllm" and "CPUWNA16LinearKernel" in theirs.model.kernel
    assert theirs.accuracy.perplexity.tokens == ours.accuracy.perplexity.tokens
    assert abs(theirs.accuracy.perplexity.perplexity / ours.accuracy.perplexity.perplexity - 1) < 0.01
    assert abs(theirs.accuracy.agreement.kl_mean - ours.accuracy.agreement.kl_mean) < 0.01
    levels = theirs.serving.levels
    assert [level.clients for level in levels] == [1, 4, 16] and all(level.requests == 2 * level.clients
                                                                      for level in levels)
    assert all(level.output_tokens_per_s > 0 and level.ttft_ms > 0 for level in levels)
    assert theirs.serving.peak_rss_bytes > 100 * 2**20 and theirs.memory.peak_kind.startswith("VmHWM")
    assert main(["report", str(tmp_path / "ours.json"), str(tmp_path / "vllm.json"), "--out",
                 str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "README.md").read_text() if (tmp_path / "report" / "README.md").exists() else \
        next((tmp_path / "report").glob("*.md")).read_text()
    assert "## Serving" in text and "CPUWNA16LinearKernel" in text
    json.loads((tmp_path / "vllm.json").read_text())  # a plain JSON record
