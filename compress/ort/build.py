"""``compress export-onnx``: a model folder -> an ONNX Runtime folder (model.onnx + model.onnx.data,
config.json, tokenizer, manifest), written atomically.

Weights: ``float`` keeps the float MatMuls; ``int8`` is ONNX Runtime's dynamic quantization
(weights 8-bit per channel, activations quantized per call: DynamicQuantizeLinear + MatMulInteger,
embedding Gather included; see INT8_FORMAT for why the weights are uint8); ``packed`` (the default for our GPTQ/RTN checkpoints) puts the
checkpoint's own 4- and 8-bit codes into MatMulNBits nodes and, for a tied 8-bit head, the
embedding into a GatherBlockQuantized node: the same integers as the PyTorch checkpoint.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress.errors import UserError
from compress.formats import PACKED_METHODS, activations_refusal
from compress.ort.export import DATA_FILE, MODEL_FILE, export_decoder, linear_nodes
from compress.ort.packing import nbits_operands

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


def _dense_copy(model) -> tuple[dict, dict]:
    """Replace packed layers by float ones for tracing; ({layer: (QuantizedWeight, group size)},
    {embedding name: head name} for tied embeddings)."""
    from compress.quant.head import QuantEmbedding, module_name
    from compress.quant.linear import QuantLinear
    from compress.select import set_submodule

    packed, tied = {}, {}
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantEmbedding):
            tied[name] = module_name(model, module.source)
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            packed[name] = (module.quantized_weight(), module.group_size)
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.weight.data = module.dequantized_weight().float()
            if module.bias is not None:
                dense.bias.data = module.bias.float()
            set_submodule(model, name, dense)
    for name, head in tied.items():
        weight = model.get_submodule(head).weight
        set_submodule(model, name, nn.Embedding(weight.shape[0], weight.shape[1], _weight=weight.detach().clone()))
    return packed, tied


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


def pack_graph(proto, packed: dict, tied: dict, accuracy_level: int = 4) -> Counter:
    """Swap the MatMuls of packed layers for MatMulNBits (and tied 8-bit embeddings' Gathers for
    GatherBlockQuantized) in ``proto``, in place; counts of what was swapped."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    nodes = linear_nodes(graph)
    counts = Counter()
    replacements: dict[str, list] = {}  # first output of a replaced node -> the nodes in its place
    operands = {}
    for name, (qw, group_size) in packed.items():
        node = nodes.get(name)
        if node is None:
            raise UserError(f"the exported graph has no MatMul for {name}: this architecture cannot be packed")
        ops = operands[name] = nbits_operands(qw, group_size)
        prefix = f"packed.{name}"
        source, inserted = node.input[0], []
        if ops.permutation is not None:  # act-order: bring each group's columns together
            graph.initializer.append(numpy_helper.from_array(ops.permutation, f"{prefix}.permutation"))
            inserted.append(helper.make_node("Gather", [source, f"{prefix}.permutation"], [f"{prefix}.input"],
                                             axis=-1, name=f"{prefix}.gather"))
            source = f"{prefix}.input"
        graph.initializer.extend([numpy_helper.from_array(ops.weight, f"{prefix}.weight"),
                                  numpy_helper.from_array(ops.scales, f"{prefix}.scales"),
                                  numpy_helper.from_array(ops.zero_points, f"{prefix}.zero_points")])
        out_features, in_features = qw.codes.shape
        bias = _gemm_bias(node)
        product = [f"{prefix}.product"] if bias else list(node.output)
        inserted.append(helper.make_node("MatMulNBits", [source, f"{prefix}.weight", f"{prefix}.scales",
                                                         f"{prefix}.zero_points"], product,
                                         domain="com.microsoft", K=in_features, N=out_features, bits=ops.bits,
                                         block_size=ops.block_size, accuracy_level=accuracy_level,
                                         name=f"{prefix}.matmul"))
        if bias:
            inserted.append(helper.make_node("Add", [product[0], bias], list(node.output), name=f"{prefix}.bias"))
        replacements[node.output[0]] = inserted
        counts[f"MatMulNBits ({ops.bits}-bit)"] += 1
    for embedding, head in tied.items():
        ops = operands[head]
        if ops.bits != 8:
            continue  # a 4-bit head's codes are nibble-packed for MatMulNBits: the embedding keeps its float Gather
        data = f"model.{embedding}.weight"
        gather = next((n for n in graph.node if n.op_type == "Gather" and n.input[0] == data), None)
        if gather is None:
            continue
        n, blocks, block = ops.weight.shape
        prefix = f"packed.{embedding}"
        # The rows are the head's MatMulNBits weight itself ([vocab, blocks, block] 8-bit codes), shared:
        # only the small scales and zero points take the shape GatherBlockQuantized wants.
        graph.initializer.extend([
            numpy_helper.from_array(ops.scales.reshape(n, blocks, 1), f"{prefix}.scales"),
            numpy_helper.from_array(ops.zero_points.reshape(n, blocks, 1), f"{prefix}.zero_points"),
            numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), f"{prefix}.shape")])
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
    import onnx

    from compress import __version__
    from compress.fingerprint import source_hash
    from compress.checkpoint import MANIFEST_NAME, load_quantized
    from compress.output import atomic_folder, refuse_existing, refuse_source_overlap
    from transformers import AutoConfig

    from compress.models import is_causal_lm, load_model, resolve, weight_bytes_on_disk

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
    if qcfg is not None:
        model, tokenizer = load_quantized(resolved.path, torch.float32)
        packed, tied = _dense_copy(model)
        unpackable = {n: qw.bits for n, (qw, _) in packed.items() if qw.bits not in (4, 8)}
        if unpackable and weights == "packed":
            raise UserError(f"MatMulNBits here runs 4- and 8-bit weights; {len(unpackable)} layer(s) have "
                            f"{sorted(set(unpackable.values()))} bits: use --weights float")
    else:
        model, tokenizer = load_model(resolved.path, torch.float32, request.trust_remote_code)
        packed, tied = {}, {}
    model.eval()
    with atomic_folder(out, force=request.force, source=resolved.path) as tmp:
        layers, kv_heads, head_dim = export_decoder(model, tmp)
        if weights == "int8":
            nodes = _int8_dynamic(tmp)
        elif weights == "packed":
            proto = onnx.load(str(tmp / MODEL_FILE))
            nodes = pack_graph(proto, packed, tied, request.accuracy_level)
            (tmp / DATA_FILE).unlink()
            onnx.save(proto, str(tmp / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=DATA_FILE, size_threshold=1024)
        else:
            nodes = Counter()
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
