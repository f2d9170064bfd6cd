"""The output head quantized too (--lm-head-bits), with a tied embedding reading the head's codes, in both
formats: saved and reloaded by our loader it gives the in-memory logits exactly; transformers agrees to float16
rounding (through compressed-tensors it unpacks the head; through optimum, which knows no quantized head, it finds
float16 copies)."""

from __future__ import annotations

import json

import pytest
import torch

from compress.api import QuantizeRequest, quantize
from compress.checkpoint import load_quantized
from compress.errors import UserError
from compress.formats import compressed_tensors as ct
from compress.quant.head import QuantEmbedding, layer_settings
from compress.tiny import tiny_config
from tests.conftest import CAUSAL_ARCHS

TIED = {arch for arch in CAUSAL_ARCHS if tiny_config(arch).tie_word_embeddings}
"""The tiny configs whose embedding is tied to the head (MPT, OPT, BLOOM, Falcon, Llama 3, Gemma 2 and 3)."""
FORMATS = ["compressed-tensors", "gptq"]


def quantized_with_head(arch, tmp_path, bits=4, fmt="compressed-tensors"):
    return quantize(QuantizeRequest(model=f"tiny-{arch}", method="rtn", bits=bits, group_size=32, lm_head_bits=8,
                                    format=fmt, out=str(tmp_path / arch), device="cpu", progress=False,
                                    in_memory=True))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_a_quantized_head_reloads_exactly(arch, fmt, tmp_path):
    result = quantized_with_head(arch, tmp_path, fmt=fmt)
    head = result.manifest["lm_head"]
    assert head["bits"] == 8 and head["group_size"] == -1
    assert bool(head["tied_embedding"]) == (arch in TIED)
    config = json.loads((result.folder / "config.json").read_text())
    qcfg = config["quantization_config"]
    if fmt == "gptq":
        assert qcfg["lm_head"] is True
        assert layer_settings(qcfg, head["module"]) == (8, -1)
    else:  # a group of its own, symmetric whatever the body's grids, and never tied to the embedding's float copy
        assert ct.layer_settings(qcfg, head["module"]) == (8, -1) and ct.layer_symmetric(qcfg, head["module"])
        assert head["module"] not in qcfg["ignore"] and config.get("tie_word_embeddings") in (False, None)
    ids = torch.randint(0, 200, (2, 10))
    with torch.no_grad():
        expected = result.model.eval()(ids).logits
        reloaded, _ = load_quantized(result.folder)
        assert type(reloaded.get_output_embeddings()).__name__ == "QuantLinear"
        assert isinstance(reloaded.get_input_embeddings(), QuantEmbedding) == (arch in TIED)
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", sorted(TIED - {"falcon"}) + ["llama"])  # falcon: optimum packs none of its layers
def test_transformers_loads_the_head(arch, fmt, tmp_path):
    from transformers import AutoModelForCausalLM

    result = quantized_with_head(arch, tmp_path, fmt=fmt)
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        expected = result.model.eval()(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(result.folder, dtype=torch.float32).eval()(ids).logits
    assert (theirs - expected).abs().max() < 0.02 * expected.abs().max()


def test_a_tied_quantized_head_is_stored_once_in_memory(tmp_path):
    from compress.bench.memory import model_weight_bytes

    result = quantized_with_head("opt", tmp_path, bits=8)
    plain = quantize(QuantizeRequest(model="tiny-opt", method="rtn", bits=8, group_size=32, out=str(tmp_path / "p"),
                                     device="cpu", progress=False, in_memory=True))
    head, embedding = result.model.get_output_embeddings(), result.model.get_input_embeddings()
    assert embedding.source is head
    float_head = plain.model.get_output_embeddings().weight
    packed = sum(buffer.numel() * buffer.element_size() for buffer in head.buffers())
    saved = float_head.numel() * float_head.element_size() - packed
    assert model_weight_bytes(plain.model) - model_weight_bytes(result.model) >= 0.9 * saved


def test_head_bits_are_validated(tmp_path):
    with pytest.raises(UserError, match="unsupported bits 5"):
        QuantizeRequest(model="tiny-llama", method="rtn", lm_head_bits=5, out=str(tmp_path / "x")).head_config()


def test_layer_settings_follow_gptqmodel_dynamic_overrides():
    qcfg = {"bits": 4, "group_size": 128, "dynamic": {"-:.*skip": {}, "+:^lm_head$": {"bits": 8, "group_size": -1},
                                                       r".*\.1\..*": {"bits": 3}}}
    assert layer_settings(qcfg, "lm_head") == (8, -1)
    assert layer_settings(qcfg, "model.layers.1.mlp.up_proj") == (3, 128)
    assert layer_settings(qcfg, "model.layers.0.mlp.up_proj") == (4, 128)


@pytest.mark.parametrize("bits, group_size", [(8, -1), (4, 32), (3, -1)])
def test_the_head_is_packed_and_copied_a_chunk_of_rows_at_a_time_with_the_same_bytes(bits, group_size):
    """Chunks bound the head's float32 copies (a 128k x 4096 head is 2 GiB in float32); RTN works row by
    row, so any chunk of whole 32-row words gives the bytes of the whole-matrix pass, from any stored dtype."""
    from compress.quant.config import WeightQuantConfig
    from compress.quant.head import float16_rows, pack_head

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(320, 64, generator=g).bfloat16()
    bias = torch.randn(320, generator=g)
    cfg = WeightQuantConfig(bits=bits, group_size=group_size, sym=True)
    whole = pack_head(weight.float(), bias, cfg, chunk_rows=320)
    chunked = pack_head(weight, bias, cfg, chunk_rows=64)
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, chunked.state_dict()[name]), name
    rows = whole.embedding_rows(torch.arange(320)).half()
    assert torch.equal(float16_rows(chunked, chunk_rows=96), rows)
def tiny_gemma3(folder):
    """Gemma-3's tied embedding is a subclass (Gemma3TextScaledWordEmbedding) that scales its rows by
    sqrt(hidden): a quantized head must keep that."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from compress.tiny import tiny_tokenizer

    config = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              max_position_embeddings=512, tie_word_embeddings=True, sliding_window=32)
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("in_memory", [True, False])
def test_a_scaled_embedding_subclass_keeps_its_scale(tmp_path, in_memory):
    from transformers import AutoModelForCausalLM

    source = tiny_gemma3(tmp_path / "gemma3")
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    result = quantize(QuantizeRequest(model=str(source), method="rtn", bits=8, group_size=-1, lm_head_bits=8,
                                      out=str(tmp_path / "q"), device="cpu", progress=False, in_memory=in_memory))
    loaded, _ = load_quantized(result.folder)
    embedding = loaded.get_input_embeddings()
    assert isinstance(embedding, QuantEmbedding)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(2))
    # The same codes through the original module's forward: equal, scale included.
    table = loaded.get_output_embeddings().dequantized_weight()
    reference = original.get_input_embeddings()
    reference.weight.data = table
    with torch.no_grad():
        assert torch.equal(embedding(ids), reference(ids))
        ours, theirs = loaded(ids).logits, original(ids).logits
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 0.05


def test_an_embedding_that_is_more_than_a_lookup_is_refused():
    from compress.quant.head import check_reproducible

    class Positional(torch.nn.Embedding):  # looks at the ids themselves: renumbering them changes its output
        def forward(self, ids):
            return super().forward(ids) * ids.unsqueeze(-1)

    with pytest.raises(UserError, match="drop --lm-head-bits"):
        check_reproducible(Positional(10, 4), torch.randn(10, 4))


def tiny_llama_variant(folder, **config_changes):
    from transformers import AutoModelForCausalLM

    from compress.tiny import tiny_config, tiny_tokenizer

    config = tiny_config("llama")
    for key, value in config_changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("vocab", [1001, 1002])  # a 32001/32002 Llama or Mistral fine-tune, in small
def test_a_head_the_format_cannot_pack_is_refused_before_any_work(tmp_path, vocab, capsys):
    from compress.cli import main

    source = tiny_llama_variant(tmp_path / "src", vocab_size=vocab)
    capsys.readouterr()
    assert main(["quantize", str(source), "--method", "rtn", "--lm-head-bits", "8", "--out", str(tmp_path / "q"),
                 "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --lm-head-bits: the head (lm_head) has a vocabulary of {vocab}, not a multiple of 32, so "
                   "neither format can pack it: drop --lm-head-bits to keep the head in float\n")
    assert not (tmp_path / "q").exists() and not (tmp_path / ".q.partial").exists()
    # Without the head the same model quantizes (its blocks are packable).
    assert main(["quantize", str(source), "--method", "rtn", "--out", str(tmp_path / "q"), "--device", "cpu",
                 "--no-progress"]) == 0


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("in_memory", [True, False])
def test_a_tied_source_storing_its_head_gets_no_float_head_beside_the_packed_one(tmp_path, in_memory, fmt):
    """Some tied checkpoints store lm_head.weight beside the embedding; the output must not carry it."""
    from safetensors.torch import load_file, save_file

    source = tiny_llama_variant(tmp_path / "src", tie_word_embeddings=True)
    tensors = load_file(source / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    result = quantize(QuantizeRequest(model=str(source), method="rtn", bits=4, group_size=32, lm_head_bits=8,
                                      format=fmt, out=str(tmp_path / "q"), device="cpu", progress=False,
                                      in_memory=in_memory))
    assert result.manifest["lm_head"]["tied_embedding"] == "model.embed_tokens"
    written = load_file(result.folder / "model.safetensors")
    packed_name = "qweight" if fmt == "gptq" else "weight_packed"
    assert "lm_head.weight" not in written and f"lm_head.{packed_name}" in written
    ids = torch.randint(0, 200, (1, 8))
    reloaded, _ = load_quantized(result.folder)
    plain = tmp_path / "plain"  # the same source without the stored head: the same checkpoint
    tiny_llama_variant(plain, tie_word_embeddings=True)
    other = quantize(QuantizeRequest(model=str(plain), method="rtn", bits=4, group_size=32, lm_head_bits=8,
                                     format=fmt, out=str(tmp_path / "q2"), device="cpu", progress=False,
                                     in_memory=in_memory))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, load_quantized(other.folder)[0](ids).logits, rtol=0, atol=0)


def test_an_untied_compressed_tensors_head_has_no_float_copy(tmp_path):
    """Every reader of compressed-tensors unpacks the head as its config says: a float lm_head.weight beside the
    packed one would be a second head (vLLM refuses the unknown tensor)."""
    from safetensors.torch import load_file

    result = quantized_with_head("llama", tmp_path)
    written = load_file(result.folder / "model.safetensors")
    assert "lm_head.weight_packed" in written and "lm_head.weight" not in written
    assert not any(name.startswith("model.embed_tokens.") and name != "model.embed_tokens.weight" for name in written)


def test_head_bits_the_default_format_cannot_hold_fall_back_to_gptq_aloud(tmp_path, capsys):
    result = quantize(QuantizeRequest(model="tiny-llama", method="rtn", bits=4, group_size=32, lm_head_bits=3,
                                      out=str(tmp_path / "q"), device="cpu", progress=True))
    assert result.manifest["format"]["name"] == "gptq"
    assert "written in the GPTQ layout, not compressed-tensors (what vLLM loads): it holds 2, 4, 8-bit weights, not " \
           "a 3-bit head" in capsys.readouterr().err


def test_a_w8a8_head_is_refused(tmp_path):
    with pytest.raises(UserError, match="drop --lm-head-bits"):
        quantize(QuantizeRequest(model="tiny-llama", method="rtn", act_bits=8, lm_head_bits=8, out=str(tmp_path / "q"),
                                 device="cpu", progress=False))
