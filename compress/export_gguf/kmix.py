"""Pure rules: which ggml type each tensor of a K-quant file type gets (Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M,
Q6_K), as llama.cpp's quantizer chooses them (``llama_tensor_get_type`` in its llama-quant.cpp), so that a file of
ours and llama.cpp's own file of the same type hold the same types tensor by tensor and compare at the same size.

The mixes give more bits to the tensors that cost most when rounded: the attention value projection and the MLP
down projection of the first and last eighth of the blocks and of every third block between (``more_bits``), the
output head always (Q6_K). A tensor whose rows are not a multiple of 256 weights cannot hold K blocks and falls
back as llama.cpp's does: Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0, Q2_K and Q3_K to Q4_0 (the llama.cpp we
ship; newer ones take IQ4_NL there). Tensors llama.cpp leaves unquantized (norms, biases, routers, anything
one-dimensional) are not given a type here.

Checked against the llama.cpp in the [llamacpp] extra: for every K file type its quantizer gives each tensor the
type these rules give (tests/export_gguf/test_kmix.py). Not followed: its bump of the value projection for 70B
models (it knows the size class from the weights' count) and the IQ file types.
"""

from __future__ import annotations

from dataclasses import dataclass

K_FILE_TYPES = {
    # file type -> the type every quantized tensor starts from
    "q2_k": "q2_k", "q3_k_s": "q3_k", "q3_k_m": "q3_k", "q3_k_l": "q3_k", "q4_k_s": "q4_k", "q4_k_m": "q4_k",
    "q5_k_s": "q5_k", "q5_k_m": "q5_k", "q6_k": "q6_k",
}
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
"""The type a K type becomes in a tensor whose rows are not a multiple of 256 (llama.cpp's own substitutes)."""
K_BLOCK = 256


@dataclass(frozen=True)
class ModelShape:
    """What llama.cpp's rules read of the model besides the tensor names."""

    arch: str
    """llama.cpp's architecture name (llama, falcon, gemma3, ...)."""
    blocks: int
    heads: int
    kv_heads: int
    experts: int = 0
    tied: bool = False
    """The embedding is the output head (no output.weight): it is quantized as the head."""

    @property
    def gqa(self) -> int:
        return self.heads // max(self.kv_heads, 1)


def more_bits(layer: int, layers: int) -> bool:
    """The blocks llama.cpp's _M mixes favour: the first and last eighth, and every third one between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def is_quantized(name: str, shape: tuple[int, ...]) -> bool:
    """Whether llama.cpp's quantizer rounds this tensor at all (2-D and up weights, no norms, no routers)."""
    return (name.endswith(".weight") and len(shape) >= 2 and "norm" not in name
            and "ffn_gate_inp" not in name and "pos_embd" not in name and "token_types" not in name)


class MixRules:
    """llama.cpp's per-tensor choice for one file: tensors are asked in the file's order, as its quantizer
    counts the value projections and down projections it has seen."""

    def __init__(self, file_type: str, model: ModelShape, names: list[str]) -> None:
        if file_type not in K_FILE_TYPES:
            raise ValueError(f"unknown K file type {file_type}: choose from {', '.join(K_FILE_TYPES)}")
        self.file_type, self.model = file_type, model
        self.values_seen, self.downs_seen = 0, 0
        self.values = sum(1 for n in names if "attn_v.weight" in n or "attn_qkv.weight" in n)

    def type_of(self, name: str, row_length: int) -> str:
        chosen = self._choose(name, row_length)
        if chosen in FALLBACK and row_length % K_BLOCK:
            chosen = FALLBACK[chosen]
        return chosen

    def _choose(self, name: str, row_length: int) -> str:
        ft, model = self.file_type, self.model
        default = K_FILE_TYPES[ft]
        if name == "output.weight" or (model.tied and name == "token_embd.weight"):
            return "q8_0" if model.arch == "falcon" or row_length % K_BLOCK else "q6_k"
        if name == "token_embd.weight":
            return default
        if "attn_v.weight" in name:
            return self._value(default)
        if "attn_k.weight" in name:
            return "q8_0" if model.experts == 8 else default
        if "ffn_down" in name:
            return self._down(name, default)
        if "attn_output.weight" in name:
            return self._attention_output(default)
        if "attn_qkv.weight" in name:
            return {"q3_k_m": "q4_k", "q3_k_l": "q4_k", "q4_k_m": "q5_k", "q5_k_m": "q6_k"}.get(ft, default)
        return default

    def _value(self, default: str) -> str:
        ft, model, index = self.file_type, self.model, self.values_seen
        self.values_seen += 1
        if model.experts == 8:
            return "q8_0"  # llama.cpp's bump for eight-expert models (~128 MB at Mixtral's size)
        if ft == "q2_k":
            return "q4_k" if model.gqa >= 4 else "q3_k"
        if ft == "q3_k_m":
            return "q5_k" if index < 2 else "q4_k"
        if ft == "q3_k_l":
            return "q5_k"
        if ft in ("q4_k_m", "q5_k_m") and more_bits(index, self.values):
            return "q6_k"
        if ft == "q4_k_s" and index < 4:
            return "q5_k"
        return default

    def _down(self, name: str, default: str) -> str:
        ft, model = self.file_type, self.model
        # llama.cpp counts the down projections it meets, but takes the model's block count as their number (a
        # Qwen2-MoE's shared and routed down projections are two per block); experts' tensors need not come in block
        # order, so there the block is read from the name.
        layer, layers = self.downs_seen, model.blocks
        if model.experts > 1:
            layer = int(name.split(".")[1])
        self.downs_seen += 1
        falcon = model.arch == "falcon"
        if ft == "q2_k":
            return "q3_k"
        if ft == "q3_k_m":
            return "q5_k" if layer < layers // 16 else "q4_k" if not falcon or more_bits(layer, layers) else "q3_k"
        if ft == "q3_k_l":
            return "q4_k" if falcon else "q5_k"
        if ft == "q4_k_m":
            if falcon:
                return "q6_k" if layer < layers // 16 else "q5_k" if more_bits(layer, layers) else "q4_k"
            return "q6_k" if more_bits(layer, layers) else default
        if ft == "q5_k_m" and more_bits(layer, layers):
            return "q6_k"
        if ft == "q4_k_s" and not falcon and layer < layers // 8:
            return "q5_k"
        return default

    def _attention_output(self, default: str) -> str:
        ft, model = self.file_type, self.model
        if model.arch == "falcon":
            return "q4_k" if ft == "q3_k_l" else default
        if model.experts == 8:
            return "q5_k" if ft in ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m") else default
        return {"q2_k": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(ft, default)
