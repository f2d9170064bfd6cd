"""CompressLM against lm-eval's own HuggingFace model (HFLM) on the same tiny model: the same
log-likelihoods, greedy flags, rolling log-likelihoods and generations, however the requests are batched."""

import pytest
import torch

pytest.importorskip("lm_eval", reason="install the [eval] extra")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from compress.models import load_model, resolve  # noqa: E402
from compress.tasks.lm import CompressLM  # noqa: E402

PAIRS = [("The quick brown fox", " jumps over the lazy dog"), ("Question: what is 2 + 2?\nAnswer:", " 4"),
         ("", "an empty context"), ("a context with a trailing space ", "and its continuation"),
         ("Paragraph 3: the model", " reads"), ("x" * 40, " y")]


def requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_model(resolve("tiny-llama").path)
    return model.eval(), tokenizer


@pytest.mark.parametrize("batch_size", [None, 1, 2])
def test_loglikelihoods_match_lm_evals_own_model(tiny, batch_size):
    model, tokenizer = tiny
    theirs = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, device="cpu", max_length=64)
    ours = CompressLM(model, tokenizer, torch.device("cpu"), 64, 512, batch_size)
    expected = theirs.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    got = ours.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    for (e_lp, e_greedy), (g_lp, g_greedy) in zip(expected, got):
        assert g_lp == pytest.approx(e_lp, abs=1e-4) and g_greedy == e_greedy
    # Rolling windows over a text longer than the context (64 tokens): the same total.
    text = " ".join(f"word{i}" for i in range(60))
    expected = theirs.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    got = ours.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    assert got[0] == pytest.approx(expected[0], rel=1e-5)


def test_greedy_generation_matches_lm_evals_own_model(tiny):
    model, tokenizer = tiny
    theirs = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, device="cpu", max_length=64)
    ours = CompressLM(model, tokenizer, torch.device("cpu"), 64, 512)
    args = [("The quick brown", {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False})]
    assert ours.generate_until(requests("generate_until", args)) == \
        theirs.generate_until(requests("generate_until", args), disable_tqdm=True)
