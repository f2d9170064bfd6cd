"""Agreement with a reference model on the same tokens: KL divergence and top-1 agreement.

A sweep compares many variants with one base, so the base's distributions are computed once and
kept. Keeping every base log-probability would take V floats per token (49,152 for SmolLM2: 4 GB
for 20k tokens), so we keep, per position, the base's top-K log-probabilities and their token ids.
KL is then computed exactly on the partition {each top-K token} + {all other tokens as one bucket}:

    KL_K(P||Q) = sum_{i in top-K} p_i log(p_i / q_i) + p_rest log(p_rest / q_rest)

By the log-sum inequality this never exceeds the full KL(P||Q), and it equals it when K covers the
vocabulary or the base's mass outside its top K is zero; the mean base mass outside the top K is
reported with the figure so the reader sees how tight it is. Top-1 agreement is exact: the base's
argmax is its first top-K entry.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_TOP_K = 256


@dataclass
class Reference:
    """The base model's top-K log-probabilities for every predicted position, windows concatenated."""

    logprobs: torch.Tensor  # float32 [N, K], sorted descending per row
    token_ids: torch.Tensor  # int32 [N, K]
    meta: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return self.logprobs.shape[1]

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"logprobs": self.logprobs.contiguous(), "token_ids": self.token_ids.contiguous()}, str(tmp),
                  metadata={"meta": json.dumps(self.meta)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "Reference":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata().get("meta", "{}"))
            return cls(f.get_tensor("logprobs"), f.get_tensor("token_ids"), meta)


def reference_rows(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each predicted position's log-probs ([L, V] -> two [L-1, k])."""
    values, ids = logprobs[:-1].topk(min(k, logprobs.shape[1]), dim=1)
    return values.float().cpu(), ids.to(torch.int32).cpu()


def _log_rest(log_top: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(log_top))) per row, -inf where the top entries hold all the mass."""
    lse = torch.logsumexp(log_top, dim=1).clamp(max=0.0)
    return torch.log(-torch.expm1(lse))


def kl_topk(ref_logprobs: torch.Tensor, ref_ids: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """Per-position KL_K(base || candidate): ``ref_*`` [N, K] from the base, ``logprobs`` [N, V] candidate."""
    # float64: the rest bucket is 1 - (a sum close to 1), where float32 has too few digits.
    cand = logprobs.gather(1, ref_ids.long().to(logprobs.device)).double()
    ref = ref_logprobs.to(cand.device).double()
    p = ref.exp()
    kl = (p * (ref - cand)).sum(1)
    log_p_rest, log_q_rest = _log_rest(ref), _log_rest(cand)
    p_rest = log_p_rest.exp()
    # 0 * log(0 / q) = 0; where the candidate leaves no mass at all outside the base's top K (q_rest
    # underflows) the term would be infinite: floor log q_rest at the smallest normal double instead.
    tail = torch.where(p_rest > 0, p_rest * (log_p_rest - log_q_rest.clamp(min=-708.0)), torch.zeros_like(p_rest))
    return (kl + tail).clamp(min=0.0).float()


def kl_known(ref_logprobs: torch.Tensor, cand_at_ref: torch.Tensor) -> torch.Tensor:
    """Per-position KL(base || candidate) on the partition {each of the base's top K whose candidate log-prob is
    known} + {every other token}, for a candidate that gives only its own top-k (vLLM): ``cand_at_ref`` [N, K] holds
    the candidate's log-prob of each of the base's top-K tokens, NaN where it is unknown. Coarser than ``kl_topk``'s
    partition, so (log-sum inequality) a lower bound of it and of the full KL; equal to ``kl_topk`` where every
    one is known."""
    known = ~torch.isnan(cand_at_ref)
    ref = ref_logprobs.double()
    cand = torch.where(known, cand_at_ref.double(), torch.zeros_like(ref))
    p = torch.where(known, ref.exp(), torch.zeros_like(ref))
    kl = (p * (ref - cand)).sum(1)
    p_rest = (1 - p.sum(1)).clamp(min=0.0)
    q_rest = (1 - torch.where(known, cand.exp(), torch.zeros_like(ref)).sum(1)).clamp(min=1e-300)
    tail = torch.where(p_rest > 0, p_rest * (p_rest.clamp(min=1e-300).log() - q_rest.log()), torch.zeros_like(p_rest))
    return (kl + tail).clamp(min=0.0).float()


def top1_matches(ref_ids: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """Bool per position: the candidate's argmax is the base's argmax."""
    return logprobs.argmax(1).cpu() == ref_ids[:, 0].long().cpu()


def rest_mass(ref_logprobs: torch.Tensor) -> torch.Tensor:
    """The base's probability mass outside its top K, per position."""
    return _log_rest(ref_logprobs).exp()


def windows_digest(windows: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for window in windows:
        digest.update(window.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()
