"""`compress export-gguf`: a tiny Llama's codes written into GGUF read back as our weights (gguf package), the
file runs in llama.cpp (llama-cpp-python) with our logits and our tokenizer's ids, and bad requests are one-line
errors."""

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from compress.api import QuantizeRequest, quantize
from compress.checkpoint import load_quantized
from compress.cli import main
from compress.export_gguf.layouts import rotary_row_order
from compress.export_gguf.run import export_gguf
from tests.export_gguf.llama_cpp_run import llama_cpp_logits, relative_error

GRIDS = {"q4_0": dict(bits=4, sym=True), "q4_1": dict(bits=4, sym=False), "q8_0": dict(bits=8, sym=True)}


def checkpoint(tmp_path, kind, arch="llama", **kw):
    settings = dict(model=f"tiny-{arch}", method="rtn", group_size=32, out=str(tmp_path / f"{arch}-{kind}"),
                    progress=False, device="cpu", **GRIDS[kind])
    settings.update(kw)
    return quantize(QuantizeRequest(**settings)).folder


@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q8_0"])
def test_the_file_holds_our_codes(kind, tmp_path):
    folder = checkpoint(tmp_path, kind)
    record = export_gguf(str(folder), kind, str(tmp_path / "m.gguf"))
    assert record["tensors"]["blocks"] == 14 and record["pre_tokenizer"] == "gpt-2"
    reader = GGUFReader(str(tmp_path / "m.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    ours, _ = load_quantized(folder)
    for hf_name, gguf_name, heads in (("model.layers.1.mlp.down_proj", "blk.1.ffn_down.weight", None),
                                      ("model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight", 4),
                                      ("model.layers.0.self_attn.k_proj", "blk.0.attn_k.weight", 2)):
        layer = ours.get_submodule(hf_name)
        expected = layer.dequantized_weight()
        if heads:
            expected = expected[rotary_row_order(expected.shape[0], heads)]
        t = tensors[gguf_name]
        theirs = torch.from_numpy(dequantize(np.asarray(t.data), t.tensor_type).reshape(expected.shape))
        if kind == "q4_1":  # the block minimum is stored in fp16 (see blocks.py)
            assert float((theirs - expected).abs().max()) <= 0.0074 * float(layer.quantized_weight().scale.max())
        else:
            assert torch.equal(theirs, expected)
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.block_count"].contents() == 2 and fields["llama.attention.head_count_kv"].contents() == 2
    assert len(fields["tokenizer.ggml.tokens"].data) == 512


@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q8_0"])
def test_llama_cpp_runs_the_file_with_our_logits_and_token_ids(kind, tmp_path):
    pytest.importorskip("llama_cpp", reason="install the [llamacpp] extra")
    folder = checkpoint(tmp_path, kind)
    export_gguf(str(folder), kind, str(tmp_path / "m.gguf"), keep_float=True)  # the blocks alone differ
    ours, tokenizer = load_quantized(folder)
    text = "the quick brown fox, 42 times"
    ids = [5, 17, 99, 200, 301, 44, 7, 8, 400, 3]
    theirs, (tokens,) = llama_cpp_logits(tmp_path / "m.gguf", ids, (text,))
    assert tokens == tokenizer(text)["input_ids"]
    with torch.no_grad():
        expected = ours(torch.tensor([ids])).logits[0]
    # llama.cpp rounds activations to 8 bits per block of 32 for these matrix products (and keeps the
    # embedding in float16): within 2% of the logits' scale; a misplaced row or code is far more.
    assert relative_error(theirs, expected) < 0.02


@pytest.mark.parametrize("args, message", [
    (["tiny-llama"], "is not a packed (compressed-tensors or GPTQ) checkpoint: add --method gptq"),
    (["tiny-llama", "--type", "f16", "--method", "rtn"], "f16 writes the float model as it is"),
    (["{q}", "--type", "q4_1", "--method", "rtn"], "is already quantized: drop --method"),
    (["tiny-llama", "--method", "bnb"], "--method bnb does not make ggml's block grids"),
    (["tiny-llama", "--nsamples", "8"], "--nsamples set how a float model is quantized on the way: add --method"),
    (["tiny-opt", "--method", "rtn"], "llama.cpp has no OPT architecture"),
    (["tiny-gptj", "--method", "rtn"], "llama.cpp has no GPT-J graph"),
    (["{q}", "--type", "q4_0"], "asymmetric zero points"),
    (["{q}", "--type", "q5_k"], "unknown GGUF type 'q5_k'"),
    (["{opt}", "--type", "q4_0"], "is a OPTForCausalLM: llama.cpp has no OPT architecture"),
    (["{act}", "--type", "q4_1"], "--group-size 32 --asym --no-act-order"),
])
def test_bad_requests_are_one_line_errors(args, message, tmp_path, capsys, calib_file):
    paths = {"q": lambda: checkpoint(tmp_path, "q4_1"), "opt": lambda: checkpoint(tmp_path, "q4_0", arch="opt"),
             "act": lambda: checkpoint(tmp_path, "q4_1", method="gptq", calib=str(calib_file), nsamples=4, seqlen=32,
                                     static_groups=False, group_aware=False, format="gptq")}
    resolved = [str(paths[a[1:-1]]()) if a.startswith("{") else a for a in args]
    assert main(["export-gguf", *resolved, "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf*"))


@pytest.mark.parametrize("method, kind", [("rtn", "q4_1"), ("gptq", "q4_0"), ("awq", "q8_0")])
def test_a_float_model_is_quantized_on_the_way_with_the_grid_the_type_needs(method, kind, tmp_path, calib_file):
    settings = {"out": str(tmp_path / "ckpt"), "progress": False, "device": "cpu"}
    if method != "rtn":
        settings.update(calib=str(calib_file), nsamples=4, seqlen=32)
    record = export_gguf("tiny-llama", kind, str(tmp_path / "m.gguf"), method=method, quantize_settings=settings)
    assert record["checkpoint"]["folder"] == str(tmp_path / "ckpt") and record["checkpoint"]["method"] == method
    import json

    from compress.formats import packed_settings

    settings = packed_settings(json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"])
    assert (settings.bits, settings.group_size, settings.sym, settings.act_order) == \
        (GRIDS[kind]["bits"], 32, GRIDS[kind]["sym"], False)
    # The file is exactly what exporting the kept checkpoint writes.
    export_gguf(str(tmp_path / "ckpt"), kind, str(tmp_path / "again.gguf"))
    assert (tmp_path / "m.gguf").read_bytes() == (tmp_path / "again.gguf").read_bytes()


def test_a_float_model_exports_to_f16_that_llama_cpp_runs_and_quantizes(tmp_path):
    """f16 is the input llama.cpp's own quantizer takes: the comparison with its Q4_0/Q4_1 starts here. The
    model has a rotary base other than the default (SmolLM2's 100,000), which transformers 5 keeps in
    rope_parameters."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="install the [llamacpp] extra")
    from transformers import AutoModelForCausalLM

    from compress.models import load_model
    from compress.tiny import tiny_config, tiny_tokenizer

    config = tiny_config("llama")
    config.rope_parameters = {"rope_theta": 100000.0, "rope_type": "default"}
    torch.manual_seed(0)
    source = tmp_path / "theta"
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    record = export_gguf(str(source), "f16", str(tmp_path / "f16.gguf"))
    assert record["tensors"]["blocks"] == 0
    assert GGUFReader(str(tmp_path / "f16.gguf")).fields["llama.rope.freq_base"].contents() == 100000.0
    model, _ = load_model(source)
    ids = [5, 17, 99, 200, 301, 44, 7, 8]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    assert llama_cpp.llama_model_quantize(str(tmp_path / "f16.gguf").encode(), str(tmp_path / "q4.gguf").encode(),
                                          params) == 0
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    # f16: 0.04% seen; llama.cpp's own 4-bit rounding of a random tiny model: 13% seen.
    for name, bound in (("f16.gguf", 0.005), ("q4.gguf", 0.3)):
        theirs, _ = llama_cpp_logits(tmp_path / name, ids)
        assert relative_error(theirs, expected) < bound, name


def test_the_command_quantizes_on_the_way_and_keeps_the_checkpoint(tmp_path, capsys):
    assert main(["export-gguf", "tiny-llama", "--type", "q4_0", "--method", "rtn", "--checkpoint",
                 str(tmp_path / "ckpt"), "--out", str(tmp_path / "m.gguf"), "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "quantized tiny-llama with rtn" in out and str(tmp_path / "ckpt") in out
    assert (tmp_path / "ckpt" / "config.json").is_file() and (tmp_path / "m.gguf").is_file()


@pytest.mark.parametrize("arch, kind, embedding, output", [
    ("llama", "q4_0", "Q4_0", "Q8_0"),     # untied: the embedding in the file's type, the head Q8_0
    ("llama", "q8_0", "Q8_0", "Q8_0"),
    ("falcon", "q4_1", "Q8_0", None),      # tied: the embedding is the head, Q8_0, no output tensor
])
def test_the_embedding_and_head_take_llama_cpps_types_by_ggml_rounding(arch, kind, embedding, output, tmp_path):
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from compress.models import load_model, resolve

    folder = checkpoint(tmp_path, kind, arch=arch)
    record = export_gguf(str(folder), kind, str(tmp_path / "m.gguf"))
    tensors = {t.name: t for t in GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert tensors["token_embd.weight"].tensor_type.name == embedding
    assert (tensors["output.weight"].tensor_type.name if "output.weight" in tensors else None) == output
    assert record["rounded"]["token_embd"] == embedding.lower()
    # The bytes are ggml's own rounding of the float embedding.
    source, _ = load_model(resolve(f"tiny-{arch}").path)
    expected = quantize(source.get_input_embeddings().weight.detach().numpy(), GGMLQuantizationType[embedding])
    assert np.array_equal(np.asarray(tensors["token_embd.weight"].data).reshape(expected.shape), expected)
    # --float-embedding keeps them in float16.
    export_gguf(str(folder), kind, str(tmp_path / "f.gguf"), keep_float=True)
    tensors = {t.name: t for t in GGUFReader(str(tmp_path / "f.gguf")).tensors}
    assert tensors["token_embd.weight"].tensor_type.name == "F16"
