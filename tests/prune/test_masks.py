"""Pruning-mask math on matrices: exact sparsity, N:M groups, and Wanda beating magnitude where
input features differ in scale (the case Wanda was made for)."""

import pytest
import torch

from compress.errors import UserError
from compress.prune.masks import (Pattern, magnitude_scores, make_mask, n_m_mask, parse_pattern, sparsity_of,
                                  unstructured_mask, wanda_scores)


def _weight(rows=16, columns=64, seed=0):
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.7])
def test_row_masks_remove_exactly_the_asked_fraction_of_each_row(sparsity):
    w = _weight()
    mask = unstructured_mask(magnitude_scores(w), sparsity, "row")
    assert torch.all((~mask).sum(1) == int(64 * sparsity))
    # What is removed is the smallest: every removed |w| is at most every kept |w| of its row.
    for row in range(w.shape[0]):
        if (~mask[row]).any():
            assert w[row][~mask[row]].abs().max() <= w[row][mask[row]].abs().min()


def test_layer_masks_compare_across_rows():
    w = _weight()
    w[0] *= 100.0  # one loud row keeps all its weights under a layer-wide comparison
    mask = unstructured_mask(magnitude_scores(w), 0.5, "layer")
    assert abs(sparsity_of(mask) - 0.5) < 1e-9
    assert mask[0].all()


def test_ties_do_not_change_the_count():
    mask = unstructured_mask(torch.ones(4, 8), 0.5, "row")
    assert torch.all((~mask).sum(1) == 4)


@pytest.mark.parametrize("text,n,m", [("2:4", 2, 4), ("4:8", 4, 8)])
def test_n_m_masks_keep_n_of_every_m(text, n, m):
    pattern = parse_pattern(text)
    assert (pattern.n, pattern.m) == (n, m) and pattern.sparsity == 1 - n / m
    w = _weight()
    mask = make_mask(magnitude_scores(w), 0.0, pattern)
    groups = mask.reshape(16, -1, m)
    assert torch.all(groups.sum(2) == n)  # so every group of 4 has exactly (at least) 2 zeros for 2:4
    kept = w.abs().reshape(16, -1, m)
    assert torch.all(kept.masked_fill(~groups, float("inf")).min(2).values
                     >= kept.masked_fill(groups, -1.0).max(2).values)


@pytest.mark.parametrize("text", ["3:2", "0:4", "4:4", "2-4", "half", "2:"])
def test_bad_patterns_are_user_errors(text):
    with pytest.raises(UserError, match="pattern"):
        parse_pattern(text)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_sparsity_outside_0_1_is_a_user_error(sparsity):
    with pytest.raises(UserError, match=r"outside \[0, 1\)"):
        unstructured_mask(_weight(), sparsity)


def test_n_m_needs_a_multiple_of_m_inputs():
    with pytest.raises(UserError, match="multiple of 4"):
        n_m_mask(torch.ones(2, 6), Pattern(2, 4))


@pytest.mark.parametrize("pattern", [Pattern(), Pattern(2, 4)])
def test_wanda_output_error_is_below_magnitude_when_inputs_differ_in_scale(pattern):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=g)
    scale = torch.ones(64)
    scale[::8] = 20.0  # a few outlier input features, as in LLM activations
    x = torch.randn(512, 64, generator=g) * scale
    reference = x @ w.T
    norms = x.norm(dim=0)
    errors = {}
    for name, scores in (("magnitude", magnitude_scores(w)), ("wanda", wanda_scores(w, norms))):
        mask = make_mask(scores, 0.5, pattern, "row")
        errors[name] = ((x @ (w * mask).T - reference) ** 2).mean().item()
    assert errors["wanda"] < 0.5 * errors["magnitude"]


def test_wanda_checks_the_norm_shape():
    with pytest.raises(ValueError):
        wanda_scores(torch.ones(2, 4), torch.ones(3))
