import math

import torch
import torch.nn.functional as F

from compress.bench.perplexity import perplexity_from_nll, window_nll
from compress.bench.score import score_windows
from tests.bench.conftest import PerfectLM, counting_windows


def test_window_nll_is_cross_entropy_of_the_next_token():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 17, generator=g)
    ids = torch.randint(0, 17, (9,), generator=g)
    nll = window_nll(torch.log_softmax(logits, -1), ids)
    assert nll.shape == (8,)
    assert torch.allclose(nll, F.cross_entropy(logits[:-1], ids[1:], reduction="none"), atol=1e-6)


def test_a_model_that_always_predicts_the_right_token_has_perplexity_one():
    result, _ = score_windows(PerfectLM(), counting_windows(5, 16), torch.device("cpu"), batch_size=2)
    assert result.perplexity.tokens == 5 * 15 and result.perplexity.windows == 5
    assert abs(result.perplexity.perplexity - 1.0) < 1e-6


def test_a_uniform_model_has_perplexity_equal_to_the_vocabulary():
    model = PerfectLM(vocab=32, margin=0.0)
    result, _ = score_windows(model, counting_windows(3, 8), torch.device("cpu"))
    assert abs(result.perplexity.perplexity - 32.0) < 1e-4


def test_batching_does_not_change_the_figure(tiny_llama):
    model, _ = tiny_llama
    windows = [torch.randint(0, 512, (24,), generator=torch.Generator().manual_seed(i)) for i in range(5)]
    one, _ = score_windows(model, windows, torch.device("cpu"), batch_size=1)
    three, _ = score_windows(model, windows, torch.device("cpu"), batch_size=3)
    assert math.isclose(one.perplexity.perplexity, three.perplexity.perplexity, rel_tol=1e-5)


def test_an_overflowing_nll_reports_infinity_not_a_crash():
    assert perplexity_from_nll(1e6, 10, 1).perplexity == float("inf")


def test_thread_tuning_keeps_the_figure_and_restores_the_thread_count(tiny_llama, monkeypatch):
    import compress.bench.score as score_module

    monkeypatch.setattr(score_module, "other_runnable_tasks", lambda: 2.0)  # as if the machine were shared
    model, _ = tiny_llama
    windows = [torch.randint(0, 512, (24,), generator=torch.Generator().manual_seed(i)) for i in range(12)]
    before = torch.get_num_threads()
    tuned, _ = score_windows(model, windows, torch.device("cpu"), batch_size=1, tune_threads=True)
    fixed, _ = score_windows(model, windows, torch.device("cpu"), batch_size=1, tune_threads=False)
    assert torch.get_num_threads() == before
    assert fixed.threads == [before]
    assert set(tuned.threads) == {before, max(1, before // 2), 1}  # every candidate was tried
    assert math.isclose(tuned.perplexity.perplexity, fixed.perplexity.perplexity, rel_tol=1e-5)
