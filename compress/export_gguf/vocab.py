"""A Hugging Face tokenizer as GGUF's tokenizer metadata (what llama.cpp's tokenizer reads): a byte-level BPE
one ("gpt2"), or a SentencePiece one from its tokenizer.model ("llama": Llama-2, Mistral), as llama.cpp's
converter writes each.

SentencePiece: every piece with its score and type (unknown, control, byte, ...), ids beyond the model's
pieces "[PAD<id>]" (unused), the tokenizer config's added tokens as control or user-defined tokens.

Byte-level BPE:

tokens in id order (ids no token has become "[PAD<id>]", unused), each token's type (special added tokens are
control tokens, other added tokens user-defined), the merges, the special token ids, and the pre-tokenizer:
llama.cpp names a fixed set of pre-tokenizer regexes, so the one that splits text as the tokenizer's own
pre_tokenizer does is chosen from that spec, and a spec with no known equivalent is refused rather than
written with a regex that would tokenize differently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf

from compress.errors import UserError


@dataclass
class Vocabulary:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int]
    """bos / eos / unk / pad -> id, where the tokenizer has them."""
    add_bos: bool
    chat_template: str | None
    model: str = "gpt2"
    """llama.cpp's tokenizer: gpt2 (byte-level BPE) or llama (SentencePiece)."""
    scores: list[float] | None = None
    """SentencePiece: each token's score (llama.cpp merges by it)."""
    add_space_prefix: bool | None = None
    add_eos: bool = False


_SPLIT_REGEXES = {
    # Qwen 2 and 3: letters, one digit at a time, punctuation runs, newlines, spaces.
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    # Llama 3: the same with digits in runs of up to three.
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
}
"""A Split regex (isolated matches, then byte-level without a regex of its own) -> llama.cpp's pre-tokenizer that
splits with the same regex."""


def pre_tokenizer_name(spec: dict | None) -> str:
    """llama.cpp's name for the regex that splits text as ``spec`` (tokenizer.json's pre_tokenizer) does."""
    if spec and spec.get("type") == "ByteLevel" and spec.get("use_regex", True) and not spec.get("add_prefix_space"):
        return "gpt-2"  # GPT-2's regex, as ByteLevel applies it (llama.cpp spells the pre-tokenizer "gpt-2")
    if spec and spec.get("type") == "Sequence":
        parts = spec.get("pretokenizers", [])
        kinds = [p.get("type") for p in parts]
        if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") \
                and pre_tokenizer_name(parts[1]) == "gpt-2":
            return "smollm"  # each digit alone, then GPT-2's regex (StarCoder, SmolLM)
        if kinds == ["Split", "ByteLevel"] and parts[0].get("behavior") == "Isolated" \
                and not parts[0].get("invert") and not parts[1].get("use_regex", True):
            name = _SPLIT_REGEXES.get((parts[0].get("pattern") or {}).get("Regex"))
            if name is not None:
                return name
    raise UserError(f"the tokenizer's pre-tokenizer ({json.dumps(spec)[:120]}) has no llama.cpp equivalent known "
                    "here: export-gguf handles byte-level BPE tokenizers (GPT-2, SmolLM, StarCoder, Qwen and Llama 3 "
                    "style)")


def _is_sentencepiece(folder: Path, spec: dict | None) -> bool:
    """A tokenizer.model beside a tokenizer.json that is its conversion (byte-fallback BPE: Llama-2, Mistral),
    or alone."""
    if not (folder / "tokenizer.model").is_file():
        return False
    return spec is None or bool((spec.get("model") or {}).get("byte_fallback"))


def _tokenizer_config(folder: Path) -> dict:
    config_file = folder / "tokenizer_config.json"
    return json.loads(config_file.read_text()) if config_file.is_file() else {}


def _special_ids(config: dict, tokens: list[str]) -> dict[str, int]:
    ids = {content: i for i, content in enumerate(tokens)}
    special = {}
    for role in ("bos", "eos", "unk", "pad"):
        value = config.get(f"{role}_token")
        value = value.get("content") if isinstance(value, dict) else value
        if value in ids:
            special[role] = ids[value]
    return special


def read_sentencepiece_vocabulary(folder: Path, vocab_size: int) -> Vocabulary:
    from compress.export_gguf.sentencepiece import CONTROL, UNUSED, USER_DEFINED, read_sentencepiece

    try:
        model = read_sentencepiece((folder / "tokenizer.model").read_bytes())
    except (ValueError, IndexError, UnicodeDecodeError) as err:
        raise UserError(f"{folder}/tokenizer.model is not a SentencePiece model ({err})")
    if len(model.pieces) > vocab_size:
        raise UserError(f"{folder}/tokenizer.model has {len(model.pieces)} pieces, more than the model's "
                        f"{vocab_size} embeddings")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [UNUSED] * vocab_size
    for i, piece in enumerate(model.pieces):
        tokens[i], scores[i], types[i] = piece.text, piece.score, piece.kind
    config = _tokenizer_config(folder)
    for key, added in (config.get("added_tokens_decoder") or {}).items():
        i = int(key)
        if i >= vocab_size:
            continue
        content = added["content"]
        special = added.get("special", False)
        tokens[i] = content if special else content.replace("\u2581", " ")
        types[i] = CONTROL if special else USER_DEFINED
        scores[i] = -1000.0
    template = config.get("chat_template")
    return Vocabulary(tokens, types, [], "default", _special_ids(config, tokens), bool(config.get("add_bos_token", True)),
                      template if isinstance(template, str) else None, model="llama", scores=scores,
                      add_space_prefix=model.add_dummy_prefix, add_eos=bool(config.get("add_eos_token", False)))


SPACE = "\u2581"
"""SentencePiece's space symbol, which its pieces and a converted tokenizer.json spell spaces with."""


def sentencepiece_space_prefix(spec: dict) -> bool | None:
    """For a tokenizer.json that is a SentencePiece BPE model converted to byte-fallback BPE without its
    tokenizer.model (Gemma 3's, a Llama-2 saved by transformers alone): whether a space goes before the text
    (llama.cpp's add_space_prefix). None when ``spec`` splits or spells text any other way.

    The conversions seen: spaces replaced by the normalizer (Gemma: no prefix; older Llama-2: a Prepend first),
    where a Split on spaces after it finds none; or a Metaspace pre-tokenizer that does not split."""
    model, normalizer, pre = spec.get("model") or {}, spec.get("normalizer"), spec.get("pre_tokenizer")
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return None
    replaces_spaces = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    splits_nothing = pre is None or pre == {"type": "Split", "pattern": {"String": " "},
                                            "behavior": "MergedWithPrevious", "invert": False}
    if normalizer == replaces_spaces and splits_nothing:
        return False
    if normalizer and normalizer.get("type") == "Sequence" and splits_nothing and normalizer.get("normalizers") == [
            {"type": "Prepend", "prepend": SPACE}, replaces_spaces]:
        return True
    if normalizer is None and pre and pre.get("type") == "Metaspace" and pre.get("replacement") == SPACE \
            and not pre.get("split", True):
        return pre.get("prepend_scheme", "always") != "never"
    return None


def merge_scores(merges: list[str], tokens: list[str]) -> list[float]:
    """A score for each normal token that makes llama.cpp's SentencePiece tokenizer (which joins the adjacent pair
    whose joined text is the highest-scored token, leftmost first) join in the order of the BPE merges: minus the
    rank of the first merge that makes the token. Tokens no merge makes (single characters, which no join can
    produce, and the odd longer piece) score below them all."""
    first_rank: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1)
        first_rank.setdefault(left + right, rank)
    unmade = -float(len(merges))
    return [-float(first_rank[token]) if token in first_rank else unmade for token in tokens]


def read_converted_sentencepiece_vocabulary(spec: dict, folder: Path, vocab_size: int, add_space_prefix: bool
                                            ) -> Vocabulary:
    """llama.cpp's "llama" tokenizer from a converted SentencePiece tokenizer.json (see
    ``sentencepiece_space_prefix``): the pieces as written (``\u2581`` for spaces), byte pieces ``<0xNN>``
    as bytes, special added tokens as control tokens, other added tokens as user-defined ones spelled with plain
    spaces (llama.cpp matches them in the text before tokenizing, as transformers does), and scores from the
    merges (``merge_scores``)."""
    import re

    from compress.export_gguf.sentencepiece import BYTE, CONTROL, NORMAL, UNUSED, USER_DEFINED

    model = spec["model"]
    by_id = {token_id: token for token, token_id in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    scores = merge_scores(merges, tokens)
    types = [NORMAL if i in by_id else UNUSED for i in range(vocab_size)]
    for i, token in enumerate(tokens):
        if i in added:
            special = added[i].get("special", False)
            tokens[i] = added[i]["content"] if special else added[i]["content"].replace(SPACE, " ")
            types[i], scores[i] = (CONTROL if special else USER_DEFINED), -1000.0
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            types[i], scores[i] = BYTE, 0.0
        elif types[i] == UNUSED:
            scores[i] = -10000.0
    config = _tokenizer_config(folder)
    template = config.get("chat_template")
    return Vocabulary(tokens, types, [], "default", _special_ids(config, tokens),
                      bool(config.get("add_bos_token", _post_processor_adds_bos(spec))),
                      template if isinstance(template, str) else None, model="llama", scores=scores,
                      add_space_prefix=add_space_prefix, add_eos=bool(config.get("add_eos_token", False)))


def _post_processor_adds_bos(spec: dict) -> bool:
    """Whether tokenizer.json's own template puts a special token first (Gemma's config leaves add_bos_token
    out and its post-processor adds <bos>)."""
    post = spec.get("post_processor") or {}
    single = post.get("single") or []
    return post.get("type") == "TemplateProcessing" and bool(single) and "SpecialToken" in single[0]


def read_vocabulary(folder: Path, vocab_size: int) -> Vocabulary:
    tokenizer_file = folder / "tokenizer.json"
    spec = json.loads(tokenizer_file.read_text()) if tokenizer_file.is_file() else None
    if _is_sentencepiece(folder, spec):
        return read_sentencepiece_vocabulary(folder, vocab_size)
    space_prefix = sentencepiece_space_prefix(spec) if spec is not None else None
    if space_prefix is not None:
        return read_converted_sentencepiece_vocabulary(spec, folder, vocab_size, space_prefix)
    if spec is None:
        raise UserError(f"{folder} has no tokenizer.json or tokenizer.model: export-gguf writes the tokenizer "
                        "from one of them")
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"{folder}'s tokenizer is {model.get('type')}, not byte-level BPE: export-gguf does not "
                        "write it yet")
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    by_id = {token_id: token for token, token_id in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    config = _tokenizer_config(folder)
    template = config.get("chat_template")
    return Vocabulary(tokens, [int(t) for t in types], merges, pre, _special_ids(config, tokens),
                      bool(config.get("add_bos_token")), template if isinstance(template, str) else None,
                      add_eos=bool(config.get("add_eos_token", False)))


def add_vocabulary(writer: gguf.GGUFWriter, vocab: Vocabulary) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.token_types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for role, token_id in vocab.special_ids.items():
        adders[role](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
