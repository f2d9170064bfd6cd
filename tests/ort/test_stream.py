"""export-onnx streams: the graph is traced on a skeleton without weights and each weight (or packed layer) is
written by itself, so the memory held stays flat however deep the model is, far below the model's size."""

from pathlib import Path

import numpy as np
import pytest
import torch

from compress.ort.build import OnnxExportRequest, export_onnx
from tests.test_blocks import LAYERS, block_fp32_bytes, rss_bytes, wide_llama  # noqa: F401 (a fixture)

pytest.importorskip("onnxruntime", reason="install the [onnx] extra")


_MEASURE = """
import json, sys
from pathlib import Path
from compress.ort.build import OnnxExportRequest, export_onnx
from compress.ort.stream import ExternalData
from tests.test_blocks import rss_bytes
source, weights, out = sys.argv[1:4]
after = []
real = ExternalData.add
def add(self, graph, name, array):
    real(self, graph, name, array)
    # a packed export's blocks are its packed layers (its float embedding and head come after them)
    if array.nbytes >= 64 * 1024 and (name.startswith("packed.") or weights == "float"):
        after.append(rss_bytes())
ExternalData.add = add
# the exporter's own modules are imported by a first, tiny export: what follows is the model's share
export_onnx(OnnxExportRequest(model="tiny-llama", out=str(Path(out).with_name("warm-up"))))
before = rss_bytes()
export_onnx(OnnxExportRequest(model=source, weights=weights, out=out))
print(json.dumps({"before": before, "after": after}))
"""


def _export_recording_rss(source, weights: str, out) -> tuple[int, list[int]]:
    """RSS before the export, and after each of its large tensors (a linear layer's) was written, in a fresh
    process: a test process that has run much else holds memory of its own that would blur the figures."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]  # the repository, so that `tests` imports
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(source), weights, str(out)], capture_output=True,
                          text=True, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    return measured["before"], measured["after"]


@pytest.mark.parametrize("weights", ["float", "packed"])
def test_export_onnx_holds_one_tensor_at_a_time(wide_llama, tmp_path, weights):  # noqa: F811
    source = wide_llama
    if weights == "packed":
        from compress.api import QuantizeRequest, quantize

        source = quantize(QuantizeRequest(model=str(wide_llama), method="rtn", bits=4, group_size=128,
                                          out=str(tmp_path / "q"), progress=False, device="cpu")).folder
    before, after = _export_recording_rss(source, weights, tmp_path / "o")
    model_fp32 = LAYERS * block_fp32_bytes()
    assert len(after) >= 3 * LAYERS
    # from a block's worth of linear layers on: flat (the first ones settle the allocator)
    growth = after[-1] - after[len(after) // LAYERS]
    assert growth < block_fp32_bytes() / 4, f"RSS grew {growth / 2**20:.1f} MiB while the blocks were written"
    # 60-74 MiB seen, mostly the trace's graph and constants, once; the float model alone is 218 MiB
    assert max(after) - before < model_fp32 / 2, "the export held far more than a block"


def test_streamed_float_export_gives_the_model_s_logits(tmp_path):
    """The weights written one by one, transposed where the traced graph had a Transpose, are the model's: ONNX
    Runtime's logits equal ours (the KV-cache path is tested in test_export)."""
    import onnxruntime as ort

    from compress.models import load_model, resolve

    manifest = export_onnx(OnnxExportRequest(model="tiny-qwen2", out=str(tmp_path / "o")))
    model, _ = load_model(resolve("tiny-qwen2").path, torch.float32)
    ids = np.array([[3, 17, 99, 4, 250]], np.int64)
    layers, kv_heads, head_dim = (manifest["cache"][k] for k in ("layers", "kv_heads", "head_dim"))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    feed.update({f"past.{i}.{kind}": np.zeros((1, kv_heads, 0, head_dim), np.float32)
                 for i in range(layers) for kind in ("key", "value")})
    logits = ort.InferenceSession(str(tmp_path / "o" / "model.onnx")).run(["logits"], feed)[0]
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(logits - expected).max() < 1e-4 * np.abs(expected).max()
