"""TinyBERT data augmentation on tiny random masked-LMs: shape, determinism, replacement rules, refusals."""

from __future__ import annotations

import pytest
import torch
import transformers

from compress.errors import UserError
from compress.tiny import tiny_config, tiny_tokenizer
from distill.augment import AugmentConfig, augment_rows

ROWS = [
    ("the model is loaded and the result is saved", 1),
    ("memory stays close to the size of a single block", 0),
    ("perplexity is measured on windows of text", 1),
]


def _save_bert(folder, head: type, architectures: list[str], tokenizer) -> str:
    config = tiny_config("bert")
    config.vocab_size = len(tokenizer)
    config.architectures = architectures
    torch.manual_seed(0)
    head(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def mlm(tmp_path_factory) -> str:
    """A tiny random BERT masked-LM with the project's byte-level BPE tokenizer, given a mask token."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"mask_token": "<mask>"})
    return _save_bert(tmp_path_factory.mktemp("mlm"), transformers.BertForMaskedLM, ["BertForMaskedLM"], tokenizer)


def _run(mlm: str, rows=ROWS, **kwargs) -> list[tuple[str, int]]:
    return augment_rows(rows, AugmentConfig(mlm=mlm, **kwargs), progress=False)


def test_originals_first_then_copies_with_their_labels(mlm):
    out = _run(mlm, copies=3, p_replace=0.5)
    assert len(out) == len(ROWS) * (3 + 1)
    assert out[:len(ROWS)] == ROWS
    for i, (_, label) in enumerate(ROWS):
        copies = out[len(ROWS) + 3 * i: len(ROWS) + 3 * (i + 1)]
        assert [lab for _, lab in copies] == [label] * 3


def test_no_replacement_gives_the_originals_back(mlm):
    out = _run(mlm, copies=2, p_replace=0.0)
    assert out[len(ROWS):] == [row for row in ROWS for _ in range(2)]


def test_replacing_every_word_changes_words_but_not_their_count(mlm):
    out = _run(mlm, copies=2, p_replace=1.0)
    copies = out[len(ROWS):]
    originals = [row for row in ROWS for _ in range(2)]
    assert any(text != original for (text, _), (original, _) in zip(copies, originals))
    for (text, _), (original, _) in zip(copies, originals):
        assert len(text.split()) == len(original.split())
        for new, old in zip(text.split(), original.split()):
            assert new == old or new.casefold() != old.casefold()  # never "replaced" by itself
        assert "<mask>" not in text and "<|endoftext|>" not in text and text.isprintable()


def test_seed_decides_the_output_and_batch_size_does_not(mlm):
    first = _run(mlm, copies=3, p_replace=0.5, seed=0)
    assert _run(mlm, copies=3, p_replace=0.5, seed=0) == first
    assert _run(mlm, copies=3, p_replace=0.5, seed=0, batch_size=1) == first
    assert _run(mlm, copies=3, p_replace=0.5, seed=1) != first


def test_zero_copies_returns_the_rows(mlm):
    assert _run(mlm, copies=0) == ROWS


@pytest.mark.parametrize("key, value", [("copies", -1), ("p_replace", 1.5), ("p_replace", -0.1), ("top_k", 0)])
def test_bad_config_values_are_user_errors(key, value):
    with pytest.raises(UserError, match=f"augment.{key}"):
        AugmentConfig(mlm="unused", **{key: value})


def test_bare_encoder_is_refused(tmp_path):
    folder = _save_bert(tmp_path, transformers.BertModel, ["BertModel"], tiny_tokenizer())
    with pytest.raises(UserError, match="has no masked-LM head"):
        _run(folder, copies=1)


def test_head_weights_missing_despite_the_architecture_is_refused(tmp_path):
    # Like an ELECTRA discriminator: "*ForPreTraining" in config.json, but no masked-LM weights to load.
    folder = _save_bert(tmp_path, transformers.BertModel, ["BertForPreTraining"], tiny_tokenizer())
    with pytest.raises(UserError, match="has no masked-LM head"):
        _run(folder, copies=1)


def test_wordpiece_rules_with_a_passed_model():
    """BERT's own tokenizer: only whole vocabulary words come in, multi-piece words and spacing stay."""
    words = ["the", "a", "cat", "dog", "sat", "on", "mat", "walk", "run", "big", "small", "red", "blue"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "##ing", "##s", "##ed"]
    tokenizer = transformers.BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    config = tiny_config("bert")
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config).eval()
    rows = [("The cat  sat on the walking mat", 0), ("a big dog runs", 1)]
    cfg = AugmentConfig(mlm="passed", copies=4, p_replace=1.0, top_k=5)
    out = augment_rows(rows, cfg, model=model, tokenizer=tokenizer, progress=False)
    copies = out[len(rows):]
    assert any(text != original for (text, _), (original, _) in zip(copies, [r for r in rows for _ in range(4)]))
    for text, _ in copies[:4]:
        assert text.split()[5] == "walking" and "  " in text  # walk ##ing kept; double space kept
    for text, _ in copies[4:]:
        assert text.split()[3] == "runs"
    for text, _ in copies:
        assert all(word in words or word in {"walking", "runs", "The"} for word in text.split())
