"""Per architecture: llama.cpp's name for it, the metadata its loader reads, and the row orders its graph
expects where they differ from Hugging Face's (the same as llama.cpp's converter, convert_hf_to_gguf.py).

A row order moves whole output rows, so it applies to a quantized weight exactly: each row's codes move with
its scales and zero points, and a bias moves with its rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import gguf
import torch

from compress.errors import UserError


def rope_theta(config: dict) -> float:
    """The rotary base: transformers 5 writes it inside ``rope_parameters``, older versions as ``rope_theta``
    (SmolLM2: 100,000; a wrong base shifts every position's rotation and costs 15% perplexity)."""
    parameters = config.get("rope_parameters") or {}
    return float(parameters.get("rope_theta", config.get("rope_theta", config.get("rotary_emb_base", 10000.0))))


def rope_type(config: dict) -> str:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return rope.get("rope_type", rope.get("type", "default"))


def _plain_rope(config: dict, also: tuple[str, ...] = ()) -> None:
    """Refuse a rope scaling other than none (and ``also``, which the layout writes)."""
    kind = rope_type(config)
    if kind != "default" and kind not in also:
        raise UserError(f"the model uses {kind} rope scaling, which export-gguf does not write yet")


def llama3_rope_factors(config: dict) -> torch.Tensor:
    """Llama 3.1's rope scaling as llama.cpp applies it: one factor per rotary frequency, each frequency divided by
    its factor (``rope_freqs.weight``, what llama.cpp's converter writes). Taken from transformers' own rope
    functions, the default frequencies over Llama 3's, so the file rotates exactly as the model does."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = AutoConfig.for_model(**config)
    default = 1.0 / (rope_theta(config) ** (torch.arange(0, _head_dim(config), 2, dtype=torch.int64).float()
                                            / _head_dim(config)))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, torch.device("cpu"))
    return (default / scaled.float()).to(torch.float32)


# --- row orders ------------------------------------------------------------------------------------


def rotary_row_order(rows: int, heads: int) -> torch.Tensor:
    """Row i of the GGUF tensor is row order[i] of the Hugging Face one: within each head, the first and
    second halves interleaved (llama.cpp's rotary layout for Llama, which rotates pairs where Hugging Face
    rotates halves)."""
    half = rows // heads // 2
    index = torch.arange(rows).reshape(heads, 2, half)
    return index.transpose(1, 2).reshape(rows)


def per_head_qkv_order(rows: int, heads: int) -> torch.Tensor:
    """Fused QKV stored per head as [q_h, k_h, v_h] (GPT-NeoX, BLOOM) -> all q heads, all k, all v."""
    return torch.arange(rows).reshape(heads, 3, rows // heads // 3).transpose(0, 1).reshape(rows)


def grouped_qkv_order(rows: int, heads: int, kv_heads: int) -> torch.Tensor:
    """Falcon's fused QKV, kv_heads groups of (heads / kv_heads queries, one key, one value) -> all queries,
    all keys, all values (llama.cpp's "jploski" layout)."""
    head_dim = rows // (heads + 2 * kv_heads)
    index = torch.arange(rows).reshape(kv_heads, heads // kv_heads + 2, head_dim)
    return torch.cat([index[:, :-2].reshape(-1), index[:, -2].reshape(-1), index[:, -1].reshape(-1)])


# --- the layouts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    arch: gguf.MODEL_ARCH
    metadata: Callable[[gguf.GGUFWriter, dict], None]
    """Writes the architecture's hyperparameters (beyond name, file type and vocabulary)."""
    row_order: Callable[[str, int, dict], torch.Tensor | None]
    """(Hugging Face module name, rows, config) -> the rows' order in the GGUF tensor, or None to keep it."""
    strip_prefix: str = ""
    """A prefix the gguf name map does not expect on some names (BLOOM's "transformer.")."""
    writes_tied_output: bool = False
    """Write a tied head as its own tensor (llama.cpp's converter does for BLOOM)."""
    extra_tensors: Callable[[dict], dict[str, torch.Tensor]] = lambda config: {}
    """Tensors llama.cpp reads that the model holds as no parameter (Llama 3's rope factors), by GGUF name."""
    norm_offset: float = 0.0
    """Added to every norm weight: Gemma's norms scale by 1 + weight, llama.cpp's by the weight it reads."""


def _heads(config: dict) -> int:
    return config.get("num_attention_heads") or config.get("n_head") or config["n_heads"]


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _llama_metadata(writer: gguf.GGUFWriter, config: dict) -> None:
    """Llama and the families llama.cpp runs with its hyperparameters (Qwen 2 and 3): no rope scaling but Llama 3's,
    which goes in as a tensor (``_llama_tensors``)."""
    _plain_rope(config, also=("llama3",))
    _decoder_sizes(writer, config, default_context=2048)
    writer.add_rope_dimension_count(_head_dim(config))
    writer.add_rope_freq_base(rope_theta(config))


def _decoder_sizes(writer: gguf.GGUFWriter, config: dict, default_context: int) -> None:
    """The sizes every RMS-normed grouped-query decoder here writes: context, widths, blocks, heads, head size."""
    heads = config["num_attention_heads"]
    writer.add_context_length(config.get("max_position_embeddings", default_context))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))


def _llama_tensors(config: dict) -> dict[str, torch.Tensor]:
    if rope_type(config) != "llama3":
        return {}
    return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": llama3_rope_factors(config)}


def _gemma_metadata(writer: gguf.GGUFWriter, config: dict) -> None:
    """What Gemma 2 and 3 share in llama.cpp: sizes, the head size as key and value length, the sliding window.
    llama.cpp scales attention by 1/sqrt(head size) (its 27B case aside), so a query_pre_attn_scalar that differs is
    refused; it scales the embedding by sqrt(hidden) itself."""
    head_dim = _head_dim(config)
    scalar = config.get("query_pre_attn_scalar")
    if scalar is not None and scalar != head_dim:
        raise UserError(f"this Gemma scales its queries by 1/sqrt({scalar}), not by 1/sqrt of its head size "
                        f"({head_dim}), which is what llama.cpp's gemma graphs do for every size but 27B")
    _decoder_sizes(writer, config, default_context=8192)
    if config.get("sliding_window"):
        writer.add_sliding_window(int(config["sliding_window"]))


def _check_layer_types(config: dict, every: int, graph: str) -> None:
    """llama.cpp fixes which layers slide (all but every ``every``-th); a model laid out otherwise is refused."""
    layers = config["num_hidden_layers"]
    expected = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(layers)]
    if config.get("layer_types") not in (None, expected):
        raise UserError(f"llama.cpp's {graph} graph makes every {every} layer global and the others sliding; this "
                        f"model's layer_types are {config['layer_types']}")


def _gemma2_metadata(writer: gguf.GGUFWriter, config: dict) -> None:
    _plain_rope(config)
    _check_layer_types(config, 2, "gemma2")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if config.get(key) is None:  # llama.cpp would cap with its own default instead
            raise UserError(f"this Gemma 2 has no {key}, which llama.cpp's gemma2 graph always applies")
    _gemma_metadata(writer, config)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
    writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))


GEMMA3_LOCAL_ROPE_BASE = 10000.0
"""The rotary base of Gemma 3's sliding layers: llama.cpp's gemma3 graph fixes it, its converter writes none."""


def _gemma3_metadata(writer: gguf.GGUFWriter, config: dict) -> None:
    rope = config.get("rope_parameters") or {}
    full, local = rope.get("full_attention", rope), rope.get("sliding_attention", {})
    for kind, parameters in (("global", full), ("sliding", local)):
        if parameters.get("rope_type", "default") != "default":
            raise UserError(f"this Gemma 3's {kind} layers use {parameters['rope_type']} rope scaling, which "
                            "export-gguf does not write yet")
    if float(local.get("rope_theta", GEMMA3_LOCAL_ROPE_BASE)) != GEMMA3_LOCAL_ROPE_BASE:
        raise UserError(f"this Gemma 3's sliding layers rotate with base {local['rope_theta']}; llama.cpp's gemma3 "
                        f"graph fixes {GEMMA3_LOCAL_ROPE_BASE:g}")
    if config.get("attn_logit_softcapping") is not None:
        raise UserError("this Gemma 3 caps its attention scores, which llama.cpp's gemma3 graph does not")
    _check_layer_types(config, 6, "gemma3")
    _gemma_metadata(writer, config)
    writer.add_rope_freq_base(float(full.get("rope_theta", 1_000_000.0)))
    if config.get("final_logit_softcapping") is not None:
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))


def _phi3_metadata(writer: gguf.GGUFWriter, config: dict) -> None:
    """Phi-3: Llama's hyperparameters with its q/k/v and gate/up fused as llama.cpp reads them; the long-context
    variants' rope scaling (factors for short and long contexts) is not written yet, nor a sliding window."""
    _plain_rope(config)
    if config.get("sliding_window"):
        raise UserError("this Phi-3 uses sliding-window attention, which export-gguf does not write yet")
    fraction = (config.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)
    _decoder_sizes(writer, config, default_context=4096)
    writer.add_rope_dimension_count(int(fraction * _head_dim(config)))
    writer.add_rope_freq_base(rope_theta(config))


def _qwen_metadata(writer: gguf.GGUFWriter, config: dict) -> None:
    _plain_rope(config)  # no rope_freqs tensor for Qwen: Llama 3's scaling is refused here, not written without it
    if config.get("use_sliding_window"):
        raise UserError("this Qwen uses sliding-window attention, which llama.cpp's qwen graphs do not run")
    _llama_metadata(writer, config)


def _experts(writer: gguf.GGUFWriter, config: dict) -> None:
    """How many experts a mixture-of-experts block holds and routes each token to (its expert tensors are the
    per-expert layers stacked, ``writer``)."""
    writer.add_expert_count(config.get("num_local_experts") or config["num_experts"])
    writer.add_expert_used_count(config["num_experts_per_tok"])


def _mixtral_metadata(writer: gguf.GGUFWriter, config: dict) -> None:
    """Mixtral runs as llama.cpp's llama with experts: softmax over the router, top-k weights renormalized, as in
    transformers."""
    _llama_metadata(writer, config)
    _experts(writer, config)


def _qwen2_moe_metadata(writer: gguf.GGUFWriter, config: dict) -> None:
    """Qwen2-MoE: every block a mixture of experts beside a shared expert under a sigmoid gate. llama.cpp's qwen2moe
    graph keeps the top-k softmax weights as they are, so a config that renormalizes them, or keeps some blocks
    dense, would run differently there: refused."""
    if config.get("norm_topk_prob"):
        raise UserError("this Qwen2-MoE renormalizes its top-k routing weights (norm_topk_prob), which llama.cpp's "
                        "qwen2moe graph does not")
    if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
        raise UserError("this Qwen2-MoE keeps some blocks dense (mlp_only_layers / decoder_sparse_step), which "
                        "llama.cpp's qwen2moe graph does not")
    _qwen_metadata(writer, config)
    _experts(writer, config)
    writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])


def _keep_rows(module: str, rows: int, config: dict) -> None:
    """Every row where Hugging Face has it (families that rotate halves as llama.cpp does, or do not rotate)."""
    return None


def _llama_rows(module: str, rows: int, config: dict) -> torch.Tensor | None:
    heads = config["num_attention_heads"]
    if module.endswith("self_attn.q_proj"):
        return rotary_row_order(rows, heads)
    if module.endswith("self_attn.k_proj"):
        return rotary_row_order(rows, config.get("num_key_value_heads") or heads)
    return None


def _neox_metadata(writer: gguf.GGUFWriter, config: dict) -> None:
    _plain_rope(config)
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    fraction = (config.get("rope_parameters") or {}).get("partial_rotary_factor", config.get("rotary_pct", 1.0))
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(int(fraction * (hidden // heads)))
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_head_count(heads)
    writer.add_parallel_residual(config.get("use_parallel_residual", True))
    writer.add_layer_norm_eps(float(config["layer_norm_eps"]))


def _per_head_qkv_rows(module: str, rows: int, config: dict) -> torch.Tensor | None:
    if module.endswith("query_key_value"):
        return per_head_qkv_order(rows, _heads(config))
    return None


def _bloom_metadata(writer: gguf.GGUFWriter, config: dict) -> None:
    hidden, heads = config["hidden_size"], _heads(config)
    writer.add_context_length(config.get("seq_length", 2048))  # ALiBi: no trained length in the config
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(4 * hidden)
    writer.add_block_count(config["n_layer"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_layer_norm_eps(float(config["layer_norm_epsilon"]))


def _mpt_metadata(writer: gguf.GGUFWriter, config: dict) -> None:
    attn = config.get("attn_config") or {}
    if not attn.get("alibi", False):
        raise UserError("this MPT has no ALiBi (learned positions): llama.cpp's mpt graph runs ALiBi models only")
    writer.add_context_length(config["max_seq_len"])
    writer.add_embedding_length(config["d_model"])
    writer.add_block_count(config["n_layers"])
    writer.add_feed_forward_length(4 * config["d_model"])  # Hugging Face's MPT is 4x wide, whatever expansion_ratio says
    writer.add_head_count(config["n_heads"])
    if attn.get("kv_n_heads"):
        writer.add_head_count_kv(attn["kv_n_heads"])
    writer.add_layer_norm_eps(float(config.get("layer_norm_epsilon", 1e-5)))
    if attn.get("clip_qkv") is not None:
        writer.add_clamp_kqv(float(attn["clip_qkv"]))
    writer.add_max_alibi_bias(float(attn.get("alibi_bias_max", 8)))


def falcon_kv_heads(config: dict) -> int:
    """The key/value heads Hugging Face's Falcon really uses: one for the old multi-query layout, whatever
    num_kv_heads says."""
    if config.get("new_decoder_architecture") or not config.get("multi_query", True):
        return config.get("num_kv_heads") or _heads(config)
    return 1


def _falcon_metadata(writer: gguf.GGUFWriter, config: dict) -> None:
    _plain_rope(config)
    if config.get("alibi"):
        raise UserError("this Falcon uses ALiBi: llama.cpp's falcon graph runs rotary Falcons only")
    if not config.get("parallel_attn", True) and not config.get("new_decoder_architecture"):
        raise UserError("this Falcon runs attention and MLP one after the other: llama.cpp's falcon graph runs "
                        "them in parallel only")
    hidden = config["hidden_size"]
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_tensor_data_layout("jploski")  # the fused QKV reordered, see grouped_qkv_order
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(config.get("ffn_hidden_size") or 4 * hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(_heads(config))
    writer.add_head_count_kv(falcon_kv_heads(config))
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_eps(float(config["layer_norm_epsilon"]))


def _falcon_rows(module: str, rows: int, config: dict) -> torch.Tensor | None:
    if module.endswith("query_key_value"):
        return grouped_qkv_order(rows, _heads(config), falcon_kv_heads(config))
    return None


LAYOUTS: dict[str, Layout] = {
    "LlamaForCausalLM": Layout(gguf.MODEL_ARCH.LLAMA, _llama_metadata, _llama_rows, extra_tensors=_llama_tensors),
    # Qwen's rotary pairs are halves, as llama.cpp's qwen graphs rotate them: no row order; q/k/v biases and Qwen 3's
    # q/k norms keep their names through gguf's map.
    "Qwen2ForCausalLM": Layout(gguf.MODEL_ARCH.QWEN2, _qwen_metadata, _keep_rows),
    "Qwen3ForCausalLM": Layout(gguf.MODEL_ARCH.QWEN3, _qwen_metadata, _keep_rows),
    # Phi-3 rotates halves too; its fused qkv_proj (all q rows, then k, then v) and gate_up_proj are llama.cpp's.
    "Phi3ForCausalLM": Layout(gguf.MODEL_ARCH.PHI3, _phi3_metadata, _keep_rows),
    # Gemma rotates halves as llama.cpp's gemma graphs do: no row order. Its norms (Gemma 3's q/k norms too) get 1.
    "Gemma2ForCausalLM": Layout(gguf.MODEL_ARCH.GEMMA2, _gemma2_metadata, _keep_rows,
                                norm_offset=1.0),
    "Gemma3ForCausalLM": Layout(gguf.MODEL_ARCH.GEMMA3, _gemma3_metadata, _keep_rows,
                                norm_offset=1.0),
    "MistralForCausalLM": Layout(gguf.MODEL_ARCH.LLAMA, _llama_metadata, _llama_rows, extra_tensors=_llama_tensors),
    # Mixture of experts: each block's experts go in as three stacked tensors (writer), the router in float32.
    "MixtralForCausalLM": Layout(gguf.MODEL_ARCH.LLAMA, _mixtral_metadata, _llama_rows, extra_tensors=_llama_tensors),
    "Qwen2MoeForCausalLM": Layout(gguf.MODEL_ARCH.QWEN2MOE, _qwen2_moe_metadata, _keep_rows),
    "GPTNeoXForCausalLM": Layout(gguf.MODEL_ARCH.GPTNEOX, _neox_metadata, _per_head_qkv_rows),
    "BloomForCausalLM": Layout(gguf.MODEL_ARCH.BLOOM, _bloom_metadata, _per_head_qkv_rows,
                               strip_prefix="transformer.", writes_tied_output=True),
    "MptForCausalLM": Layout(gguf.MODEL_ARCH.MPT, _mpt_metadata, _keep_rows),
    "FalconForCausalLM": Layout(gguf.MODEL_ARCH.FALCON, _falcon_metadata, _falcon_rows),
}
NOT_IN_LLAMA_CPP = {
    "GPTJForCausalLM": "llama.cpp has no GPT-J graph (its converter does not take GPT-J)",
    "OPTForCausalLM": "llama.cpp has no OPT architecture",
}


def layout_for(config: dict, where: str) -> Layout:
    architecture = (config.get("architectures") or ["?"])[0]
    if architecture in LAYOUTS:
        return LAYOUTS[architecture]
    why = NOT_IN_LLAMA_CPP.get(architecture, "export-gguf does not know it")
    raise UserError(f"{where} is a {architecture}: {why}. export-gguf writes "
                    f"{', '.join(sorted({a.removesuffix('ForCausalLM') for a in LAYOUTS}))}")
