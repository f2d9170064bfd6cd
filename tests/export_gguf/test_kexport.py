"""K file types from a float model: our file holds llama.cpp's types tensor by tensor (the same size as llama.cpp's
own file of that type), llama.cpp runs it, and GPTQ's codes on the format's grids are closer to the float model
than llama.cpp's own quantization of the same weights; what a K file cannot be made from is a one-line error."""

import json
import subprocess
import sys

import pytest
import torch

from compress.cli import main
from compress.export_gguf.run import export_gguf
from tests.export_gguf.llama_cpp_run import llama_cpp_logits
from tests.export_gguf.test_kmix import ORACLE


@pytest.fixture(scope="module")
def k_llama(tmp_path_factory):
    """A tiny Llama whose rows hold K blocks (widths of 256 and 512), and llama.cpp's own Q4_K_M of our f16 file."""
    from transformers import AutoModelForCausalLM

    from compress.tiny import tiny_config, tiny_tokenizer

    folder = tmp_path_factory.mktemp("k-llama")
    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 256, 512, 4
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 64
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder / "float")
    tiny_tokenizer().save_pretrained(folder / "float")
    export_gguf(str(folder / "float"), "f16", str(folder / "f16.gguf"))
    pytest.importorskip("llama_cpp", reason="install the [llamacpp] extra")
    printed = subprocess.run([sys.executable, "-c", ORACLE, str(folder / "f16.gguf"), str(folder), "q4_k_m"],
                             capture_output=True, text=True, check=True).stdout
    return folder, json.loads(printed.strip().splitlines()[-1])["q4_k_m"]


def kl_to_float(folder, gguf, ids) -> float:
    from compress.models import load_model

    with torch.no_grad():
        reference = torch.log_softmax(load_model(folder / "float")[0](torch.tensor([ids])).logits[0], -1)
    theirs, _ = llama_cpp_logits(gguf, ids)
    ours = torch.log_softmax(theirs.float(), -1)
    return float((reference.exp() * (reference - ours)).sum(-1).mean())


def test_q4_k_m_holds_llama_cpps_types_and_gptq_beats_its_rounding(k_llama, data_dir):
    from gguf import GGUFReader

    from compress.data import load_text, tokenize
    from compress.tiny import tiny_tokenizer

    folder, theirs = k_llama
    settings = {"calib": "sst2:train", "nsamples": 16, "seqlen": 64, "progress": False, "device": "cpu"}
    records = {method: export_gguf(str(folder / "float"), "q4_k_m", str(folder / f"{method}.gguf"), method=method,
                                   quantize_settings=settings if method == "gptq" else {"progress": False})
               for method in ("gptq", "rtn")}
    for method, record in records.items():
        types = {t.name: t.tensor_type.name.lower() for t in GGUFReader(str(folder / f"{method}.gguf")).tensors}
        assert types == theirs and record["tensor_types"]["q6_k"] == 5  # two favoured values and downs, the head
        assert record["bytes"] == (folder / "q4_k_m.gguf").stat().st_size
    text, _ = load_text("wikitext2:test")
    ids = tokenize(tiny_tokenizer(), text[:3000])[:60].tolist()
    kl = {name: kl_to_float(folder, folder / f"{name}.gguf", ids) for name in ("gptq", "rtn", "q4_k_m")}
    # Seen: GPTQ 0.00084, our weighted rounding 0.00179, llama.cpp's own 0.00190 (16 calibration windows of 64).
    assert kl["gptq"] < 0.8 * kl["q4_k_m"] and kl["rtn"] < 1.05 * kl["q4_k_m"]


@pytest.mark.parametrize("file_type", ["q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q5_k_s", "q5_k_m", "q6_k"])
def test_every_k_file_type_runs_in_llama_cpp(k_llama, file_type, eval_file):
    from compress.data import load_text, tokenize
    from compress.tiny import tiny_tokenizer

    folder, _ = k_llama
    out = folder / f"rtn-{file_type}.gguf"
    export_gguf(str(folder / "float"), file_type, str(out), method="rtn", quantize_settings={"progress": False})
    text, _ = load_text(str(eval_file))
    kl = kl_to_float(folder, out, tokenize(tiny_tokenizer(), text)[:40].tolist())
    ceiling = {"q2_k": 0.05, "q3_k_s": 0.02, "q3_k_m": 0.01, "q3_k_l": 0.01}.get(file_type, 0.003)
    assert 0 <= kl < ceiling, kl


def test_what_a_k_file_cannot_be_made_from_is_one_line(k_llama, tmp_path, capsys):
    folder, _ = k_llama
    source = str(folder / "float")
    cases = [([source, "--type", "q4_k_m"], "add --method gptq (calibrated), awq (calibrated) or rtn"),
             ([source, "--type", "q4_k_m", "--method", "bnb"], "--method bnb does not make K blocks"),
             ([source, "--type", "q4_k_m", "--method", "rtn", "--checkpoint", str(tmp_path / "c")],
              "keeps no checkpoint"),
             (["tiny-gptj", "--type", "q4_k_m", "--method", "rtn"], "llama.cpp has no GPT-J graph"),
             ([source, "--type", "q4_k_x"], "unknown GGUF type 'q4_k_x'")]
    for args, message in cases:
        assert main(["export-gguf", *args, "--out", str(tmp_path / "x.gguf")]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("arch, method", [("mixtral", "rtn"), ("qwen2_moe", "rtn"), ("qwen2_moe", "awq")])
def test_a_mixture_of_experts_is_written_with_its_experts_stacked(arch, method, tmp_path, calib_file):
    """Each block's experts fitted one by one as the blocks stream, then stacked per kind as llama.cpp reads them
    (experts weighted x4, so that a misplaced expert shows): llama.cpp gives the float model's logits within the
    file's own rounding."""
    from gguf import GGUFReader

    from compress.models import load_model
    from tests.export_gguf.llama_cpp_run import relative_error
    from tests.export_gguf.test_architectures import attention_heavy

    source = attention_heavy(arch, tmp_path / "float")
    calibrated = {"calib": str(calib_file), "nsamples": 8, "seqlen": 16} if method == "awq" else {}
    record = export_gguf(str(source), "q6_k", str(tmp_path / "m.gguf"), method=method,
                         quantize_settings={"progress": False, **calibrated})
    tensors = {t.name: t for t in GGUFReader(str(tmp_path / "m.gguf")).tensors}
    model = load_model(source)[0]
    experts = getattr(model.config, "num_local_experts", None) or model.config.num_experts
    assert tensors["blk.0.ffn_down_exps.weight"].shape.tolist()[-1] == experts
    assert record["tensor_types"]["q8_0"] > 0  # rows of 64: Q6_K falls back to Q8_0, and the record says where
    assert record["fallbacks"]["blk.0.ffn_down_exps.weight"] == "q8_0"
    ids = [5, 17, 99, 200, 301, 44, 7, 8, 400, 3, 12, 77]
    theirs, _ = llama_cpp_logits(tmp_path / "m.gguf", ids)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    assert relative_error(theirs, expected) < 0.05  # 1.9% and 2.7% seen; the experts reversed: 41% and 107%


def test_awq_folds_its_scales_where_inputs_have_outlier_channels(tmp_path, data_dir):
    """On a Llama whose norms make a few input channels 12 times larger (as real models' are), AWQ's scales,
    searched with each layer rounded into its own K type and folded into the norms written to the file, bring
    llama.cpp's KL well below plain rounding's at the same size."""
    from transformers import AutoModelForCausalLM

    from compress.data import load_text, tokenize
    from compress.tiny import tiny_config, tiny_tokenizer

    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 256, 512, 4
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 64
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(1)
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.data[torch.randperm(256, generator=generator)[:8]] *= 12
    model.save_pretrained(tmp_path / "float")
    tiny_tokenizer().save_pretrained(tmp_path / "float")
    settings = {"calib": "sst2:train", "nsamples": 16, "seqlen": 64, "progress": False, "device": "cpu"}
    awq = export_gguf(str(tmp_path / "float"), "q4_k_m", str(tmp_path / "awq.gguf"), method="awq",
                      quantize_settings=settings)
    rtn = export_gguf(str(tmp_path / "float"), "q4_k_m", str(tmp_path / "rtn.gguf"), method="rtn",
                      quantize_settings={"progress": False})
    assert awq["bytes"] == rtn["bytes"] and awq["tensor_types"] == rtn["tensor_types"]
    assert awq["awq"]["scaled"] > 0
    tokens = tokenize(tiny_tokenizer(), load_text("wikitext2:test")[0][:30000])
    kl = {name: sum(kl_to_float(tmp_path, tmp_path / f"{name}.gguf", tokens[start:start + 60].tolist())
                    for start in range(0, 3000, 600)) / 5 for name in ("awq", "rtn")}
    # Seen: AWQ 0.0023, plain rounding 0.0037 (llama.cpp's own Q4_K_M 0.0040); a norm written without its fold
    # would give the scaled columns back unscaled, far worse than either.
    assert kl["awq"] < 0.8 * kl["rtn"], kl


def test_auto_types_at_q4_k_ms_size_are_closer_to_the_float_model(k_llama, data_dir):
    """--type auto --bpw at our Q4_K_M file's own bits per weight: the types chosen from measured sensitivities fit
    the budget, and llama.cpp's logits are closer to the float model's than with llama.cpp's fixed mix."""
    from compress.data import load_text, tokenize
    from compress.tiny import tiny_tokenizer

    folder, _ = k_llama
    settings = {"calib": "sst2:train", "nsamples": 16, "seqlen": 64, "progress": False, "device": "cpu"}
    fixed = export_gguf(str(folder / "float"), "q4_k_m", str(folder / "fixed.gguf"), method="gptq",
                        quantize_settings=settings)
    auto = export_gguf(str(folder / "float"), "auto", str(folder / "auto.gguf"), method="gptq",
                       quantize_settings={**settings, "bpw": fixed["block_bits_per_weight"]})
    assert auto["block_bits_per_weight"] <= fixed["block_bits_per_weight"] and auto["bytes"] <= fixed["bytes"]
    assert len({kind for kind in auto["tensor_types"] if kind.startswith("q")}) >= 3  # a mix, not one type
    text, _ = load_text("wikitext2:test")
    ids = tokenize(tiny_tokenizer(), text[:3000])[:60].tolist()
    # Seen: auto 0.00051 against the fixed mix's 0.00084 at 4.776 against 4.787 bits per weight.
    assert kl_to_float(folder, folder / "auto.gguf", ids) < 0.9 * kl_to_float(folder, folder / "fixed.gguf", ids)


def test_auto_needs_a_budget_and_a_budget_needs_auto(k_llama, tmp_path, capsys):
    folder, _ = k_llama
    for args in (["--type", "auto", "--method", "rtn"], ["--type", "q4_k_m", "--method", "rtn", "--bpw", "4.5"],
                 ["--type", "auto", "--method", "rtn", "--bpw", "1.5"]):
        assert main(["export-gguf", str(folder / "float"), *args, "--out", str(tmp_path / "x.gguf"),
                     "--no-progress"]) == 2, args
        err = capsys.readouterr().err
        assert ("--bpw" in err) and err.count("\n") == 1, err
        assert not (tmp_path / "x.gguf").exists()


def test_transformers_gguf_reader_gives_llama_cpps_logits_for_a_k_file(k_llama, tmp_path):
    """A second reader of our K blocks: transformers dequantizes the file itself (through the gguf package) and its
    float model gives llama.cpp's logits, within llama.cpp's int8 activations."""
    from transformers import AutoModelForCausalLM

    from tests.export_gguf.llama_cpp_run import relative_error

    folder, _ = k_llama
    gguf = tmp_path / "q4_k_m.gguf"
    export_gguf(str(folder / "float"), "q4_k_m", str(gguf), method="rtn", quantize_settings={"progress": False})
    ids = [5, 17, 99, 200, 301, 44, 7, 8, 400, 3, 12, 77]
    theirs, _ = llama_cpp_logits(gguf, ids)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        transformers_logits = model(torch.tensor([ids])).logits[0]
    assert relative_error(theirs, transformers_logits) < 0.02
