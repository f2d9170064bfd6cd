"""An exported ONNX decoder run by onnxruntime behind the calling convention compress bench uses for
transformers models: ``model(ids, past_key_values=..., use_cache=..., logits_to_keep=...)`` returning
``.logits`` (torch) and ``.past_key_values`` (a tuple of torch tensors sharing the arrays' memory)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from compress.backends import HeadShape
from compress.ort.export import MODEL_FILE, io_names


class OrtCausalLM(nn.Module):
    def __init__(self, folder: Path, config, cache: dict, threads: int) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(Path(folder) / MODEL_FILE), options, providers=["CPUExecutionProvider"])
        self.config = config
        self.layers, self.kv_heads, self.head_dim = cache["layers"], cache["kv_heads"], cache["head_dim"]
        self.past_names, _ = io_names(self.layers)
        self.folder = Path(folder)
        self.threads = threads

    def weight_bytes(self) -> int:
        """Bytes of the graph's weights: the initializers, read from the files that hold them."""
        return sum(p.stat().st_size for p in self.folder.glob("model.onnx*"))

    def get_output_embeddings(self):
        return HeadShape(self.config.vocab_size)

    def forward(self, input_ids: torch.Tensor, past_key_values=None, use_cache: bool = True,
                logits_to_keep: int = 0, attention_mask: torch.Tensor | None = None, **_):
        batch, seq = input_ids.shape
        if past_key_values is None:
            empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32)
            past = [empty] * (2 * self.layers)
        else:
            past = [t.numpy() for t in past_key_values]
        total = past[0].shape[2] + seq
        mask = np.ones((batch, total), dtype=np.int64) if attention_mask is None else attention_mask.numpy()
        feeds = {"input_ids": input_ids.numpy().astype(np.int64), "attention_mask": mask,
                 **dict(zip(self.past_names, past))}
        outputs = self.session.run(None, feeds)
        logits = torch.from_numpy(outputs[0])
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        present = tuple(torch.from_numpy(a) for a in outputs[1:]) if use_cache else None
        return SimpleNamespace(logits=logits, past_key_values=present)
