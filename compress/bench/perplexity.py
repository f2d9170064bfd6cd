"""Perplexity over fixed token windows: ppl = exp(mean next-token NLL over every predicted token).

Convention (recorded with every figure): the text is tokenized once without special tokens and cut
into non-overlapping windows (compress.data.eval_windows); within a window every token but the
first is predicted from the ones before it; no BOS is added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    tokens: int
    windows: int


@torch.no_grad()
def perplexity(model, windows: list[torch.Tensor], device: torch.device | str = "cpu",
               show_progress: bool = False, desc: str = "perplexity") -> PerplexityResult:
    total_nll, total_tokens = 0.0, 0
    for window in tqdm(windows, desc=desc, unit="window", disable=not show_progress, dynamic_ncols=True):
        ids = window.unsqueeze(0).to(device)
        logits = model(ids, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        total_nll += float(nll)
        total_tokens += ids.shape[1] - 1
    mean = total_nll / total_tokens
    return PerplexityResult(math.exp(mean), mean, total_tokens, len(windows))
