"""Capture what the TinyBERT losses compare, for any model whose blocks form one stack:

* the embedding-layer output = the input of the first block (a forward pre-hook),
* each block's output hidden state (forward hooks),
* the pre-softmax attention scores of chosen blocks, through an attention function registered with
  transformers' AttentionInterface. Scores are not among the outputs transformers returns (it gives
  softmax probabilities), and the paper distils the scores.

Blocks whose scores are not requested run the standard SDPA kernel, so a 30-layer teacher pays for
explicit scores only in the layers the student learns from.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from compress.errors import UserError
from compress.models import quiet_transformers
from compress.select import find_blocks

ATTENTION_NAME = "distill_scores"
_RECORDER = "_distill_score_recorder"


@dataclass
class Captured:
    embedding: torch.Tensor | None = None
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    """Block number (1-based) -> output hidden state."""
    scores: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Block number (1-based) -> (pre-softmax scores [b, heads, q, k], usable pairs [b, 1|heads, q, k])."""


def _scores_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    recorder = getattr(module, _RECORDER, None)
    softcap = kwargs.get("softcap")
    if recorder is None and softcap is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:  # Gemma 2's attention soft-capping: the scores softmax sees are the capped ones
        scores = torch.tanh(scores / softcap) * softcap
    # A sliding window needs nothing here: the eager-style mask already hides what lies outside it.
    q_len, k_len = scores.shape[-2:]
    if attention_mask is not None:
        bias = attention_mask[..., :k_len]
        if bias.dtype == torch.bool:
            usable = bias
            bias = torch.zeros_like(scores).masked_fill(~usable, torch.finfo(scores.dtype).min)
        else:
            usable = bias > torch.finfo(bias.dtype).min / 2
        weights = scores + bias
    else:
        usable = torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=scores.device)
        if getattr(module, "is_causal", False) and q_len > 1:
            usable = torch.tril(usable, diagonal=k_len - q_len)
        weights = scores.masked_fill(~usable, torch.finfo(scores.dtype).min)
    probs = torch.softmax(weights.float(), dim=-1).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    if recorder is not None:
        recorder(scores, usable)
    return output, probs


def register_attention() -> None:
    """Make ``distill_scores`` a known attention implementation (eager-style masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(ATTENTION_NAME, _scores_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, eager_mask)


def attention_modules(block: nn.Module) -> list[nn.Module]:
    """The self-attention module(s) of a block: the modules that own a query projection."""
    found = [m for name, m in block.named_modules()
             if any(hasattr(m, attr) for attr in ("q_proj", "query", "qkv_proj", "query_key_value", "Wqkv"))]
    return found


def blocks_of(model: nn.Module) -> nn.ModuleList:
    if getattr(model.config, "is_encoder_decoder", False):
        raise UserError(f"{type(model).__name__} is an encoder-decoder model: layerwise distillation maps one stack "
                        "of blocks and cannot handle it (use an encoder or a decoder-only model)")
    return find_blocks(model)[1]


@contextmanager
def capture(model: nn.Module, hidden: bool, attention_layers: list[int] = ()) -> Iterator[Captured]:
    """Record the embedding output and block outputs (when ``hidden``) and the scores of the given
    1-based blocks into one ``Captured`` during the forward passes inside the block. Each forward
    replaces the previous values."""
    blocks = blocks_of(model)
    captured = Captured()
    handles = []
    previous_impl = model.config._attn_implementation
    try:
        if hidden:
            def take_embedding(_module, args, kwargs):
                captured.embedding = args[0] if args else kwargs["hidden_states"]

            handles.append(blocks[0].register_forward_pre_hook(take_embedding, with_kwargs=True))
            for number, block in enumerate(blocks, start=1):
                def take_output(_module, _args, output, number=number):
                    captured.hidden[number] = output[0] if isinstance(output, (tuple, list)) else output

                handles.append(block.register_forward_hook(take_output))
        if attention_layers:
            check_attention_support(model)
            register_attention()
            with quiet_transformers():
                model.set_attn_implementation(ATTENTION_NAME)
            for number in attention_layers:
                modules = attention_modules(blocks[number - 1])
                if len(modules) != 1:
                    raise UserError(f"{type(model).__name__}: cannot find the one attention module of block {number}; "
                                    "this architecture cannot be mapped for the attention loss (set its weight to 0)")

                def record(scores, usable, number=number):
                    captured.scores[number] = (scores, usable)

                setattr(modules[0], _RECORDER, record)
        yield captured
    finally:
        for handle in handles:
            handle.remove()
        for number in attention_layers:
            for module in attention_modules(blocks[number - 1]):
                if hasattr(module, _RECORDER):
                    delattr(module, _RECORDER)
        if attention_layers and previous_impl != ATTENTION_NAME:
            with quiet_transformers():
                model.set_attn_implementation(previous_impl)


def check_attention_support(model: nn.Module) -> None:
    """Architectures whose attention does not go through transformers' AttentionInterface (MPT,
    Falcon and BLOOM in transformers 5.24; GPT-J joined the interface in 5.24) cannot hand over their
    pre-softmax scores. The model's own declaration decides, so a newer transformers widens the set."""
    if not getattr(model, "_supports_attention_backend", False):
        raise UserError(f"{model.config.model_type} does not route attention through transformers' attention "
                        "interface, so its pre-softmax scores cannot be captured: this architecture cannot be mapped "
                        "for the attention loss; set losses.attention to 0")


def check_scores(captured: Captured, layers: list[int], model: nn.Module) -> None:
    """After a forward: every requested block reported its scores, or the architecture bypasses the
    attention interface (older implementations in transformers do)."""
    missing = [n for n in layers if n not in captured.scores]
    if missing:
        raise UserError(f"{model.config.model_type} does not expose attention scores through transformers' attention "
                        f"interface (blocks {missing} reported none): this architecture cannot be mapped for the "
                        "attention loss; set losses.attention to 0")
