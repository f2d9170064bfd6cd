"""One batched pass over evaluation windows that feeds every accuracy metric.

Windows go through the model a few at a time under ``torch.inference_mode``; each window's logits
become float32 log-probabilities once, and perplexity, KL and top-1 agreement are all read from
them. The base model's reference (top-K log-probs) can be produced by the same pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from compress.bench.agreement import Reference, kl_topk, reference_rows, rest_mass, top1_matches
from compress.bench.perplexity import PerplexityResult, perplexity_from_nll, window_nll
from compress.bench.result import AgreementResult

# Log-probs of one batch are B x L x V floats, made a few times over; keep them within this budget.
_LOGITS_BUDGET_BYTES = {"cpu": 1 << 30, "cuda": 8 << 30}


@dataclass
class ScoreResult:
    perplexity: PerplexityResult
    agreement: AgreementResult | None
    batch_size: int
    seconds: float
    tokens_per_s: float
    """Window tokens scored per second (the whole pass, metrics included)."""
    threads: list[int]
    """CPU thread counts the pass ran with (tuned between the configured count and fewer)."""


def other_runnable_tasks(samples: int = 10) -> float:
    """Mean number of runnable tasks on the machine besides this one (Linux /proc/loadavg's R field)."""
    counts = []
    for _ in range(samples):
        try:
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            return 0.0
        time.sleep(0.002)
    return sum(counts) / len(counts)


class ThreadTuner:
    """Picks the CPU thread count for the scoring pass from the pass's own batches.

    On a shared machine OpenMP threads that wait for a busy core spin, and fewer threads can be much
    faster (SmolLM2 with one busy process beside it: 2 threads 180 tokens/s, 1 thread 280). Batch 0
    runs as configured (warm-up); batches 1..k are timed at each candidate count; the fastest is kept
    for the rest of the pass. The tuning batches are scored like any other, so the cost is one batch
    at a worse count, paid only where other tasks are runnable; figures are unchanged up to float
    rounding order.
    """

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.original = torch.get_num_threads()
        candidates = sorted({self.original, max(1, self.original // 2), 1}, reverse=True)
        # Probing costs a batch at a worse count, so it is done only where other work is running.
        wanted = enabled and device.type == "cpu" and len(candidates) > 1 and other_runnable_tasks() >= 0.5
        self.candidates = candidates if wanted else []
        self.timings: dict[int, float] = {}
        self.chosen, self.used = self.original, {self.original}

    def before(self, batch_index: int) -> None:
        if 1 <= batch_index <= len(self.candidates):
            torch.set_num_threads(self.candidates[batch_index - 1])
        elif self.candidates:
            torch.set_num_threads(self.chosen)
        self.used.add(torch.get_num_threads())
        self._started = time.perf_counter()

    def after(self, batch_index: int, tokens: int) -> None:
        if 1 <= batch_index <= len(self.candidates):
            self.timings[self.candidates[batch_index - 1]] = (time.perf_counter() - self._started) / tokens
            if len(self.timings) == len(self.candidates):
                self.chosen = min(self.timings, key=self.timings.get)

    def restore(self) -> None:
        torch.set_num_threads(self.original)


def auto_batch_size(seqlen: int, vocab: int, device: torch.device) -> int:
    per_window = seqlen * vocab * 4 * 3
    return max(1, min(16, _LOGITS_BUDGET_BYTES.get(device.type, 1 << 30) // per_window))


def output_vocab(model) -> int:
    """The width of the model's output head (a packed head has no .weight, another runtime's only a shape)."""
    head = model.get_output_embeddings()
    return getattr(head, "out_features", None) or head.weight.shape[0]


@torch.inference_mode()
def score_windows(model, windows: list[torch.Tensor], device: torch.device, batch_size: int | None = None,
                  reference: Reference | None = None, make_reference_k: int | None = None,
                  show_progress: bool = False, desc: str = "scoring",
                  tune_threads: bool = True) -> tuple[ScoreResult, Reference | None]:
    """Perplexity (and KL/top-1 against ``reference``) of ``model`` on ``windows``.

    With ``make_reference_k`` the pass also returns this model's own top-K reference.
    """
    seqlen = windows[0].numel()
    vocab = output_vocab(model)
    batch_size = batch_size or auto_batch_size(seqlen, vocab, device)
    total_nll, tokens = 0.0, 0
    kls, matches, ref_rows = [], [], []
    offset = 0
    started = time.perf_counter()
    bar = tqdm(total=len(windows), desc=desc, unit="window", disable=not show_progress, dynamic_ncols=True)
    tuner = ThreadTuner(device, tune_threads)
    try:
        for index, first in enumerate(range(0, len(windows), batch_size)):
            batch = torch.stack(windows[first:first + batch_size]).to(device)
            tuner.before(index)
            offset, total_nll, tokens = _score_batch(model, batch, reference, make_reference_k, offset, total_nll,
                                                     tokens, kls, matches, ref_rows)
            tuner.after(index, batch.numel())
            bar.update(batch.shape[0])
    finally:
        tuner.restore()
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    agreement = None
    if reference is not None:
        if offset != reference.logprobs.shape[0]:
            raise ValueError(f"the reference holds {reference.logprobs.shape[0]} positions, the windows {offset}")
        kl = torch.cat(kls).double()
        agreement = AgreementResult(
            kl_mean=float(kl.mean()), kl_median=float(kl.median()), kl_p99=float(torch.quantile(kl, 0.99)),
            kl_max=float(kl.max()), top1_agreement=float(torch.cat(matches).double().mean()), positions=offset,
            top_k=reference.k, base_rest_mass_mean=float(rest_mass(reference.logprobs.double()).mean()))
    made = None
    if make_reference_k:
        made = Reference(torch.cat([r[0] for r in ref_rows]), torch.cat([r[1] for r in ref_rows]))
    ppl = perplexity_from_nll(total_nll, tokens, len(windows))
    return ScoreResult(ppl, agreement, batch_size, seconds, len(windows) * seqlen / seconds,
                       sorted(tuner.used)), made


def _score_batch(model, batch, reference, make_reference_k, offset, total_nll, tokens, kls, matches, ref_rows):
    """Score one batch of windows into the running sums and lists; returns the new (offset, nll, tokens)."""
    logits = model(batch, use_cache=False).logits
    for row in range(batch.shape[0]):
        logprobs = torch.log_softmax(logits[row].float(), dim=-1)
        ids = batch[row]
        total_nll += float(window_nll(logprobs, ids).double().sum())
        tokens += ids.numel() - 1
        if make_reference_k:
            ref_rows.append(reference_rows(logprobs, make_reference_k))
        if reference is not None:
            span = slice(offset, offset + ids.numel() - 1)
            ref_lp, ref_ids = reference.logprobs[span], reference.token_ids[span]
            kls.append(kl_topk(ref_lp, ref_ids, logprobs[:-1]).cpu())
            matches.append(top1_matches(ref_ids, logprobs[:-1]))
        offset += ids.numel() - 1
    return offset, total_nll, tokens
