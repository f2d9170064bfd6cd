"""A causal LM as an ONNX graph with its KV cache as plain inputs and outputs (traced in compress.ort.stream).

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

import torch
from torch import nn


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
