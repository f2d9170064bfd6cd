"""TinyBERT's data augmentation (Jiao et al. 2020, Algorithm 1): more task data by replacing words with a masked-LM.

Task distillation needs far more examples than a GLUE training set holds, so every sentence gets ``copies`` noisy
variants with the same label: each whitespace-separated word is, with probability ``p_replace``, masked and replaced
by one of the masked-LM's ``top_k`` predictions for that position, drawn uniformly.

Two departures from the paper, both deliberate:

* Only words that are a single word-piece are replaced. The paper replaces multi-piece words with their GloVe
  nearest neighbours; GloVe cannot be had offline here, so those words are kept unchanged.
* The paper masks one word at a time in the partly replaced sentence. Here all words chosen for one copy are masked
  at once in the original sentence, and one forward pass over a whole batch of sentences predicts them all. This
  batched variant is what common reimplementations do: it is ``copies`` forwards per batch instead of one per word.

Words are what ``str.split`` sees, so punctuation glued to a word ("good.") makes it multi-piece and it stays; GLUE
sentence files are already tokenized with spaces around punctuation. Whitespace between words is kept as it was.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from compress.errors import UserError


@dataclass
class AugmentConfig:
    mlm: str
    """Model reference of a masked-LM (alias or folder), e.g. a BERT-base *ForMaskedLM checkpoint."""
    copies: int = 20
    """N_a: augmented sentences per original."""
    p_replace: float = 0.4
    """p_t: probability to replace each word."""
    top_k: int = 15
    """K: candidates taken from the masked-LM, one drawn uniformly."""
    seed: int = 0
    max_length: int = 128
    """Tokens per sentence given to the masked-LM; words cut off beyond it are kept unchanged."""
    batch_size: int = 32

    def __post_init__(self) -> None:
        # Checked on construction so that a bad config file fails before any model is loaded.
        if not isinstance(self.copies, int) or self.copies < 0:
            raise UserError(f"augment.copies is {self.copies!r}: set it to a whole number >= 0")
        if not isinstance(self.p_replace, (int, float)) or not 0.0 <= self.p_replace <= 1.0:
            raise UserError(f"augment.p_replace is {self.p_replace!r}: set it to a probability between 0 and 1")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise UserError(f"augment.top_k is {self.top_k!r}: set it to a whole number >= 1")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise UserError(f"augment.max_length is {self.max_length!r}: set it to a whole number >= 2")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise UserError(f"augment.batch_size is {self.batch_size!r}: set it to a whole number >= 1")


def augment_rows(rows: list[tuple[str, int]], cfg: AugmentConfig, model=None, tokenizer=None,
                 progress: bool = True) -> list[tuple[str, int]]:
    """Original rows first, then cfg.copies augmented copies of each (same label).

    The copies of row i follow one another, in row order. ``model``/``tokenizer`` may be passed to reuse a loaded
    masked-LM (then ``cfg.mlm`` is not loaded). The result depends only on ``cfg.seed`` and the rows, not on
    ``batch_size``: every row draws from its own random stream.
    """
    if cfg.copies == 0 or not rows:
        return list(rows)
    if model is None or tokenizer is None:
        model, tokenizer = load_mlm(cfg.mlm)
    _check_tokenizer(tokenizer, cfg.mlm)
    vocab = _Vocabulary.of(tokenizer, model.config.vocab_size)
    copies: list[list[str]] = [[] for _ in rows]
    bar = tqdm(total=len(rows) * cfg.copies, desc="augment", unit="sentence", disable=not progress,
               dynamic_ncols=True)
    for start in range(0, len(rows), cfg.batch_size):
        indices = range(start, min(start + cfg.batch_size, len(rows)))
        batch = _Batch.encode([rows[i][0] for i in indices], tokenizer, cfg.max_length)
        rngs = [random.Random(f"{cfg.seed}:{i}") for i in indices]
        for _ in range(cfg.copies):
            for i, text in zip(indices, _augment_once(batch, rngs, model, vocab, cfg)):
                copies[i].append(text)
            bar.update(len(indices))
    bar.close()
    out = list(rows)
    for (_, label), texts in zip(rows, copies):
        out.extend((text, label) for text in texts)
    return out


# --- the masked-LM ----------------------------------------------------------------------------


def load_mlm(reference: str):
    """(model, tokenizer) of a masked-LM, on the GPU when there is one; refuses models without an MLM head.

    AutoModelForMaskedLM happily loads a bare encoder and initialises the head at random, which would make
    augmentation silently produce noise, so the architecture and the loading report are both checked.
    """
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

    from compress.models import quiet_transformers, resolve
    from compress.runtime import resolve_device

    path = resolve(reference).path
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    architectures = config.architectures or []
    if not any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in architectures):
        found = ", ".join(architectures) or "no architectures in config.json"
        raise UserError(f"{reference} ({found}) has no masked-LM head: pass a *ForMaskedLM model as augment.mlm")
    with quiet_transformers():
        model, info = AutoModelForMaskedLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True,
                                                           trust_remote_code=False, output_loading_info=True)
    if info["missing_keys"]:
        missing = ", ".join(sorted(info["missing_keys"])[:3])
        raise UserError(f"{reference} has no masked-LM head (missing {missing}...): "
                        "pass a *ForMaskedLM model as augment.mlm")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return model.to(resolve_device("auto")).eval(), tokenizer


def _check_tokenizer(tokenizer, reference: str) -> None:
    if tokenizer.mask_token_id is None:
        raise UserError(f"the tokenizer of {reference} has no mask token: pass a masked-LM's own folder as augment.mlm")
    if not tokenizer.is_fast:
        # Character offsets (which token belongs to which word) exist only in the fast (Rust) tokenizers.
        raise UserError(f"the tokenizer of {reference} is not a fast tokenizer: save one with tokenizer.json "
                        "in the augment.mlm folder")


class _Vocabulary(NamedTuple):
    """What every vocabulary id would be as a replacement word, computed once per tokenizer."""

    mask_id: int
    words: list[str]
    """The id as a standalone word (byte-level 'Ġthe' -> 'the')."""
    banned: torch.Tensor
    """True for ids that can never replace a word: special tokens, '##' continuation pieces, ids that decode to
    nothing, to control characters or to more than one word, ids beyond the tokenizer (padded output layers)."""

    @classmethod
    def of(cls, tokenizer, size: int) -> _Vocabulary:
        known = min(size, len(tokenizer))
        words = [w.strip() for w in tokenizer.batch_decode([[i] for i in range(known)])] + [""] * (size - known)
        pieces = tokenizer.convert_ids_to_tokens(list(range(known))) + [""] * (size - known)
        banned = torch.tensor([not w.isprintable() or len(w.split()) != 1 or "\ufffd" in w or p.startswith("##")
                               for w, p in zip(words, pieces)])
        banned[[i for i in tokenizer.all_special_ids if i < size]] = True
        return cls(tokenizer.mask_token_id, words, banned)


# --- one batch --------------------------------------------------------------------------------


class _Batch(NamedTuple):
    """A batch of sentences, tokenized once and reused by every copy."""

    texts: list[str]
    spans: list[list[tuple[int, int]]]
    """Per sentence, the character span of each whitespace-separated word."""
    positions: list[list[int | None]]
    """Per sentence and word, the token position when the word is one whole word-piece, else None."""
    inputs: dict[str, torch.Tensor]

    @classmethod
    def encode(cls, texts: list[str], tokenizer, max_length: int) -> _Batch:
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                        return_offsets_mapping=True, return_special_tokens_mask=True)
        offsets, special = enc.pop("offset_mapping").tolist(), enc.pop("special_tokens_mask").tolist()
        spans, positions = [], []
        for b, text in enumerate(texts):
            words = [m.span() for m in re.finditer(r"\S+", text)]
            spans.append(words)
            usable = [not s and m for s, m in zip(special[b], enc["attention_mask"][b].tolist())]
            positions.append(_single_piece_positions(words, offsets[b], usable, len(text)))
        return cls(texts, spans, positions, dict(enc))


def _single_piece_positions(words: list[tuple[int, int]], offsets: list[list[int]], usable: list[bool],
                            length: int) -> list[int | None]:
    """Token position of each word that is exactly one token covering the whole word, else None.

    A token belongs to the word holding its last character (byte-level tokens start at the preceding space).
    Covering the whole word matters at the truncation edge, where only a word's first piece may survive.
    """
    owner = [-1] * length
    for w, (start, end) in enumerate(words):
        owner[start:end] = [w] * (end - start)
    tokens: list[list[int]] = [[] for _ in words]
    for t, (start, end) in enumerate(offsets):
        if usable[t] and end > start and owner[end - 1] >= 0:
            tokens[owner[end - 1]].append(t)
    result: list[int | None] = []
    for (start, end), found in zip(words, tokens):
        whole = len(found) == 1 and offsets[found[0]][0] <= start and offsets[found[0]][1] >= end
        result.append(found[0] if whole else None)
    return result


def _augment_once(batch: _Batch, rngs: list[random.Random], model, vocab: _Vocabulary,
                  cfg: AugmentConfig) -> list[str]:
    """One augmented copy of every sentence in the batch, from a single masked-LM forward."""
    # Every word draws, eligible or not, so that a row's random stream does not depend on the tokenizer's cuts.
    chosen = [[w for w, pos in enumerate(positions) if rng.random() < cfg.p_replace and pos is not None]
              for positions, rng in zip(batch.positions, rngs)]
    if not any(chosen):
        return list(batch.texts)
    rows = [b for b, words in enumerate(chosen) for _ in words]
    cols = [batch.positions[b][w] for b, words in enumerate(chosen) for w in words]
    candidates = _predict(batch.inputs, rows, cols, model, vocab, cfg.top_k)
    texts, k = [], 0
    for b, words in enumerate(chosen):
        replacements = {}
        for w in words:
            start, end = batch.spans[b][w]
            original = batch.texts[b][start:end].casefold()
            options = [vocab.words[i] for i in candidates[k] if vocab.words[i].casefold() != original][:cfg.top_k]
            if options:
                replacements[w] = rngs[b].choice(options)
            k += 1
        texts.append(_replace_words(batch.texts[b], batch.spans[b], replacements))
    return texts


@torch.inference_mode()
def _predict(inputs: dict[str, torch.Tensor], rows: list[int], cols: list[int], model, vocab: _Vocabulary,
             top_k: int) -> list[list[int]]:
    """Best candidate ids at the given (sentence, position) pairs, all masked at once, best first.

    One more than top_k is kept so that dropping a candidate that spells the original word (another case, or
    with/without a leading space) still leaves top_k.
    """
    device = next(model.parameters()).device
    feed = {name: t.to(device) for name, t in inputs.items()}
    original = feed["input_ids"][rows, cols]
    feed["input_ids"] = feed["input_ids"].clone()
    feed["input_ids"][rows, cols] = vocab.mask_id
    logits = model(**feed).logits[rows, cols].float()
    logits[:, vocab.banned.to(device)] = float("-inf")
    logits[torch.arange(len(rows), device=device), original] = float("-inf")
    allowed = int((~vocab.banned).sum()) - 1
    k = max(0, min(top_k + 1, allowed))
    return logits.topk(k, dim=-1).indices.tolist()


def _replace_words(text: str, spans: list[tuple[int, int]], replacements: dict[int, str]) -> str:
    """The text with some words swapped, every other character (spacing included) left as it was."""
    parts, last = [], 0
    for w in sorted(replacements):
        start, end = spans[w]
        parts += [text[last:start], replacements[w]]
        last = end
    return "".join(parts) + text[last:]
