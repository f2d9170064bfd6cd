"""llama.cpp (llama-cpp-python) for GGUF files: its CPU kernels, named by the block types the file holds.

The config and tokenizer come from the file itself through transformers' GGUF reader, so the windows are
cut by the tokenizer the file carries (for our exports, the same ids as the source model's tokenizer).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.backends import Float32Runtime, register_backend

ACTIVATION_TYPES = {
    # ggml's CPU matmul converts the activations to the weight type's vec_dot partner before the dot product.
    "Q4_0": "q8_0", "Q4_1": "q8_1", "Q5_0": "q8_0", "Q5_1": "q8_1", "Q8_0": "q8_0",
    "Q2_K": "q8_K", "Q3_K": "q8_K", "Q4_K": "q8_K", "Q5_K": "q8_K", "Q6_K": "q8_K",
    "F16": "f16", "BF16": "bf16", "F32": "f32",
}
NOMINAL_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q5_K": 5,
                "Q6_K": 6, "F16": 16, "BF16": 16, "F32": 32}


@dataclass(frozen=True)
class GgufSummary:
    """What a GGUF file's blocks hold: the matrices of the transformer blocks by type, and the rest."""

    block_types: dict[str, int]
    """ggml type -> count of 2-D tensors inside the transformer blocks (the linear layers)."""
    other_types: dict[str, str]
    """Name -> ggml type of the 2-D tensors outside the blocks (embedding, output head)."""
    block_bits_per_weight: float
    """Stored bits per weight of the blocks' matrices, scales and minimums included."""
    file_type: str

    @property
    def main_type(self) -> str:
        return max(self.block_types, key=self.block_types.get) if self.block_types else "F32"


def summarize_gguf(path: Path) -> GgufSummary:
    import gguf

    reader = gguf.GGUFReader(path)
    block_types: Counter = Counter()
    other: dict[str, str] = {}
    bits, weights = 0, 0
    for tensor in reader.tensors:
        if len(tensor.shape) < 2:
            continue
        kind = tensor.tensor_type.name
        if tensor.name.startswith("blk."):
            block_types[kind] += 1
            bits += 8 * int(tensor.n_bytes)
            weights += int(tensor.n_elements)
        else:
            other[tensor.name] = kind
    field = reader.get_field("general.file_type")
    file_type = gguf.LlamaFileType(int(field.contents())).name if field is not None else "?"
    return GgufSummary(dict(block_types), other, bits / weights if weights else 0.0, file_type)


def describe(summary: GgufSummary, version: str) -> str:
    blocks = ", ".join(f"{kind.lower()} x{count} (activations as {ACTIVATION_TYPES.get(kind, '?')})"
                       for kind, count in sorted(summary.block_types.items()))
    others = ", ".join(f"{name} {kind.lower()}" for name, kind in sorted(summary.other_types.items()))
    if "output.weight" not in summary.other_types:
        others += " (output tied to the embedding)"
    return f"llama.cpp CPU (llama-cpp-python {version}, ggml): block matrices {blocks}; {others}"


@register_backend
class LlamaCpp(Float32Runtime):
    name = "llamacpp"
    summary = "llama.cpp's CPU kernels (llama-cpp-python) on a GGUF file"
    formats = ("gguf",)
    devices = ("cpu",)
    requires = "llama_cpp"
    extra = "llamacpp"
    float32_only = "llama.cpp computes in the file's own types with float32 activations"

    def load(self, resolved, qcfg, dtype, device, trust_remote_code):
        import llama_cpp

        from compress.backends.llamacpp_model import LlamaCppCausalLM
        from compress.bench.load import LoadedModel
        from compress.models import gguf_config_and_tokenizer

        path = resolved.path
        config, tokenizer = gguf_config_and_tokenizer(path)
        threads = torch.get_num_threads()
        model = LlamaCppCausalLM(path, config, threads)
        summary = summarize_gguf(path)
        main = summary.main_type
        bits = float(NOMINAL_BITS.get(main, 32))
        quantization = None if main in ("F32",) else {
            "bits": int(bits), "group_size": 32 if main in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0") else
            256 if main.endswith("_K") else -1, "sym": main in ("Q4_0", "Q5_0", "Q8_0"),
            "method": f"GGUF {summary.file_type}", "bits_per_weight": round(summary.block_bits_per_weight, 4)}
        return LoadedModel(model, tokenizer, resolved, torch.float32, quantization,
                           describe(summary, llama_cpp.__version__), bits, backend=self.name,
                           threads={"llama_cpp": threads})
