"""Export a causal LM to ONNX with its KV cache as plain inputs and outputs.

The graph takes ``input_ids`` [batch, seq], ``attention_mask`` [batch, past + seq] and, per layer,
``past.{i}.key`` / ``past.{i}.value`` [batch, kv heads, past, head dim] (past may be 0), and returns
``logits`` [batch, seq, vocab] and ``present.{i}.key`` / ``present.{i}.value``. It is traced by
``torch.onnx.export`` (the dynamo exporter) through the model's own forward with a DynamicCache, so
any transformers decoder that takes one exports the same way; optimum-onnx, which knows the families
one by one, cannot share an environment with transformers 5.

Each MatMul (or Gemm) that computes a linear layer keeps the module's name in its ``pkg.torch.onnx.name_scopes``
metadata; :func:`linear_nodes` reads it back, which is how packed weights are put in their place.
"""

from __future__ import annotations

import ast
from pathlib import Path

import torch
from torch import nn

from compress.errors import UserError

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
OPSET = 18


class _DecoderWithCache(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, *past):
        from transformers import DynamicCache

        cache = DynamicCache(list(zip(past[0::2], past[1::2])), config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


@torch.no_grad()
def cache_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of the model's cache, read off one real forward pass: configs
    spell these differently per family (Falcon's multi-query attention keeps one KV head)."""
    out = model(torch.zeros(1, 1, dtype=torch.long), use_cache=True)
    layers = out.past_key_values.layers
    _, kv_heads, _, head_dim = layers[0].keys.shape
    return len(layers), int(kv_heads), int(head_dim)


def io_names(layers: int) -> tuple[list[str], list[str]]:
    past = [f"past.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return past, [name.replace("past.", "present.", 1) for name in past]


def export_decoder(model: nn.Module, folder: Path) -> tuple[int, int, int]:
    """Write ``folder/model.onnx`` (+ ``model.onnx.data``) for ``model`` (float, eval mode); returns
    the cache shape (layers, kv heads, head dim) the runtime feeds."""
    layers, kv_heads, head_dim = cache_shape(model)
    past_names, present_names = io_names(layers)
    batch, seq, past_len, total = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
    dtype = next(model.parameters()).dtype
    ids = torch.randint(0, min(model.config.vocab_size, 100), (2, 5))
    past = tuple(torch.zeros(2, kv_heads, 3, head_dim, dtype=dtype) for _ in range(2 * layers))
    mask = torch.ones(2, 8, dtype=torch.long)
    path = Path(folder) / MODEL_FILE
    try:
        torch.onnx.export(
            _DecoderWithCache(model).eval(), (ids, mask, *past), str(path), dynamo=True, opset_version=OPSET,
            input_names=["input_ids", "attention_mask", *past_names], output_names=["logits", *present_names],
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
                            "past": tuple({0: batch, 2: past_len} for _ in past)},
            external_data=True, verbose=False)
    except Exception as exc:  # the exporter's errors are pages long; its summary names what failed
        raise UserError(f"{type(model).__name__} could not be exported to ONNX ({_export_failure(exc)}): its forward "
                        "does not trace with torch.export; run it with the torch backends instead")
    return layers, kv_heads, head_dim


def _export_failure(exc: Exception) -> str:
    """The one line of the exporter's message that says what went wrong."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "## Exception summary" in lines:
        after = lines[lines.index("## Exception summary") + 1:]
        if after:
            return after[0][:240]
    return lines[0][:240] if lines else type(exc).__name__


def linear_nodes(graph) -> dict[str, object]:
    """{module name: the MatMul (or, for a 2-D input, Gemm) node that computes it} for the linear
    layers of an exported graph."""
    found = {}
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        fx = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.fx_node"), "")
        if scopes is None or "aten.linear" not in fx:
            continue
        names = ast.literal_eval(scopes)
        if len(names) >= 2:
            found[names[-2].removeprefix("model.")] = node
    return found
