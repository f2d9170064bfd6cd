"""What the GGUF tests ask of llama.cpp itself (llama-cpp-python's own high-level API, not our backend): the
logits of a token sequence, and its tokenization of a text."""

from pathlib import Path

import numpy as np
import pytest
import torch


def llama_cpp_logits(gguf: Path, ids: list[int], texts: tuple[str, ...] = (), add_bos: bool = False):
    """(logits [len(ids), vocab], [llama.cpp's tokens of each text])."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="install the [llamacpp] extra")
    from compress.backends.llamacpp_model import avoid_amx_buffers

    avoid_amx_buffers()  # as every load of ours does
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=64, logits_all=True, verbose=False)
    try:
        tokens = [llm.tokenize(text.encode(), add_bos=add_bos, special=False) for text in texts]
        llm.eval(ids)
        return torch.tensor(np.array(llm.scores[:len(ids)])), tokens
    finally:
        llm.close()


def relative_error(theirs: torch.Tensor, expected: torch.Tensor) -> float:
    return float((theirs - expected).abs().max() / expected.abs().max())
