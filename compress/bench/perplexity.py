"""Perplexity over fixed token windows: ppl = exp(mean next-token NLL over every predicted token).

Convention (recorded with every figure): the text is tokenized from its start without special tokens
(only as far as the windows need) and cut into non-overlapping windows (compress.data.eval_windows);
within a window every token but the first is predicted from the ones before it; where the tokenizer puts
BOS before a text (compress.bench.run.bos_token), each window starts with it; the remainder is dropped.
"""

from __future__ import annotations

import math

import torch

from compress.bench.result import PerplexityResult


def window_nll(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-position NLL of a window: ``logprobs`` [L, V] (log-softmax of the logits), ``ids`` [L] -> [L-1]."""
    return -logprobs[:-1].gather(1, ids[1:].unsqueeze(1).to(logprobs.device)).squeeze(1)


def perplexity_from_nll(total_nll: float, tokens: int, windows: int) -> PerplexityResult:
    mean = total_nll / tokens
    ppl = math.exp(mean) if mean < 709.0 else float("inf")  # a broken model must not crash the report
    return PerplexityResult(ppl, mean, tokens, windows)
