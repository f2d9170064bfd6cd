"""`compress export-onnx`: the exported decoder with its KV cache gives PyTorch's logits (float and
packed within 1e-5 of the logits' scale, ONNX Runtime's dynamic INT8 within its quantization error),
through a full pass and step by step through the cache; what cannot be exported says so."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from compress.bench.load import load_for_bench
from compress.errors import UserError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx")
                                is None, reason="onnx / onnxruntime are not installed (extra: onnx)")
CPU = torch.device("cpu")
EXPORTABLE = ["llama", "opt", "falcon", "gpt_neox"]  # one per attention/cache style; all 8 but MPT export


def export(model, weights, folder, **options):
    from compress.ort.build import OnnxExportRequest, export_onnx

    return export_onnx(OnnxExportRequest(model=str(model), weights=weights, out=str(folder), **options))


def full_and_cached(model, ids):
    """Logits of a full pass, and of the last 3 positions computed one token at a time after a prefill."""
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :-3], use_cache=True)
        past, steps = out.past_key_values, [out.logits[:, -1]]
        for t in range(ids.shape[1] - 3, ids.shape[1] - 1):
            out = model(ids[:, t:t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits[:, -1])
    return full, torch.stack(steps, 1)


def assert_matches(reference, exported, ids, tolerance):
    with torch.no_grad():
        expected = reference(ids).logits
    full, cached = full_and_cached(exported, ids)
    scale = expected.abs().max()
    assert (full - expected).abs().max() <= tolerance * scale
    assert (cached - expected[:, -4:-1]).abs().max() <= tolerance * scale


@pytest.mark.parametrize("arch", EXPORTABLE)
def test_float_export_matches_pytorch(arch, tmp_path):
    manifest = export(f"tiny-{arch}", "float", tmp_path / "onnx")
    assert manifest["weights"] == "float" and manifest["bytes"] > 0
    loaded = load_for_bench(str(tmp_path / "onnx"), "auto", CPU)
    assert loaded.backend == "onnxruntime" and "float MatMul" in loaded.kernel
    ids = torch.randint(0, 200, (2, 10))
    assert_matches(load_for_bench(f"tiny-{arch}", "float32", CPU).model, loaded.model, ids, 1e-5)


@pytest.mark.parametrize("arch, bits, group_size, accuracy_level, tolerance", [
    ("llama", 4, 32, 0, 1e-5), ("opt", 8, -1, 0, 1e-5),
    ("llama", 4, 32, 4, 0.05)])  # level 4 quantizes activations to int8 per block: close, not exact
def test_packed_export_runs_our_codes(arch, bits, group_size, accuracy_level, tolerance, tmp_path):
    from compress.api import QuantizeRequest, quantize

    result = quantize(QuantizeRequest(model=f"tiny-{arch}", method="rtn", bits=bits, group_size=group_size,
                                      lm_head_bits=8, out=str(tmp_path / "q"), device="cpu", progress=False))
    manifest = export(result.folder, "auto", tmp_path / "onnx", accuracy_level=accuracy_level)
    assert manifest["weights"] == "packed" and manifest["accuracy_level"] == accuracy_level
    assert manifest["nodes"][f"MatMulNBits ({bits}-bit)"] >= 8
    if arch == "opt":  # a tied 8-bit head: the embedding reads the head's own codes, stored once
        import onnx

        assert manifest["nodes"]["GatherBlockQuantized (8-bit)"] == 1
        graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
        gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
        head = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.name == "packed.lm_head.matmul")
        assert gather.input[0] == head.input[1]
    loaded = load_for_bench(str(tmp_path / "onnx"), "auto", CPU)
    assert "MatMulNBits" in loaded.kernel and loaded.quantization["bits"] == bits
    ids = torch.randint(0, 200, (2, 10))
    assert_matches(load_for_bench(str(result.folder), "float32", CPU, backend="dequant").model, loaded.model, ids,
                   tolerance)


def test_int8_dynamic_export_is_close(tmp_path):
    """The tolerance is quantization error alone on every CPU: the weights are uint8, so ONNX Runtime runs
    u8 x u8 integer matmuls, exact on every instruction set (tests/ort/test_isa.py runs the same file on
    emulated CPUs without VNNI, where u8 x s8 saturated to 6x this tolerance)."""
    import onnx

    manifest = export("tiny-llama", "int8", tmp_path / "onnx")
    assert manifest["nodes"]["MatMulInteger"] >= 8
    assert manifest["int8"]["weights"] == "uint8"
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    types = {i.name: i.data_type for i in graph.initializer}
    weights = [types[n.input[1]] for n in graph.node if n.op_type == "MatMulInteger"]
    assert weights and set(weights) == {onnx.TensorProto.UINT8}  # no u8 x s8 product anywhere
    loaded = load_for_bench(str(tmp_path / "onnx"), "auto", CPU)
    assert loaded.quantization["sym"] is False and "uint8 per-channel weights" in loaded.kernel
    assert loaded.threads == {"onnxruntime_intra_op": torch.get_num_threads(), "onnxruntime_inter_op": 1}
    ids = torch.randint(0, 200, (2, 10))
    assert_matches(load_for_bench("tiny-llama", "float32", CPU).model, loaded.model, ids, 0.05)


def test_what_cannot_be_exported_says_why(tmp_path):
    with pytest.raises(UserError, match="MptForCausalLM could not be exported to ONNX"):
        export("tiny-mpt", "float", tmp_path / "mpt")
    with pytest.raises(UserError, match="quantize first"):
        export("tiny-llama", "packed", tmp_path / "p")
    with pytest.raises(UserError, match="unknown --weights 'int3'"):
        export("tiny-llama", "int3", tmp_path / "x")
    with pytest.raises(UserError, match="--accuracy-level 7"):
        export("tiny-llama", "float", tmp_path / "y", accuracy_level=7)
    assert not (tmp_path / "mpt").exists()


def test_export_without_onnx_names_the_extra(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(UserError, match=r"needs onnxruntime: pip install 'compress-workbench\[onnx\]'"):
        export("tiny-llama", "float", tmp_path / "x")
