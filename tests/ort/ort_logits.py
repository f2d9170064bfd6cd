"""Logits of an exported decoder on given token ids, computed by onnxruntime and numpy alone (no torch),
so that it starts in seconds under a CPU emulator: ``python ort_logits.py FOLDER IDS.npy OUT.npy``.
With FOLDER ``--saturation``, it instead runs one u8 x s8 MatMulInteger whose pairs of products overflow
16 bits and writes its int32 result: the probe of whether this CPU takes the saturating path."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


def saturation_probe() -> np.ndarray:
    from onnx import TensorProto, helper, numpy_helper

    k = 64
    weight = numpy_helper.from_array(np.full((k, 1), 127, np.int8), "B")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "probe",
                              [helper.make_tensor_value_info("A", TensorProto.UINT8, [1, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, [1, 1])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"A": np.full((1, k), 255, np.uint8)})[0]


def logits(folder: Path, ids: np.ndarray) -> np.ndarray:
    cache = json.loads((folder / "compress_manifest.json").read_text())["cache"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    empty = np.zeros((ids.shape[0], cache["kv_heads"], 0, cache["head_dim"]), np.float32)
    feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones(ids.shape, np.int64)}
    feeds |= {f"past.{i}.{kind}": empty for i in range(cache["layers"]) for kind in ("key", "value")}
    return session.run(["logits"], feeds)[0]


if __name__ == "__main__":
    source, ids_file, out = sys.argv[1:4]
    result = saturation_probe() if source == "--saturation" else logits(Path(source), np.load(ids_file))
    np.save(out, result)
