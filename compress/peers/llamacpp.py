"""llama.cpp (through llama-cpp-python) as a peer row: batch-1 decode speed and perplexity of a GGUF
file on the same token ids as our models, with the same thread count.

The ids are fed to llama.cpp directly (the GGUF carries the same vocabulary as the converted model),
so both tools score exactly the same tokens (a BOS the windows start with included)."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import numpy as np

from compress.errors import UserError


def _llama(gguf: Path, n_ctx: int, threads: int, logits_all: bool):
    try:
        from llama_cpp import Llama
    except ImportError:
        raise UserError("the llama.cpp peer needs llama-cpp-python: pip install 'compress-workbench[llamacpp]'")
    from compress.backends.llamacpp_model import avoid_amx_buffers

    avoid_amx_buffers()
    return Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                 logits_all=logits_all, verbose=False, n_batch=min(n_ctx, 512))


def decode_seconds(llm, prompt: list[int], new_tokens: int) -> float:
    """Seconds for ``new_tokens`` greedy steps after an untimed prompt."""
    llm.reset()
    llm.eval(prompt)
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    started = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return time.perf_counter() - started


def decode_speed(gguf: Path, prompt: list[int], new_tokens: int, threads: int, repeats: int = 3) -> dict:
    llm = _llama(gguf, len(prompt) + new_tokens + 8, threads, logits_all=False)
    decode_seconds(llm, prompt, 4)  # warm-up
    times = [decode_seconds(llm, prompt, new_tokens) for _ in range(repeats)]
    return {"tokens_per_s": new_tokens / statistics.median(times), "seconds": times}


def perplexity(gguf: Path, windows: list[list[int]], threads: int) -> dict:
    """exp(mean NLL) of every next token of each window, as compress bench scores them."""
    llm = _llama(gguf, len(windows[0]), threads, logits_all=True)
    nll, count = 0.0, 0
    for window in windows:
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(logits).sum(axis=1))
        targets = np.asarray(window[1:])
        nll += float((log_norm - logits[np.arange(len(targets)), targets]).sum())
        count += len(targets)
    return {"perplexity": math.exp(nll / count), "tokens": count}
