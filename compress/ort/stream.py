"""export-onnx one tensor at a time: the graph traced on a skeleton whose weights take no memory, then every weight
written from the checkpoint into ``model.onnx.data`` by itself.

The skeleton is the model on the meta device (compress.lazy) with each parameter replaced by a zero-stride view of
one zero: the exporter traces it like the real model, and its graph names every parameter as an initializer. The
exporter's own optimizer is left out (it folds the weights' transposes into new tensors, which would need their
values); the traced graph keeps a Transpose in front of each linear layer's MatMul, and those are folded here:
the initializer is written already transposed, under the Transpose's output name, and the node dropped. ONNX Runtime
applies its own graph optimizations when a session loads the file. What takes memory is then one tensor (or one
packed layer) at a time, besides the small constants the trace itself made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from compress.ort.export import DATA_FILE, MODEL_FILE, OPSET, _DecoderWithCache, _export_failure, cache_shape, io_names
from compress.errors import UserError
from compress.runtime import return_freed_memory

ALIGNMENT = 64
"""Each tensor's offset in the data file is a multiple of this (what onnx's own external-data writer aligns to
for memory mapping)."""


INLINE_BELOW = 1024
"""Smaller tensors stay in model.onnx itself (as onnx's own writer keeps them): shape inference reads a Reshape's
shape from the graph, never from the data file."""


class ExternalData:
    """Initializers appended to ``model.onnx.data`` as they come, each as a TensorProto that points into it."""

    def __init__(self, folder: Path) -> None:
        self.file = open(Path(folder) / DATA_FILE, "wb")
        self.bytes = 0

    def add(self, graph, name: str, array: np.ndarray) -> None:
        import onnx
        from onnx import TensorProto, numpy_helper

        array = np.ascontiguousarray(array)
        if array.nbytes < INLINE_BELOW:
            graph.initializer.append(numpy_helper.from_array(array, name))
            return
        padding = (-self.file.tell()) % ALIGNMENT
        self.file.write(b"\0" * padding)
        offset = self.file.tell()
        self.file.write(memoryview(array.reshape(-1)).cast("B"))  # no copy of the tensor's bytes
        self.bytes += array.nbytes
        tensor = TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
                             dims=list(array.shape), data_location=TensorProto.EXTERNAL)
        for key, value in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        graph.initializer.append(tensor)

    def close(self) -> None:
        self.file.close()


@dataclass
class TracedGraph:
    proto: object
    """The ModelProto without the parameters' initializers."""
    weights: dict[str, str] = field(default_factory=dict)
    """Initializer name -> the model's parameter (memory name) it holds as it is."""
    transposed: dict[str, str] = field(default_factory=dict)
    """Initializer name -> the parameter it holds transposed (a folded Transpose's output)."""
    cache: tuple[int, int, int] = (0, 0, 0)
    """(layers, kv heads, head dim) of the KV cache the graph takes."""


def weightless(model: nn.Module) -> None:
    """Replace every parameter still on the meta device by a zero-stride view of one zero (tied ones stay one)."""
    fakes: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                if id(param) not in fakes:
                    fakes[id(param)] = nn.Parameter(torch.zeros((), dtype=param.dtype).expand(param.shape),
                                                    requires_grad=False)
                module._parameters[name] = fakes[id(param)]


def trace(model: nn.Module, folder: Path) -> TracedGraph:
    """Trace ``model`` (its parameters weightless) into ``folder/model.onnx``, loaded back without its
    parameters' initializers, which the caller writes (``write_weights``)."""
    import onnx

    layers, kv_heads, head_dim = cache_shape(model)
    past_names, present_names = io_names(layers)
    batch, seq, past_len, total = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
    dtype = next(model.parameters()).dtype
    ids = torch.randint(0, min(model.config.vocab_size, 100), (2, 5))
    past = tuple(torch.zeros(2, kv_heads, 3, head_dim, dtype=dtype) for _ in range(2 * layers))
    mask = torch.ones(2, 8, dtype=torch.long)
    try:
        program = torch.onnx.export(
            _DecoderWithCache(model).eval(), (ids, mask, *past), dynamo=True, opset_version=OPSET, optimize=False,
            input_names=["input_ids", "attention_mask", *past_names], output_names=["logits", *present_names],
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
                            "past": tuple({0: batch, 2: past_len} for _ in past)}, verbose=False)
    except Exception as exc:  # the exporter's errors are pages long; its summary names what failed
        raise UserError(f"{type(model).__name__} could not be exported to ONNX ({_export_failure(exc)}): its forward "
                        "does not trace with torch.export; run it with the torch backends instead")
    # The wrapper holds the model as `model`: a parameter's initializer is named "model." + its name.
    parameters = {f"model.{name}": name for name, _ in model.named_parameters(remove_duplicate=False)}
    initializers = program.model.graph.initializers
    weights = {name: parameters[name] for name in list(initializers) if name in parameters}
    for name in weights:
        initializers.pop(name)
    path = Path(folder) / MODEL_FILE
    program.save(str(path), external_data=False)  # what is left is small: buffers and the trace's constants
    del program
    proto = onnx.load(str(path))
    traced = TracedGraph(proto, weights, cache=(layers, kv_heads, head_dim))
    for node in list(proto.graph.node):
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        if node.op_type == "Transpose" and node.input[0] in weights and perm == [1, 0]:
            traced.transposed[node.output[0]] = weights[node.input[0]]
            proto.graph.node.remove(node)
    return traced


def write_weights(traced: TracedGraph, data: ExternalData, value_of: Callable[[str], torch.Tensor]) -> int:
    """Write every parameter initializer the graph still uses, one at a time, from ``value_of(memory name)``
    (float32 values as the model computes with them); returns how many."""
    graph = traced.proto.graph
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    written = 0
    for name, memory in [*traced.weights.items(), *traced.transposed.items()]:
        if name not in used:
            continue  # a packed layer's float weight, or a weight only a folded Transpose read
        value = value_of(memory).detach().float()
        data.add(graph, name, (value.t() if name in traced.transposed else value).contiguous().numpy())
        del value
        return_freed_memory()  # else freed heap chunks keep the resident set creeping up tensor after tensor
        written += 1
    return written


def save(proto, folder: Path) -> None:
    import onnx

    onnx.save(proto, str(Path(folder) / MODEL_FILE))
