"""ggml's own K-quant code, as llama.cpp ships it (libggml-base inside llama-cpp-python), called through ctypes:
its row dequantizers and its quantizers (with or without an importance matrix). The reference our K blocks are
read back by and compared with."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest


def _library() -> ctypes.CDLL:
    llama_cpp = pytest.importorskip("llama_cpp", reason="install the [llamacpp] extra")
    return ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))


def _symbol(name: str) -> str:
    """ggml's spelling of a type in its function names: q4_K, but q4_0."""
    return name[:-1] + "K" if name.endswith("_k") else name


def ggml_dequantize(name: str, data: np.ndarray, cols: int) -> np.ndarray:
    """float32 [rows, cols] from ``data`` (uint8 [rows, bytes per row]) by ggml's dequantize_row_<name>."""
    function = getattr(_library(), f"dequantize_row_{_symbol(name)}")
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    data = np.ascontiguousarray(data)
    out = np.empty((data.shape[0], cols), dtype=np.float32)
    function(data.ctypes.data, out.ctypes.data, out.size)
    return out


def ggml_quantize(name: str, weight: np.ndarray, bytes_per_row: int, importance: np.ndarray | None = None
                  ) -> np.ndarray:
    """uint8 [rows, bytes per row]: ggml's quantize_<name> of float32 ``weight`` [rows, cols] (llama.cpp's
    quantizer's rounding; ``importance`` [cols] is an importance matrix's row, as llama-quantize passes it)."""
    function = getattr(_library(), f"quantize_{_symbol(name)}")
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    function.restype = ctypes.c_size_t
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    out = np.zeros((weight.shape[0], bytes_per_row), dtype=np.uint8)
    imatrix = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    written = function(weight.ctypes.data, out.ctypes.data, weight.shape[0], weight.shape[1],
                       None if imatrix is None else imatrix.ctypes.data)
    assert written == out.size
    return out
