"""Speed: prefill tokens/s on full windows and decode tokens/s with a KV cache.

Each figure is the median of ``repeats`` timed runs after ``warmup`` untimed ones, under
``torch.inference_mode``. Decode is a plain greedy loop over the model's own forward with its
cache (no sampling, no generate() bookkeeping), so it times the model and nothing else.
"""

from __future__ import annotations

import statistics
import time

import torch

from compress.bench.memory import kv_cache_bytes
from compress.bench.result import ClassifyResult, DecodeResult, PrefillResult


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(run, device: torch.device, warmup: int, repeats: int) -> tuple[float, object]:
    for _ in range(warmup):
        run()
    times, last = [], None
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        last = run()
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times), last


@torch.inference_mode()
def prefill(model, window: torch.Tensor, device: torch.device, warmup: int = 1, repeats: int = 3) -> PrefillResult:
    """One full window, batch 1, through the model as a prompt would go (cache on, logits of the last token)."""
    ids = window.reshape(1, -1).to(device)

    def run():
        return model(ids, use_cache=True, logits_to_keep=1)

    seconds, _ = _median_seconds(run, device, warmup, repeats)
    return PrefillResult(ids.shape[1] / seconds, 1, ids.shape[1], seconds, repeats)


@torch.inference_mode()
def decode(model, prompt: torch.Tensor, new_tokens: int, batch: int, device: torch.device, warmup: int = 1,
           repeats: int = 3) -> DecodeResult:
    """Greedy decoding of ``new_tokens`` after a ``prompt`` (1-D ids), the prompt repeated ``batch`` times.

    The prompt's prefill is outside the timed region: only the per-token steps are timed.
    """
    ids = prompt.reshape(1, -1).expand(batch, -1).contiguous().to(device)

    def run():
        out = model(ids, use_cache=True, logits_to_keep=1)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        started = time.perf_counter()
        for _ in range(new_tokens):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        return time.perf_counter() - started, cache

    for _ in range(warmup):
        run()
    times, cache = [], None
    for _ in range(repeats):
        seconds, cache = run()
        times.append(seconds)
    seconds = statistics.median(times)
    return DecodeResult(batch * new_tokens / seconds, batch, ids.shape[1], new_tokens, seconds, repeats,
                        kv_cache_bytes(cache))


def classification_batches(tokenizer, texts: list[str], batch: int, max_length: int = 128) -> list[dict]:
    """Tokenized batches as a classifier serves them: padded to the longest sentence of each batch."""
    return [dict(tokenizer(texts[i:i + batch], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt")) for i in range(0, len(texts), batch)]


@torch.inference_mode()
def classify(model, batches: list[dict], device: torch.device, warmup: int = 1, repeats: int = 3) -> ClassifyResult:
    """Examples per second of a sequence classifier over all ``batches`` (tokenization excluded)."""
    moved = [{k: v.to(device) for k, v in b.items()} for b in batches]

    def run():
        for inputs in moved:
            model(**inputs)

    seconds, _ = _median_seconds(run, device, warmup, repeats)
    examples = sum(int(b["input_ids"].shape[0]) for b in batches)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    return ClassifyResult(examples / seconds, tokens / seconds, int(batches[0]["input_ids"].shape[0]), len(batches),
                          examples, seconds, repeats)
