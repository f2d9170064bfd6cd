"""One of our checkpoints (GPTQ layout, or a float model for f16) written as a GGUF file llama.cpp runs.

The quantized linears' codes go into ggml blocks as they are (``blocks.encode``), in the row order llama.cpp's
graph expects (``layouts``). The float embedding and head take the types llama.cpp's own quantizer gives them
in a file of that type (``float_matrix_type``), so our files and llama.cpp's compare at the same size; other
float matrices (layers left out of quantization) stay float16, norms and biases float32, as llama.cpp's
converter writes them. The metadata and tensor names are those of llama.cpp's architecture (the gguf
package's constants and name map).
"""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.quants import quantize

from compress.errors import UserError
from compress.output import WRITER
from compress.export_gguf.blocks import BLOCK, BLOCK_TYPES, BlockType, encode
from compress.export_gguf.layouts import Layout, layout_for
from compress.export_gguf.vocab import add_vocabulary, read_vocabulary
from compress.quant.primitives import QuantizedWeight

FILE_TYPES = {"q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "f16": gguf.LlamaFileType.MOSTLY_F16}
GGML_BLOCK_BYTES = {gguf.GGMLQuantizationType.Q8_0: 34, gguf.GGMLQuantizationType.Q4_0: 18,
                    gguf.GGMLQuantizationType.Q4_1: 20}
"""Bytes of one block of 32 weights in the legacy types a float matrix is rounded into."""
GGML_TYPES = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1,
              "q8_0": gguf.GGMLQuantizationType.Q8_0}


def float_matrix_type(target: str, type_name: str, tied: bool, keep_float: bool = False
                      ) -> gguf.GGMLQuantizationType | None:
    """The ggml type of a float matrix in a ``type_name`` file, None for float16. llama.cpp's quantizer gives
    the output head (or an embedding tied to it) Q6_K, or Q8_0 where rows are not a multiple of 256, and an
    untied embedding the file's own type. ggml's Python quantizer writes no Q6_K, so the head is Q8_0 here
    (at most 0.6 bits per weight more than llama.cpp's choice, and closer to float)."""
    if type_name == "f16" or keep_float:
        return None
    if target == "output.weight" or (target == "token_embd.weight" and tied):
        return gguf.GGMLQuantizationType.Q8_0
    if target == "token_embd.weight":
        return GGML_TYPES[type_name]
    return None


def check_widths(folder: Path, where: str) -> None:
    """One-line error, before any quantizing, for a float model with a linear layer ggml's blocks of 32 cannot
    hold (the model is built on the meta device: no weights are read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module.in_features % 32:
            raise UserError(f"{where}'s {name} has {module.in_features} input columns, not a multiple of 32: "
                            "ggml's blocks of 32 cannot hold it")


def reorder_rows(qw: QuantizedWeight, order: torch.Tensor) -> QuantizedWeight:
    return QuantizedWeight(codes=qw.codes[order], scale=qw.scale[:, order], zero=qw.zero[:, order], g_idx=qw.g_idx,
                           bits=qw.bits)


def _numpy(tensor: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    return tensor.detach().float().cpu().numpy().astype(dtype)


class _Names:
    def __init__(self, layout: Layout, config: dict) -> None:
        self.layout = layout
        self.map = gguf.get_tensor_name_map(layout.arch, _block_count(config))

    def __call__(self, hf_name: str) -> str:
        suffixes = (".weight", ".bias")
        target = self.map.get_name(hf_name, try_suffixes=suffixes)
        if target is None and self.layout.strip_prefix and hf_name.startswith(self.layout.strip_prefix):
            target = self.map.get_name(hf_name.removeprefix(self.layout.strip_prefix), try_suffixes=suffixes)
        if target is None:
            raise UserError(f"{hf_name} has no place in llama.cpp's {self.layout.arch.name.lower()} layout")
        return target


PHI3_NAME_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")
"""llama.cpp looks these tokens up (and fails to load without them) in any file whose general.name holds "phi3" or
"phi-3", to set Phi-3's token attributes."""


def model_name(name: str, tokens: list[str]) -> str:
    """general.name: the folder's, except that a name llama.cpp would take for Phi-3's is kept from it where the
    vocabulary lacks the tokens that case reads (a Phi-3-shaped model with another tokenizer: tiny-phi3)."""
    if re.search(r"phi-?3", name, re.IGNORECASE) and not set(PHI3_NAME_TOKENS) <= set(tokens):
        return re.sub(r"phi-?3", "phi", name, flags=re.IGNORECASE)
    return name


EXPERT_LAYER = re.compile(r"^(?P<experts>.*\.experts)\.(?P<index>\d+)\.(?P<kind>gate_proj|up_proj|down_proj)$")
"""One expert's layer (compress.moe's names): llama.cpp holds each kind of a block's experts as one 3-D tensor."""
FLOAT32_MATRICES = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")
"""Routers stay float32, as llama.cpp's converter keeps them (they are small, and pick the experts)."""


def _block_count(config: dict) -> int:
    return config.get("num_hidden_layers") or config.get("n_layer") or config["n_layers"]


def start_file(folder: Path, config: dict, layout: Layout, file_type: gguf.LlamaFileType):
    """A GGUF writer holding the file's metadata and vocabulary (the tensors to come), and the vocabulary."""
    vocab = read_vocabulary(folder, config["vocab_size"])
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[layout.arch])
    writer.add_name(model_name(folder.name, vocab.tokens))
    writer.add_quantized_by(WRITER)  # what lets --force replace this file later, and nothing it did not write
    layout.metadata(writer, config)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocabulary(writer, vocab)
    return writer, vocab


def write_streamed(writer: gguf.GGUFWriter, out: Path, entries: list) -> None:
    """Every tensor's place and size first, then its data one tensor at a time: ``entries`` are (GGUF name, shape,
    numpy dtype, bytes, ggml type or None, a function that makes the data), so the file is never held in memory."""
    for target, dims, dtype, nbytes, kind, _ in entries:
        writer.add_tensor_info(target, dims, np.dtype(dtype), nbytes,
                               raw_dtype=getattr(gguf.GGMLQuantizationType, kind.upper()) if kind else None)
    writer.write_header_to_file(path=out)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for *_, make in entries:
        writer.write_tensor_data(np.ascontiguousarray(make()))
    writer.close()


def extra_entries(layout: Layout, config: dict) -> list:
    """``write_streamed`` entries for the tensors llama.cpp reads that the model holds as no parameter (float32)."""
    entries = []
    for target, tensor in layout.extra_tensors(config).items():
        data = _numpy(tensor, np.float32)
        entries.append((target, data.shape, np.float32, data.nbytes, None, lambda data=data: data))
    return entries


def export_float(folder: Path, out: Path) -> dict:
    """``folder``'s float model as float16 (norms and routers float32), read and written one tensor at a time from
    its shards: what llama.cpp's own quantizer takes, whatever the model's size."""
    from compress.lazy import LazyModel
    from compress.shards import ShardReader

    config = json.loads((folder / "config.json").read_text())
    layout = layout_for(config, str(folder))
    writer, vocab = start_file(folder, config, layout, FILE_TYPES["f16"])
    lazy = LazyModel(folder, torch.float32, reader=ShardReader(folder))  # a meta skeleton: experts one layer each
    names = _Names(layout, config)
    tied = config.get("tie_word_embeddings", False) and not layout.writes_tied_output
    shapes = {key: tuple(value.shape) for key, value in lazy.model.state_dict().items()}
    stacks: dict[str, list[str]] = {}
    entries, counts = [], {"blocks": 0, "float16": 0, "float32": 0}
    for key, dims in shapes.items():
        module_name, _, kind = key.rpartition(".")
        if kind not in ("weight", "bias") or (tied and module_name == "lm_head"):
            continue  # llama.cpp reads the embedding when the file has no output tensor
        match = EXPERT_LAYER.match(module_name)
        if match and kind == "weight":
            stacks.setdefault(f"{match['experts']}.{match['kind']}", []).append(key)
            continue
        target = names(key)
        as_float32 = len(dims) == 1 or target.endswith(FLOAT32_MATRICES)
        dtype = np.float32 if as_float32 else np.float16
        entries.append((target, dims, dtype, int(np.prod(dims)) * np.dtype(dtype).itemsize, None,
                        lambda key=key, dtype=dtype: _float_tensor(lazy, key, dtype, layout, config)))
        counts["float32" if as_float32 else "float16"] += 1
    for stacked, members in stacks.items():
        dims = (len(members), *shapes[members[0]])
        entries.append((names(f"{stacked}.weight"), dims, np.float16, int(np.prod(dims)) * 2, None,
                        lambda members=members: np.stack([_numpy(lazy.read(m), np.float16) for m in members])))
        counts["float16"] += 1
    entries += extra_entries(layout, config)
    counts["float32"] += len(layout.extra_tensors(config))
    write_streamed(writer, out, entries)
    return {"type": "f16", "architecture": config["architectures"][0], "gguf_architecture":
            gguf.MODEL_ARCH_NAMES[layout.arch], "tensors": counts, "rounded": {}, "pre_tokenizer": vocab.pre}


def _float_param(lazy, name: str, layout: Layout, config: dict, dtype) -> np.ndarray:
    """One float tensor of a model opened lazily, as the file holds it (read, then given back)."""
    module_name, _, attr = name.rpartition(".")
    read = lazy.materialize_names([name])
    tensor = getattr(lazy.model.get_submodule(module_name), attr).detach()
    order = layout.row_order(module_name, tensor.shape[0], config)
    if order is not None:
        tensor = tensor[order]
    if layout.norm_offset and name.endswith("norm.weight"):
        tensor = tensor + layout.norm_offset
    data = _numpy(tensor, dtype)
    lazy.release_names(read.names)
    return data


def _float_tensor(lazy, key: str, dtype, layout: Layout, config: dict, tensor: torch.Tensor | None = None) -> np.ndarray:
    """One float tensor as the file holds it: in the rows' GGUF order, Gemma's norms with their offset; ``tensor``
    its values where they are not the checkpoint's (a norm AWQ folded scales into)."""
    tensor = lazy.read(key) if tensor is None else tensor
    order = layout.row_order(key.rpartition(".")[0], tensor.shape[0], config)
    if order is not None:
        tensor = tensor[order]
    if layout.norm_offset and key.endswith("norm.weight"):
        tensor = tensor.float() + layout.norm_offset
    return _numpy(tensor, dtype)


def export_checkpoint(folder: Path, out: Path, type_name: str, keep_float: bool = False) -> dict:
    """Write ``folder`` to the file ``out`` (the caller renames it into place): a GPTQ checkpoint of ours whose
    grid fits ``type_name`` with its codes, or (``f16``) a float model in float16 (``export_float``), the input
    llama.cpp's own quantizer takes. Both stream: each layer is read, encoded and written one at a time (a block's
    experts of one kind together). Returns a record of what was written. ``keep_float`` writes the embedding and a
    float head in float16 instead of llama.cpp's types."""
    from compress.checkpoint import open_quantized
    from compress.moe import unfuse_experts
    from compress.quant.linear import QuantLinear

    if type_name == "f16":
        return export_float(folder, out)
    config = json.loads((folder / "config.json").read_text())
    layout = layout_for(config, str(folder))
    block_type: BlockType = BLOCK_TYPES[type_name]
    writer, vocab = start_file(folder, config, layout, FILE_TYPES[type_name])
    lazy = open_quantized(folder, torch.float32)
    model = lazy.model
    unfuse_experts(model)  # experts one layer each (our checkpoints store them so; a fused module is split)
    names = _Names(layout, config)
    counts = {"blocks": 0, "float16": 0, "float32": 0}
    rounded: dict[str, str] = {}  # float matrices written in a block type by ggml's rounding
    quantized: set[str] = set()
    entries: list = []
    stacks: dict[str, tuple[list[str], bool]] = {}  # a block's experts of one kind: (members, packed)

    def stack(member: str, packed: bool) -> bool:
        match = EXPERT_LAYER.match(member)
        if match is None:
            return False
        key = f"{match['experts']}.{match['kind']}"
        members, was_packed = stacks.setdefault(key, ([], packed))
        if was_packed != packed:
            raise UserError(f"{key}: some experts are quantized and some are not; llama.cpp holds a block's "
                            "experts in one tensor of one type: quantize all of them (or export the float model with "
                            "--type f16)")
        members.append(member)
        return True

    def packed_blocks(module_name: str) -> np.ndarray:
        module = model.get_submodule(module_name)
        read = lazy.materialize(module, module_name)
        qw = module.quantized_weight()
        order = layout.row_order(module_name, qw.codes.shape[0], config)
        blocks = encode(qw if order is None else reorder_rows(qw, order), block_type, module_name)
        lazy.release_names(read.names)
        return blocks

    for module_name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            quantized.add(module_name)
            if not stack(module_name, packed=True):
                rows, nbytes = module.out_features, module.in_features // BLOCK * block_type.bytes_per_block
                entries.append((names(f"{module_name}.weight"), (rows, nbytes), np.uint8, rows * nbytes, type_name,
                                lambda name=module_name: packed_blocks(name)))
                counts["blocks"] += 1
    tied = config.get("tie_word_embeddings", False) and not layout.writes_tied_output
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    for param_name, dims in shapes.items():
        module_name, _, kind = param_name.rpartition(".")
        if kind not in ("weight", "bias") or (module_name in quantized and kind == "weight"):
            continue  # the packed layers' tensors (.qweight, ...) are written as blocks
        if tied and module_name == "lm_head":
            continue  # llama.cpp reads the embedding when the file has no output tensor
        if kind == "weight" and stack(module_name, packed=False):
            continue
        target = names(param_name)
        ggml_type = float_matrix_type(target, type_name, tied, keep_float) if len(dims) == 2 else None
        read = partial(_float_param, lazy, param_name, layout, config)
        if len(dims) == 1 or target.endswith(FLOAT32_MATRICES):
            entries.append((target, dims, np.float32, int(np.prod(dims)) * 4, None, lambda read=read: read(np.float32)))
            counts["float32"] += 1
        elif ggml_type is not None:
            # ggml's reference rounding (the gguf package's quantizer), as llama.cpp's quantizer rounds them.
            nbytes = dims[1] // BLOCK * GGML_BLOCK_BYTES[ggml_type]
            entries.append((target, (dims[0], nbytes), np.uint8, dims[0] * nbytes, ggml_type.name.lower(),
                            lambda read=read, ggml_type=ggml_type: quantize(read(np.float32), ggml_type)))
            rounded[target.removesuffix(".weight")] = ggml_type.name.lower()
        else:
            entries.append((target, dims, np.float16, int(np.prod(dims)) * 2, None, lambda read=read: read(np.float16)))
            counts["float16"] += 1
    for key, (members, packed) in stacks.items():
        if sorted(int(EXPERT_LAYER.match(m)["index"]) for m in members) != list(range(len(members))):
            raise UserError(f"{key}: experts {sorted(members)} do not run from 0 without a gap")
        members = sorted(members, key=lambda m: int(EXPERT_LAYER.match(m)["index"]))
        if packed:
            module = model.get_submodule(members[0])
            rows, nbytes = module.out_features, module.in_features // BLOCK * block_type.bytes_per_block
            entries.append((names(f"{key}.weight"), (len(members), rows, nbytes), np.uint8,
                            len(members) * rows * nbytes, type_name,
                            lambda members=members: np.stack([packed_blocks(m) for m in members])))
            counts["blocks"] += 1
        else:
            dims = (len(members), *shapes[f"{members[0]}.weight"])
            entries.append((names(f"{key}.weight"), dims, np.float16, int(np.prod(dims)) * 2, None,
                            lambda members=members: np.stack([_float_param(lazy, f"{m}.weight", layout, config,
                                                                           np.float16) for m in members])))
            counts["float16"] += 1
    entries += extra_entries(layout, config)
    counts["float32"] += len(layout.extra_tensors(config))
    write_streamed(writer, out, entries)
    return {"type": type_name, "architecture": config["architectures"][0], "gguf_architecture":
            gguf.MODEL_ARCH_NAMES[layout.arch], "tensors": counts, "rounded": rounded, "pre_tokenizer": vocab.pre}
