"""Tiny random checkpoints of every supported architecture, built from configs alone.

They make tests and smoke runs possible without any download: 2 blocks, hidden width 64, every
linear width a multiple of 32 (the GPTQ packing unit), and a byte-level BPE tokenizer trained here
on a short built-in text so that any string tokenizes.
"""

from __future__ import annotations

from pathlib import Path

TINY_VOCAB = 512

_ATTENTION_32 = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                     max_position_embeddings=512)

# name -> config keyword arguments (the names each transformers config class uses).
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512, sliding_window=None),
    "mpt": dict(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=512),
    "falcon": dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2),
    "gptj": dict(n_embd=64, n_head=4, n_layer=2, n_positions=512, rotary_dim=8),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                     max_position_embeddings=512),
    "opt": dict(hidden_size=64, ffn_dim=128, num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=512,
                word_embed_proj_dim=64),
    "bloom": dict(hidden_size=64, n_head=4, n_layer=2),
    "bert": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                 max_position_embeddings=512),
    # Mixture of experts: 4 experts, 2 per token.
    "mixtral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512, sliding_window=None, num_local_experts=4,
                    num_experts_per_tok=2),
    # Today's families: heads 32 wide (vLLM's CPU attention needs at least 32), two query heads sharing one
    # key/value head, each family's own parts switched on.
    "llama3": dict(_ATTENTION_32, model_type="llama", intermediate_size=128, tie_word_embeddings=True,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64}),
    "qwen2": dict(_ATTENTION_32, intermediate_size=128, use_sliding_window=False),  # q/k/v carry biases
    "qwen3": dict(_ATTENTION_32, intermediate_size=128, head_dim=32, use_sliding_window=False),  # q/k norms
    # Sliding and global layers, logit and attention soft-capping, the norms after attention and MLP too.
    "gemma2": dict(_ATTENTION_32, intermediate_size=128, head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
                   layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
    # Sliding layers with their own RoPE base, a scaled embedding, q/k norms; six layers, the sixth global, as every
    # Gemma 3 has them (and llama.cpp's gemma3 graph assumes).
    "gemma3": dict(_ATTENTION_32, model_type="gemma3_text", intermediate_size=128, head_dim=32, num_hidden_layers=6,
                   query_pre_attn_scalar=32, sliding_window=16,
                   layer_types=["sliding_attention"] * 5 + ["full_attention"]),
    "phi3": dict(_ATTENTION_32, intermediate_size=128, original_max_position_embeddings=512),  # fused qkv, gate_up
    # Mixture of experts with a shared expert beside the routed ones (4 experts, 2 per token).
    "qwen2_moe": dict(_ATTENTION_32, intermediate_size=128, moe_intermediate_size=64,
                      shared_expert_intermediate_size=128, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                      mlp_only_layers=[],
                      use_sliding_window=False),
}
"""Tiny name -> config keyword arguments; ``model_type`` where the name is not one (Llama 3 is a Llama with its own
rope scaling; Gemma 3's text model is ``gemma3_text``)."""

# Short original text to train the tiny tokenizer on: enough variety for a few hundred merges.
_TRAINING_TEXT = """
The workbench makes open language models smaller and measures what that costs. A model is loaded,
its linear layers are quantized to eight, four, three or two bits, and the result is saved in a
format that other tools read. Calibration text flows through the model one block at a time, so the
memory needed stays close to the size of a single block. Each layer keeps a scale and a zero point
for every group of input columns. The error of every rounding step is pushed onto the columns that
have not been rounded yet, weighted by how strongly the inputs of the layer are correlated.
Perplexity is measured on windows of text that do not overlap; agreement with the original model is
measured as the divergence between the two distributions over the next token, and as the share of
positions where both models rank the same token first. Numbers, dates and names appear in ordinary
prose: in 2023 a team of 12 people trained 7 billion parameters on 2 trillion tokens; the river rose
by 3.5 metres in March; Paris, London, Tokyo and Lagos are large cities. Questions, too? Of course!
Sentences end, paragraphs break, and the tokenizer should learn the common pieces of English words:
the, and, ing, tion, ment, ness, able, ally, ers, est, pre, pro, con, com, dis, over, under, with.
"""


def tiny_model_type(name: str) -> str:
    return TINY_CONFIGS[name].get("model_type", name)


def tiny_config(name: str):
    from transformers import AutoConfig

    kwargs = dict(TINY_CONFIGS[name])
    model_type = kwargs.pop("model_type", name)
    kwargs.setdefault("vocab_size", TINY_VOCAB)
    # Special tokens must exist in the tiny vocabulary (GPT-J's default 50256 does not).
    kwargs.update(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    config = AutoConfig.for_model(model_type, **kwargs)
    config.architectures = [_architecture(model_type)]
    return config


def _architecture(model_type: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    return MODEL_MAPPING_NAMES[model_type]


def tiny_tokenizer(vocab_size: int = TINY_VOCAB):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_TRAINING_TEXT] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_fingerprint(model_type: str) -> str:
    """Changes whenever what build_tiny would write changes, so caches never serve a stale model."""
    import hashlib
    import json

    import transformers

    blob = json.dumps([TINY_CONFIGS[model_type], TINY_VOCAB, _TRAINING_TEXT, transformers.__version__], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def build_tiny(model_type: str, folder: Path, seed: int = 0) -> Path:
    """Write a tiny random checkpoint (safetensors) with its tokenizer into ``folder``."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    config = tiny_config(model_type)
    torch.manual_seed(seed)
    is_causal = config.architectures[0].endswith("ForCausalLM")
    model = (AutoModelForCausalLM if is_causal else AutoModel).from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
