"""A GGUF file run by llama.cpp (llama-cpp-python's C API) behind the calling convention compress bench uses
for transformers models: ``model(ids, past_key_values=..., use_cache=..., logits_to_keep=...)`` returning
``.logits`` (torch, float32) and ``.past_key_values``.

llama.cpp keeps the KV cache inside its context, so the "cache" handed back is a marker saying how many
positions of each sequence the context holds; passing it back continues those sequences. Rows of a batch are
separate llama.cpp sequences in one unified KV cache, so a decode step of batch 8 is one ``llama_decode`` of 8
tokens, as llama.cpp's own batched decoding does. Only logits that are asked for are computed
(``logits_to_keep``), as transformers does for a prompt.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from compress.backends import HeadShape
from compress.cpu_features import cpu_features
from compress.errors import UserError

KV_BYTES_PER_VALUE = 2
"""llama.cpp's default KV cache type is f16."""


@dataclass(frozen=True)
class LlamaCppCache:
    """Positions held per sequence by one generation of the context (a prefill starts a new one)."""

    tokens: int
    batch: int
    generation: int
    bytes_per_token: int

    def bytes_held(self) -> int:
        return self.tokens * self.batch * self.bytes_per_token


def avoid_amx_buffers() -> None:
    """Make every llama.cpp model load in this process (ours, and llama-cpp-python's high-level ``Llama``) leave out
    the extra buffer types on a CPU with AMX: llama-cpp-python 0.3.36 crashes (segfault) in batched decodes with its
    AMX buffer type there (tests/backends/test_llamacpp.py, tests/export_gguf), even with the AMX state granted.
    Without them (AMX and the repacked layouts) it runs; other CPUs keep them, the repacked layouts being llama.cpp's
    fast path there."""
    import llama_cpp
    import llama_cpp.llama_cpp as lib

    if "amx_int8" not in cpu_features().features or getattr(lib, "_compress_no_amx", False):
        return
    defaults = lib.llama_model_default_params

    def model_defaults():
        params = defaults()
        params.use_extra_bufts = False
        return params

    # Both names: the package re-exports the binding's functions, and Llama reads the binding module's.
    lib.llama_model_default_params = llama_cpp.llama_model_default_params = model_defaults
    lib._compress_no_amx = True


def _quiet_llama_cpp() -> None:
    # llama-cpp-python prints llama.cpp's log lines by a level map older than llama.cpp's (its warnings arrive
    # as errors), so only CRITICAL keeps the load log and the unified cache's context warning quiet. Failures
    # still surface: a load or decode that fails raises here.
    logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL)


class LlamaCppCausalLM(nn.Module):
    def __init__(self, path: Path, config, threads: int, n_batch: int = 512) -> None:
        super().__init__()
        import llama_cpp

        _quiet_llama_cpp()
        avoid_amx_buffers()
        self._lib = llama_cpp
        self.path = Path(path)
        self.config = config
        self.threads = threads
        self.n_batch = n_batch
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise UserError(f"llama.cpp could not load {self.path}: is it a complete GGUF file of an architecture "
                            "this llama-cpp-python supports?")
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))
        layers = config.num_hidden_layers
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self._bytes_per_token = 2 * layers * kv_heads * head_dim * KV_BYTES_PER_VALUE
        self._ctx = None
        self._ctx_shape = (0, 0)
        self._generation = 0

    # --- what the benchmark asks of a model ----------------------------------------------------------

    def weight_bytes(self) -> int:
        return int(self._lib.llama_model_size(self._model))

    def parameter_count(self) -> int:
        return int(self._lib.llama_model_n_params(self._model))

    def get_output_embeddings(self):
        return HeadShape(self.vocab)

    # --- the context ---------------------------------------------------------------------------------

    def _context(self, tokens: int, sequences: int):
        """A context whose unified KV cache holds ``sequences`` x ``tokens`` positions (made anew, larger,
        when a call needs more than the current one)."""
        have_tokens, have_sequences = self._ctx_shape
        if self._ctx is not None and tokens <= have_tokens and sequences <= have_sequences:
            return self._ctx
        self._free_context()
        lib = self._lib
        tokens = max(tokens, have_tokens, 256)
        sequences = max(sequences, have_sequences)
        params = lib.llama_context_default_params()
        params.n_ctx = tokens * sequences
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = sequences
        params.kv_unified = True
        params.n_threads = self.threads
        params.n_threads_batch = self.threads
        ctx = lib.llama_init_from_model(self._model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not make a context of {tokens} x {sequences} positions")
        self._ctx, self._ctx_shape = ctx, (tokens, sequences)
        return ctx

    def _free_context(self) -> None:
        if self._ctx is not None:
            self._lib.llama_free(self._ctx)
            self._ctx = None

    def close(self) -> None:
        self._free_context()
        if getattr(self, "_model", None):
            self._lib.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may already be gone
            pass

    # --- the forward pass ----------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, past_key_values: LlamaCppCache | None = None, use_cache: bool = True,
                logits_to_keep: int = 0, attention_mask: torch.Tensor | None = None, **_):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("llama.cpp runs unpadded sequences only")
        batch, seq = input_ids.shape
        lib = self._lib
        if past_key_values is None:
            start = 0
            ctx = self._context(seq, batch)
            lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
            self._generation += 1
        else:
            if past_key_values.generation != self._generation or past_key_values.batch != batch:
                raise ValueError("this llama.cpp cache is no longer held: continue from the latest call's cache")
            start = past_key_values.tokens
            if start + seq > self._ctx_shape[0]:
                raise ValueError(f"the sequence outgrows its llama.cpp context of {self._ctx_shape[0]} positions")
            ctx = self._ctx
        keep = seq if logits_to_keep in (0, None) else min(logits_to_keep, seq)
        ids = input_ids.to("cpu", torch.int64).numpy()
        # Every (sequence, position) entry in order; llama.cpp takes at most n_batch of them per decode.
        entries = [(row, pos) for row in range(batch) for pos in range(seq)]
        logits = np.empty((batch, keep, self.vocab), dtype=np.float32)
        for first in range(0, len(entries), self.n_batch):
            chunk = entries[first:first + self.n_batch]
            self._decode(ctx, ids, chunk, start, seq - keep, logits)
        out = torch.from_numpy(logits)
        cache = LlamaCppCache(start + seq, batch, self._generation, self._bytes_per_token) if use_cache else None
        return SimpleNamespace(logits=out, past_key_values=cache)

    def _decode(self, ctx, ids: np.ndarray, chunk: list[tuple[int, int]], start: int, first_kept: int,
                logits: np.ndarray) -> None:
        lib = self._lib
        batch = lib.llama_batch_init(len(chunk), 0, 1)
        try:
            wanted = []
            for i, (row, pos) in enumerate(chunk):
                batch.token[i] = int(ids[row, pos])
                batch.pos[i] = start + pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = row
                batch.logits[i] = pos >= first_kept
                if pos >= first_kept:
                    wanted.append((row, pos - first_kept))
            batch.n_tokens = len(chunk)
            status = lib.llama_decode(ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode failed with status {status}")
            if wanted:
                pointer = lib.llama_get_logits(ctx)
                rows = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)),
                                             shape=(len(wanted), self.vocab))
                for index, (row, kept) in enumerate(wanted):
                    logits[row, kept] = rows[index]
        finally:
            lib.llama_batch_free(batch)
