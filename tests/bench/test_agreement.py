import torch
import torch.nn.functional as F

from compress.bench.agreement import Reference, kl_topk, reference_rows, rest_mass, top1_matches
from compress.bench.score import score_windows


def _logprobs(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(scale * torch.randn(rows, vocab, generator=g), -1)


def _exact_kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def test_topk_kl_is_exact_when_k_covers_the_vocabulary():
    base, cand = _logprobs(11, 40, 0), _logprobs(11, 40, 1)
    ref_lp, ref_ids = reference_rows(torch.cat([base, base[:1]]), k=40)  # the last row is not predicted
    kl = kl_topk(ref_lp, ref_ids, cand)
    assert torch.allclose(kl, _exact_kl(base, cand), rtol=1e-4, atol=1e-6)
    assert torch.allclose(rest_mass(ref_lp.double()), torch.zeros(11, dtype=torch.float64), atol=1e-6)


def test_topk_kl_is_a_lower_bound_and_positive_for_different_models():
    base, cand = _logprobs(50, 300, 2), _logprobs(50, 300, 3)
    ref_lp, ref_ids = reference_rows(torch.cat([base, base[:1]]), k=16)
    kl = kl_topk(ref_lp, ref_ids, cand)
    exact = _exact_kl(base, cand)
    assert (kl > 0).all()
    assert (kl <= exact + 1e-5).all()
    assert F.kl_div(cand, base, log_target=True, reduction="none").sum(-1).allclose(exact, atol=1e-5)


def test_kl_of_a_distribution_with_itself_is_zero_and_top1_agrees():
    base = _logprobs(20, 64, 4)
    ref_lp, ref_ids = reference_rows(torch.cat([base, base[:1]]), k=8)
    assert kl_topk(ref_lp, ref_ids, base).abs().max() < 1e-6
    assert top1_matches(ref_ids, base).all()


def test_a_model_against_itself_has_kl_zero_and_full_top1_agreement(tiny_llama):
    model, _ = tiny_llama
    windows = [torch.randint(0, 512, (32,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    _, reference = score_windows(model, windows, torch.device("cpu"), make_reference_k=64)
    result, _ = score_windows(model, windows, torch.device("cpu"), reference=reference)
    assert result.agreement.positions == 4 * 31
    assert result.agreement.kl_mean < 1e-6 and result.agreement.kl_max < 1e-5
    assert result.agreement.top1_agreement == 1.0


def test_a_perturbed_model_disagrees(tiny_llama):
    import copy

    model, _ = tiny_llama
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    windows = [torch.randint(0, 512, (32,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    _, reference = score_windows(model, windows, torch.device("cpu"), make_reference_k=64)
    result, _ = score_windows(noisy, windows, torch.device("cpu"), reference=reference)
    assert result.agreement.kl_mean > 1e-4
    assert result.agreement.top1_agreement < 1.0


def test_reference_round_trips_through_its_file(tmp_path):
    ref = Reference(torch.randn(5, 3), torch.randint(0, 9, (5, 3), dtype=torch.int32), {"k": 3})
    ref.save(tmp_path / "r.safetensors")
    back = Reference.load(tmp_path / "r.safetensors")
    assert torch.equal(back.logprobs, ref.logprobs) and torch.equal(back.token_ids, ref.token_ids)
    assert back.meta == {"k": 3}
