"""``compress export-onnx``: a model folder -> an ONNX Runtime folder (model.onnx + model.onnx.data,
config.json, tokenizer, manifest), written atomically.

Weights: ``float`` keeps the float MatMuls; ``int8`` is ONNX Runtime's dynamic quantization
(weights 8-bit per channel, activations quantized per call: DynamicQuantizeLinear + MatMulInteger,
embedding Gather included; see INT8_FORMAT for why the weights are uint8); ``packed`` (the default for our GPTQ/RTN checkpoints) puts the
checkpoint's own 4- and 8-bit codes into MatMulNBits nodes and, for a tied 8-bit head, the
embedding into a GatherBlockQuantized node: the same integers as the PyTorch checkpoint.

The graph is traced on a skeleton without weights and every weight (or packed layer) written by itself
(compress.ort.stream): memory holds one tensor at a time, besides the embedding and head.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from compress.errors import UserError
from compress.formats import PACKED_METHODS, activations_refusal
from compress.ort.export import DATA_FILE, MODEL_FILE, linear_nodes
from compress.ort.packing import NBitsOperands, nbits_operands
from compress.ort.stream import ExternalData, save, trace, weightless, write_weights

WEIGHTS = ("auto", "float", "int8", "packed")
ACCURACY_LEVELS = (0, 1, 2, 3, 4)

MOE_CONFIG_KEYS = ("num_local_experts", "num_experts")
"""Config fields that give a model mixture-of-experts blocks (Mixtral's, Qwen-MoE's)."""


@dataclass
class OnnxExportRequest:
    model: str = "smollm2-135m"
    """Alias or folder: a dense model or one of our GPTQ-format checkpoints."""
    weights: str = "auto"
    """auto (packed for a GPTQ checkpoint, float otherwise), float, int8 (dynamic) or packed."""
    accuracy_level: int = 4
    """MatMulNBits compute: 0/1 float32 activations, 4 int8 activations quantized per block (ONNX Runtime's
    fast path on CPU, as llama.cpp quantizes activations to 8 bits for its 4-bit dot products)."""
    out: str | None = None
    force: bool = False
    trust_remote_code: bool = False

    def output_folder(self, weights: str) -> Path:
        if self.out:
            return Path(self.out)
        stem = Path(self.model).name if Path(self.model).is_dir() else self.model
        return Path("out") / f"{stem}-onnx-{weights}"


def _require_onnx() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"ONNX export needs {', '.join(missing)}: pip install 'compress-workbench[onnx]'")


@dataclass
class _Skeleton:
    """The model to trace (its weights on meta until written) and where each weight's values come from."""

    model: nn.Module
    tokenizer: object
    lazy: object
    packed: dict
    """Packed layer name -> its QuantLinear (outside the model, whose tree holds a float Linear there)."""
    tied: dict
    """Embedding name -> the packed head it reads its rows from."""

    @contextmanager
    def _holding(self, name: str):
        """The packed layer back in the model's tree with its tensors read, for as long as it is worked on."""
        from compress.runtime import return_freed_memory
        from compress.select import set_submodule

        layer, dense = self.packed[name], self.model.get_submodule(name)
        set_submodule(self.model, name, layer)
        read = self.lazy.materialize(layer, name)
        try:
            yield layer
        finally:
            self.lazy.release_names(read.names)
            set_submodule(self.model, name, dense)
            return_freed_memory()

    def operands(self, name: str):
        with self._holding(name) as layer:
            return nbits_operands(layer.quantized_weight(), layer.group_size), layer.in_features

    def value(self, memory_name: str) -> torch.Tensor:
        """One weight as the model computes with it: read from the checkpoint, a packed layer's dequantized."""
        module, _, attr = memory_name.rpartition(".")
        owner = self.tied.get(module, module)
        if attr == "weight" and owner in self.packed:
            with self._holding(owner) as layer:
                return layer.quantized_weight().dequantize()
        return self.lazy.read(memory_name)


def _open_skeleton(path: Path, quantized: bool, trust_remote_code: bool) -> _Skeleton:
    """The model with every weight on meta (packed layers as float Linears, a tied embedding as the embedding
    module it was), then weightless (compress.ort.stream), and the tokenizer."""
    from transformers import AutoTokenizer

    from compress.checkpoint import open_quantized
    from compress.models import FLOAT_READER_FIX, check_checkpoint, refuse_quantized_source
    from compress.lazy import LazyModel
    from compress.quant.head import QuantEmbedding
    from compress.quant.linear import QuantLinear
    from compress.select import set_submodule
    from compress.shards import ShardReader

    packed, tied = {}, {}
    if quantized:
        lazy = open_quantized(path, torch.float32)
        model = lazy.model
        embeddings = {name: m for name, m in model.named_modules() if isinstance(m, QuantEmbedding)}
        for name, module in list(model.named_modules()):
            if isinstance(module, QuantLinear):
                packed[name] = module
                with torch.device("meta"):
                    set_submodule(model, name, nn.Linear(module.in_features, module.out_features,
                                                         bias=module.bias is not None))
        for name, embedding in embeddings.items():
            # its head is out of the model's tree by now (a float Linear stands there): found among the packed
            tied[name] = next(n for n, layer in packed.items() if layer is embedding.source)
            original = embedding._lookup[0] if embedding._lookup else None
            with torch.device("meta"):
                set_submodule(model, name, original if original is not None else
                              nn.Embedding(embedding.num_embeddings, embedding.embedding_dim))
        tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    else:
        check_checkpoint(path, trust_remote_code)
        reader = ShardReader(path)
        refuse_quantized_source(str(path), reader, FLOAT_READER_FIX)
        lazy = LazyModel(path, torch.float32, trust_remote_code, unfuse=False, reader=reader)
        model = lazy.model
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    weightless(model)
    model.eval()
    return _Skeleton(model, tokenizer, lazy, packed, tied)


def _drop_unused_initializers(graph) -> None:
    used = {i for node in graph.node for i in node.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _gemm_bias(node) -> str | None:
    """The bias input of a Gemm computing x @ W^T + b (None for a MatMul); other Gemm forms are refused."""
    if node.op_type != "Gemm":
        return None
    attrs = {a.name: a for a in node.attribute}
    if attrs.get("transA") and attrs["transA"].i or not (attrs.get("transB") and attrs["transB"].i) \
            or any(name in attrs and attrs[name].f != 1.0 for name in ("alpha", "beta")):
        raise UserError(f"the exported graph computes {node.name} as a Gemm form this packer does not handle")
    return node.input[2] if len(node.input) > 2 and node.input[2] else None


def _add_in_memory(graph, name: str, array: np.ndarray) -> None:
    from onnx import numpy_helper

    graph.initializer.append(numpy_helper.from_array(array, name))


def pack_graph(proto, names: list[str], operands_of: Callable[[str], tuple[NBitsOperands, int]], tied: dict,
               accuracy_level: int = 4, add: Callable[[object, str, np.ndarray], None] = _add_in_memory) -> Counter:
    """Swap the MatMuls of the packed layers ``names`` for MatMulNBits (and tied 8-bit embeddings' Gathers for
    GatherBlockQuantized) in ``proto``, in place; ``operands_of(name)`` gives a layer's operands and input width
    (asked once per layer, one at a time), ``add`` puts an initializer into the graph (streamed: straight into the
    data file). Returns counts of what was swapped."""
    from onnx import helper

    graph = proto.graph
    nodes = linear_nodes(graph)
    counts = Counter()
    replacements: dict[str, list] = {}  # first output of a replaced node -> the nodes in its place
    heads = set(tied.values())
    head_operands = {}  # a tied head's small operands, which its embedding's Gather reads too
    for name in names:
        node = nodes.get(name)
        if node is None:
            raise UserError(f"the exported graph has no MatMul for {name}: this architecture cannot be packed")
        ops, in_features = operands_of(name)
        prefix = f"packed.{name}"
        source, inserted = node.input[0], []
        if ops.permutation is not None:  # act-order: bring each group's columns together
            add(graph, f"{prefix}.permutation", ops.permutation)
            inserted.append(helper.make_node("Gather", [source, f"{prefix}.permutation"], [f"{prefix}.input"],
                                             axis=-1, name=f"{prefix}.gather"))
            source = f"{prefix}.input"
        for part in ("weight", "scales", "zero_points"):
            add(graph, f"{prefix}.{part}", getattr(ops, part))
        out_features, bits, block_size = ops.weight.shape[0], ops.bits, ops.block_size
        if name in heads:
            head_operands[name] = (ops.bits, ops.weight.shape, ops.scales, ops.zero_points)
        del ops
        bias = _gemm_bias(node)
        product = [f"{prefix}.product"] if bias else list(node.output)
        inserted.append(helper.make_node("MatMulNBits", [source, f"{prefix}.weight", f"{prefix}.scales",
                                                         f"{prefix}.zero_points"], product,
                                         domain="com.microsoft", K=in_features, N=out_features, bits=bits,
                                         block_size=block_size, accuracy_level=accuracy_level,
                                         name=f"{prefix}.matmul"))
        if bias:
            inserted.append(helper.make_node("Add", [product[0], bias], list(node.output), name=f"{prefix}.bias"))
        replacements[node.output[0]] = inserted
        counts[f"MatMulNBits ({bits}-bit)"] += 1
    for embedding, head in tied.items():
        bits, (n, blocks, block), scales, zero_points = head_operands[head]
        if bits != 8:
            continue  # a 4-bit head's codes are nibble-packed for MatMulNBits: the embedding keeps its float Gather
        data = f"model.{embedding}.weight"
        gather = next((n for n in graph.node if n.op_type == "Gather" and n.input[0] == data), None)
        if gather is None:
            continue
        prefix = f"packed.{embedding}"
        # The rows are the head's MatMulNBits weight itself ([vocab, blocks, block] 8-bit codes), shared:
        # only the small scales and zero points take the shape GatherBlockQuantized wants.
        add(graph, f"{prefix}.scales", scales.reshape(n, blocks, 1))
        add(graph, f"{prefix}.zero_points", zero_points.reshape(n, blocks, 1))
        add(graph, f"{prefix}.shape", np.array([0, 0, -1], dtype=np.int64))
        replacements[gather.output[0]] = [
            helper.make_node("GatherBlockQuantized", [f"packed.{head}.weight", gather.input[1], f"{prefix}.scales",
                                                      f"{prefix}.zero_points"], [f"{prefix}.blocks"],
                             domain="com.microsoft", bits=8, block_size=block, gather_axis=0, quantize_axis=2,
                             name=f"{prefix}.gather"),
            helper.make_node("Reshape", [f"{prefix}.blocks", f"{prefix}.shape"], list(gather.output),
                             name=f"{prefix}.rows")]
        counts["GatherBlockQuantized (8-bit)"] += 1
    rebuilt = []
    for node in graph.node:
        rebuilt.extend(replacements.get(node.output[0], [node]))
    del graph.node[:]
    graph.node.extend(rebuilt)
    if not any(d.domain == "com.microsoft" for d in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _drop_unused_initializers(graph)
    return counts


# Dynamic INT8 quantizes activations to uint8 at run time (DynamicQuantizeLinear offers no other type).
# With int8 weights, ONNX Runtime's u8 x s8 MatMulInteger runs on x86 CPUs without VNNI (AVX2, AVX-512
# without VNNI: many AMD EPYC and older Intel parts) through vpmaddubsw, whose 16-bit sums of two
# products saturate: 255 x 127 x 2 > 32767, so the same file gives far worse logits there than on a
# VNNI machine (ONNX Runtime's quantization guide names the problem; a tiny Llama's max logit error was
# 6x our tolerance). Its remedies: reduce_range (7-bit weights: half the weight resolution everywhere,
# to protect some CPUs) or u8 x u8. Weights here are uint8, asymmetric per output channel: ONNX Runtime
# then takes its u8 x u8 kernels, which widen to 16 bits before multiplying and never saturate, on every
# instruction set (SSE, AVX2, AVX-512, VNNI, AMX, ARM NEON/dotprod). The integer sums are exact on every
# CPU, with full 8-bit weights; only float rounding elsewhere in the graph differs between instruction
# sets (SmolLM2, 4 x 512 tokens: perplexity 56.2 on AVX-512 VNNI, 57.5 on an emulated AVX2 CPU, where
# int8 weights give 56.0 and 5.2e7).
INT8_FORMAT = {"activations": "uint8 per tensor, computed per call", "weights": "uint8",
               "weight_grid": "asymmetric per output channel",
               "why": "u8 x u8 integer matmuls do not saturate on CPUs without VNNI (u8 x s8 does)"}


def _int8_dynamic(folder: Path) -> Counter:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    staged = folder / "int8"
    staged.mkdir()
    quantize_dynamic(folder / MODEL_FILE, staged / MODEL_FILE, per_channel=True, weight_type=QuantType.QUInt8,
                     op_types_to_quantize=["MatMul", "Gather"], use_external_data_format=True,
                     extra_options={"MatMulConstBOnly": True})
    for name in (MODEL_FILE, DATA_FILE):
        (folder / name).unlink(missing_ok=True)
    for file in staged.iterdir():
        file.rename(folder / (DATA_FILE if file.name != MODEL_FILE else MODEL_FILE))
    staged.rmdir()
    import onnx

    proto = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
    return Counter(n.op_type for n in proto.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeLinear",
                                                                         "DequantizeLinear"))


def export_onnx(request: OnnxExportRequest) -> dict:
    """Export; returns the manifest written beside the model."""
    _require_onnx()
    from compress import __version__
    from compress.fingerprint import source_hash
    from compress.checkpoint import MANIFEST_NAME
    from compress.output import atomic_folder, refuse_existing, refuse_source_overlap
    from transformers import AutoConfig

    from compress.models import is_causal_lm, resolve, weight_bytes_on_disk

    if request.accuracy_level not in ACCURACY_LEVELS:
        raise UserError(f"--accuracy-level {request.accuracy_level}: choose one of "
                        f"{', '.join(map(str, ACCURACY_LEVELS))}")
    if request.weights not in WEIGHTS:
        raise UserError(f"unknown --weights '{request.weights}': choose {', '.join(WEIGHTS)}")
    resolved = resolve(request.model, request.trust_remote_code)
    config = json.loads((resolved.path / "config.json").read_text())
    qcfg = config.get("quantization_config")
    if qcfg is not None and qcfg.get("quant_method") not in PACKED_METHODS:
        raise UserError(f"{request.model} is quantized with {qcfg.get('quant_method')!r}; export-onnx reads dense "
                        "models and compressed-tensors (pack-quantized) or GPTQ-format checkpoints")
    if not is_causal_lm(AutoConfig.from_pretrained(resolved.path, trust_remote_code=request.trust_remote_code)):
        raise UserError(f"{request.model} is not a causal language model: export-onnx writes decoders with a KV cache")
    architecture = (config.get("architectures") or ["?"])[0]
    if any(config.get(key) for key in MOE_CONFIG_KEYS):
        # Said from the config, before loading: the tracer gets as far as transformers' grouped expert matmul and
        # stops there (tiny Mixtral: 15 s in; a 47B model would load for an hour first).
        raise UserError(f"{request.model} is a {architecture}, a mixture of experts: its experts' grouped matmul has "
                        "no ONNX form in torch.export; run it with the torch backends instead")
    refusal = activations_refusal(qcfg, "ONNX Runtime's MatMulNBits",
                                  "export its float original, or a checkpoint quantized without --act-bits")
    if refusal:
        raise UserError(refusal)
    weights = request.weights if request.weights != "auto" else ("packed" if qcfg else "float")
    if weights == "packed" and qcfg is None:
        raise UserError("--weights packed reuses a quantized checkpoint's codes: quantize first (compress quantize "
                        "... --bits 4), or use --weights int8 for ONNX Runtime's own dynamic INT8")
    if weights == "int8" and qcfg is not None:
        raise UserError("--weights int8 quantizes a float model; this checkpoint is already quantized: use "
                        "--weights packed (its own codes) or export the float model")
    out = request.output_folder(weights)
    refuse_source_overlap(out, resolved.path)
    refuse_existing(out, request.force)
    started = time.perf_counter()
    opened = _open_skeleton(resolved.path, qcfg is not None, request.trust_remote_code)
    unpackable = {n: layer.bits for n, layer in opened.packed.items() if layer.bits not in (4, 8)}
    if unpackable and weights == "packed":
        raise UserError(f"MatMulNBits here runs 4- and 8-bit weights; {len(unpackable)} layer(s) have "
                        f"{sorted(set(unpackable.values()))} bits: use --weights float")
    model, tokenizer = opened.model, opened.tokenizer
    with atomic_folder(out, force=request.force, source=resolved.path) as tmp:
        # Traced on a skeleton without weights, then written one tensor (or packed layer) at a time.
        traced = trace(model, tmp)
        layers, kv_heads, head_dim = traced.cache
        data = ExternalData(tmp)
        try:
            nodes = Counter()
            if weights == "packed":
                nodes = pack_graph(traced.proto, list(opened.packed), opened.operands, opened.tied,
                                   request.accuracy_level, data.add)
            write_weights(traced, data, opened.value)
        finally:
            data.close()
        save(traced.proto, tmp)
        del traced
        if weights == "int8":
            nodes = _int8_dynamic(tmp)
        model.config.quantization_config = None
        del model.config.quantization_config
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        manifest = {"tool": "compress-workbench", "version": __version__, "kind": "onnx", "weights": weights,
                    "nodes": dict(nodes), "opset": 18,
                    "accuracy_level": request.accuracy_level if weights == "packed" else None,
                    "int8": INT8_FORMAT if weights == "int8" else None,
                    "cache": {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim},
                    "source": {"reference": request.model, "path": str(resolved.path),
                               "sha256_safetensors": source_hash(resolved.path),
                               "quantization_config": qcfg},
                    "timings_s": {"export": round(time.perf_counter() - started, 3)},
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    manifest["folder"] = str(out)
    manifest["bytes"] = weight_bytes_on_disk(out)
    return manifest
