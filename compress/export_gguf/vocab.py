"""A Hugging Face byte-level BPE tokenizer as GGUF's tokenizer metadata (what llama.cpp's tokenizer reads).

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
    raise UserError(f"the tokenizer's pre-tokenizer ({json.dumps(spec)[:120]}) has no llama.cpp equivalent known "
                    "here: export-gguf handles byte-level BPE tokenizers (GPT-2, SmolLM, StarCoder style)")


def read_vocabulary(folder: Path, vocab_size: int) -> Vocabulary:
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise UserError(f"{folder} has no tokenizer.json: export-gguf writes the tokenizer from it")
    spec = json.loads(tokenizer_file.read_text())
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
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    ids = {content: i for i, content in enumerate(tokens)}
    special = {}
    for role in ("bos", "eos", "unk", "pad"):
        value = config.get(f"{role}_token")
        value = value.get("content") if isinstance(value, dict) else value
        if value in ids:
            special[role] = ids[value]
    template = config.get("chat_template")
    return Vocabulary(tokens, [int(t) for t in types], merges, pre, special, bool(config.get("add_bos_token")),
                      template if isinstance(template, str) else None)


def add_vocabulary(writer: gguf.GGUFWriter, vocab: Vocabulary) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for role, token_id in vocab.special_ids.items():
        adders[role](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
