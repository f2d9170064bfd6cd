"""What the losses compare is captured faithfully, for every architecture that can be mapped."""

import copy

import pytest
import torch

from compress.errors import UserError
from compress.models import load_model, resolve
from distill.capture import capture
from tests.conftest import ALL_ARCHS


def routes_attention_through_interface(model) -> bool:
    """What the installed transformers declares for the architecture (it changes between releases:
    GPT-J joined in 5.24)."""
    return bool(getattr(model, "_supports_attention_backend", False))


def test_llama_scores_are_pre_softmax_q_k_and_outputs_unchanged():
    model, _ = load_model(resolve("tiny-llama").path)
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
        with capture(model, hidden=True, attention_layers=[1]) as seen:
            captured_logits = model(ids).logits
    assert torch.allclose(captured_logits, reference, atol=1e-5)
    assert model.config._attn_implementation != "distill_scores"  # restored afterwards
    scores, usable = seen.scores[1]
    assert scores.shape == (2, 4, 12, 12)
    assert torch.equal(usable[0, 0], torch.tril(torch.ones(12, 12, dtype=torch.bool)))
    # Softmax of the usable scores gives back the attention probabilities of eager attention.
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        probs = eager(ids, output_attentions=True).attentions[0]
    masked = scores.masked_fill(~usable, float("-inf"))
    assert torch.allclose(torch.softmax(masked, -1), probs, atol=1e-6)
    assert seen.embedding.shape == (2, 12, 64) and set(seen.hidden) == {1, 2}


def test_bert_padding_marks_keys_unusable():
    model, tok = load_model(resolve("tiny-bert").path)
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad(), capture(model, hidden=False, attention_layers=[2]) as seen:
        model(input_ids=ids, attention_mask=mask)
    _, usable = seen.scores[2]
    assert usable[0].all()
    assert usable[1, 0, :, :2].all() and not usable[1, 0, :, 2:].any()


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_scores_are_captured_where_transformers_routes_attention_and_refused_elsewhere(arch):
    model, _ = load_model(resolve(f"tiny-{arch}").path)
    ids = torch.randint(1, 500, (1, 9), generator=torch.Generator().manual_seed(2))
    if routes_attention_through_interface(model):
        with torch.no_grad(), capture(model, hidden=True, attention_layers=[1]) as seen:
            model(ids)
        scores, usable = seen.scores[1]
        assert scores.shape[0] == 1 and scores.shape[-2:] == (9, 9) and usable.shape[-2:] == (9, 9)
    else:
        with pytest.raises(UserError, match="cannot be mapped for the attention loss"):
            with capture(model, hidden=True, attention_layers=[1]):
                pass


def test_the_families_long_on_the_interface_still_are():
    for arch in ("llama", "mistral", "gpt_neox", "opt", "bert"):
        assert routes_attention_through_interface(load_model(resolve(f"tiny-{arch}").path)[0]), arch


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_hidden_states_are_block_outputs(arch):
    model, _ = load_model(resolve(f"tiny-{arch}").path)
    ids = torch.randint(1, 500, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), capture(model, hidden=True) as seen:
        out = model(ids, output_hidden_states=True)
    assert set(seen.hidden) == set(range(1, model.config.num_hidden_layers + 1))
    assert torch.equal(seen.embedding, out.hidden_states[0])
    assert torch.equal(seen.hidden[1], out.hidden_states[1])


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "qwen2"])
def test_scores_keep_soft_capping_and_sliding_windows(arch):
    """Gemma 2 caps its attention scores (tanh) and alternates sliding and global layers (window 16 here, over 24
    tokens): the capture's attention gives the model's own logits, and its recorded scores are what the model's eager
    attention turns into probabilities, in both kinds of layer."""
    model, _ = load_model(resolve(f"tiny-{arch}").path)
    ids = torch.randint(1, 500, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(ids).logits
        layers = [1, model.config.num_hidden_layers]  # the first (sliding) and the last (global) layer
        with capture(model, hidden=True, attention_layers=layers) as seen:
            captured_logits = model(ids).logits
        eager = copy.deepcopy(model)
        eager.set_attn_implementation("eager")
        probabilities = eager(ids, output_attentions=True).attentions
    torch.testing.assert_close(captured_logits, reference, rtol=0, atol=1e-5)
    for layer in layers:
        scores, usable = seen.scores[layer]
        masked = scores.masked_fill(~usable, float("-inf"))
        torch.testing.assert_close(torch.softmax(masked, -1), probabilities[layer - 1], rtol=0, atol=1e-6)
