"""A GPTQ-layout checkpoint of ours (Llama or Mistral) written as a GGUF file llama.cpp runs.

The quantized linears' codes go into ggml blocks as they are (``blocks.encode``); embeddings and a float
head are written in float16 and norms in float32, as llama.cpp's converter writes them; the metadata and
tensor names are those of llama.cpp's ``llama`` architecture (the gguf package's constants and name map).
llama.cpp computes rotary embeddings on interleaved pairs where Hugging Face Llama rotates halves, so its
converter reorders the rows of q_proj and k_proj within each head; a row of codes moves with its scales and
zero points, so the same reordering applies to the quantized rows exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch

from compress.errors import UserError
from compress.export_gguf.blocks import BLOCK_TYPES, BlockType, encode
from compress.export_gguf.vocab import add_vocabulary, read_vocabulary
from compress.quant.primitives import QuantizedWeight

ARCHITECTURES = {"LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA, "MistralForCausalLM": gguf.MODEL_ARCH.LLAMA}
FILE_TYPES = {"q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "f16": gguf.LlamaFileType.MOSTLY_F16}
GGML_TYPES = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1,
              "q8_0": gguf.GGMLQuantizationType.Q8_0}


def rotary_row_order(rows: int, heads: int) -> torch.Tensor:
    """Row i of the GGUF tensor is row order[i] of the Hugging Face one: within each head, the first and
    second halves interleaved (llama.cpp's rotary layout)."""
    half = rows // heads // 2
    index = torch.arange(rows).reshape(heads, 2, half)
    return index.transpose(1, 2).reshape(rows)


def reorder_rows(qw: QuantizedWeight, order: torch.Tensor) -> QuantizedWeight:
    return QuantizedWeight(codes=qw.codes[order], scale=qw.scale[:, order], zero=qw.zero[:, order], g_idx=qw.g_idx,
                           bits=qw.bits)


def _numpy(tensor: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    return tensor.detach().float().cpu().numpy().astype(dtype)


def rope_theta(config: dict) -> float:
    """The rotary base: transformers 5 writes it inside ``rope_parameters``, older versions as ``rope_theta``
    (SmolLM2: 100,000; a wrong base shifts every position's rotation and costs 15% perplexity)."""
    parameters = config.get("rope_parameters") or {}
    return float(parameters.get("rope_theta", config.get("rope_theta", 10000.0)))


def write_metadata(writer: gguf.GGUFWriter, config: dict, name: str, type_name: str) -> None:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    writer.add_name(name)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_dimension_count(config.get("head_dim") or hidden // heads)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(FILE_TYPES[type_name])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UserError(f"the model uses {rope.get('rope_type', rope.get('type'))} rope scaling, which export-gguf "
                        "does not write yet")


def check_exportable(config: dict, where: str) -> None:
    """One-line errors, before any work, for a model this writer cannot put in a GGUF file with 32-wide blocks."""
    architecture = (config.get("architectures") or ["?"])[0]
    if architecture not in ARCHITECTURES:
        raise UserError(f"{where} is a {architecture}; export-gguf writes Llama and Mistral checkpoints so far")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    widths = {"hidden_size": hidden, "intermediate_size": config["intermediate_size"],
              "attention width": heads * (config.get("head_dim") or hidden // heads)}
    for name, width in widths.items():
        if width % 32:
            raise UserError(f"{where}'s {name} is {width}, not a multiple of 32: ggml's blocks of 32 cannot hold "
                            "its layers")


def export_llama(folder: Path, out: Path, type_name: str) -> dict:
    """Write ``folder`` to ``out``: a GPTQ checkpoint of ours whose grid fits ``type_name`` with its codes, or
    (``f16``) a float model in float16, the input llama.cpp's own quantizer takes. Returns a record of what
    was written."""
    from compress.checkpoint import load_quantized
    from compress.models import load_model
    from compress.quant.linear import QuantLinear

    config = json.loads((folder / "config.json").read_text())
    check_exportable(config, str(folder))
    architecture = config["architectures"][0]
    block_type: BlockType | None = BLOCK_TYPES.get(type_name)
    vocab = read_vocabulary(folder, config["vocab_size"])
    model = load_model(folder)[0] if block_type is None else load_quantized(folder, torch.float32)[0]
    names = gguf.get_tensor_name_map(ARCHITECTURES[architecture], config["num_hidden_layers"])
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[ARCHITECTURES[architecture]])
    write_metadata(writer, config, folder.name, type_name)
    add_vocabulary(writer, vocab)
    counts = {"blocks": 0, "float16": 0, "float32": 0}
    tied = config.get("tie_word_embeddings", False)
    for module_name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            target = names.get_name(f"{module_name}.weight", try_suffixes=(".weight",))
            if target is None:
                raise UserError(f"{module_name} has no place in llama.cpp's {architecture} layout")
            qw = module.quantized_weight()
            if module_name.endswith("q_proj"):
                qw = reorder_rows(qw, rotary_row_order(qw.codes.shape[0], heads))
            elif module_name.endswith("k_proj"):
                qw = reorder_rows(qw, rotary_row_order(qw.codes.shape[0], kv_heads))
            writer.add_tensor(target, encode(qw, block_type, module_name), raw_dtype=GGML_TYPES[type_name])
            counts["blocks"] += 1
            if module.bias is not None:
                raise UserError(f"{module_name} has a bias, which llama.cpp's llama layout has no place for")
    for param_name, param in model.state_dict().items():
        if not param_name.endswith(".weight"):  # packed layers' tensors (.qweight, ...) were written above
            continue
        if tied and param_name == "lm_head.weight":
            continue  # llama.cpp reads the embedding when the file has no output tensor
        target = names.get_name(param_name, try_suffixes=(".weight",))
        if target is None:
            raise UserError(f"{param_name} has no place in llama.cpp's {architecture} layout")
        if param_name.endswith("q_proj.weight"):
            param = param[rotary_row_order(param.shape[0], heads)]
        elif param_name.endswith("k_proj.weight"):
            param = param[rotary_row_order(param.shape[0], kv_heads)]
        if param.dim() == 1:
            writer.add_tensor(target, _numpy(param, np.float32))
            counts["float32"] += 1
        else:
            writer.add_tensor(target, _numpy(param, np.float16))
            counts["float16"] += 1
    tmp = out.with_name(f".{out.name}.partial")
    # Written whole under another name, then renamed: a killed export leaves no file that looks complete.
    writer.write_header_to_file(path=tmp)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return {"type": type_name, "architecture": architecture, "tensors": counts, "pre_tokenizer": vocab.pre}
