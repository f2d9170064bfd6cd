"""Shared pieces for the benchmark tests: a tiny eval text and a model that always predicts right."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn


class PerfectLM(nn.Module):
    """Puts (almost) all probability on the true next token of the sequence it was built for: the
    next token is always (token + 1) mod V, and the logits say exactly that."""

    def __init__(self, vocab: int = 32, margin: float = 60.0) -> None:
        super().__init__()
        self.vocab, self.margin = vocab, margin
        self.head = nn.Linear(4, vocab, bias=False)
        self.config = SimpleNamespace(architectures=["PerfectForCausalLM"])

    def get_output_embeddings(self):
        return self.head

    def forward(self, ids, use_cache=False):
        logits = torch.zeros(*ids.shape, self.vocab)
        logits.scatter_(2, ((ids + 1) % self.vocab).unsqueeze(-1), self.margin)
        return SimpleNamespace(logits=logits)


def counting_windows(n: int, length: int, vocab: int = 32) -> list[torch.Tensor]:
    return [(torch.arange(length) + 7 * i) % vocab for i in range(n)]
