"""Our K-quant mixes choose, tensor by tensor, the types llama.cpp's own quantizer chooses: for every K file type,
on models whose rows hold K blocks (grouped and multi-query attention, tied and untied heads, 16 blocks so that
the favoured blocks show) and on one whose rows do not (the fallbacks)."""

import json
import subprocess
import sys

import pytest
import torch

from compress.export_gguf.kmix import K_FILE_TYPES, MixRules, ModelShape, is_quantized, more_bits
from compress.export_gguf.run import export_gguf

CASES = {
    # name: (hidden, heads, kv heads, blocks, tied)
    "gqa2-untied-16": (256, 4, 2, 16, False),
    "gqa4-tied-8": (256, 4, 1, 8, True),
    "rows-of-320": (320, 5, 5, 4, False),
}
ORACLE = """
import json, sys, llama_cpp
from gguf import GGUFReader
source, folder, kinds = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
found = {}
for kind in kinds:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + kind.upper())
    params.nthread = 1
    target = f"{folder}/{kind}.gguf"
    assert llama_cpp.llama_model_quantize(source.encode(), target.encode(), params) == 0
    found[kind] = {t.name: t.tensor_type.name.lower() for t in GGUFReader(target).tensors}
print(json.dumps(found))
"""


def test_more_bits_favours_the_first_and_last_eighth_and_every_third_between():
    assert [i for i in range(16) if more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]


@pytest.mark.parametrize("case", list(CASES))
def test_every_k_file_type_gets_llama_cpps_types(case, tmp_path):
    pytest.importorskip("llama_cpp", reason="install the [llamacpp] extra")
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from compress.tiny import tiny_config, tiny_tokenizer

    hidden, heads, kv_heads, blocks, tied = CASES[case]
    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = hidden, 2 * hidden, blocks
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = heads, kv_heads, 64
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "float")
    tiny_tokenizer().save_pretrained(tmp_path / "float")
    export_gguf(str(tmp_path / "float"), "f16", str(tmp_path / "f16.gguf"))
    # llama.cpp's quantizer prints every tensor on the C side: a child process keeps that out of the test's output.
    printed = subprocess.run([sys.executable, "-c", ORACLE, str(tmp_path / "f16.gguf"), str(tmp_path),
                              ",".join(K_FILE_TYPES)], capture_output=True, text=True, check=True).stdout
    theirs = json.loads(printed.strip().splitlines()[-1])
    tensors = [(t.name, tuple(int(n) for n in t.shape)) for t in GGUFReader(str(tmp_path / "f16.gguf")).tensors]
    shape = ModelShape("llama", blocks, heads, kv_heads, tied=tied)
    for file_type in K_FILE_TYPES:
        rules = MixRules(file_type, shape, [name for name, _ in tensors])
        ours = {name: rules.type_of(name, dims[0]) for name, dims in tensors if is_quantized(name, dims)}
        assert ours == {name: kind for name, kind in theirs[file_type].items() if name in ours}, file_type
        assert set(theirs[file_type]) - set(ours) == {n for n, d in tensors if not is_quantized(n, d)}
        assert all(theirs[file_type][n] in ("f32", "f16") for n, d in tensors if not is_quantized(n, d))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_mixtures_of_experts_get_llama_cpps_types(arch, tmp_path):
    """Stacked expert tensors (and Qwen2-MoE's shared expert) take llama.cpp's choices too (the tiny rows of 64 all
    fall back to blocks of 32, so the file types differ in which fallback each tensor takes)."""
    pytest.importorskip("llama_cpp", reason="install the [llamacpp] extra")
    from gguf import GGUFReader

    from compress.models import resolve

    source = resolve(f"tiny-{arch}")
    export_gguf(str(source.path), "f16", str(tmp_path / "f16.gguf"))
    printed = subprocess.run([sys.executable, "-c", ORACLE, str(tmp_path / "f16.gguf"), str(tmp_path),
                              ",".join(K_FILE_TYPES)], capture_output=True, text=True, check=True).stdout
    theirs = json.loads(printed.strip().splitlines()[-1])
    tensors = [(t.name, tuple(int(n) for n in t.shape)) for t in GGUFReader(str(tmp_path / "f16.gguf")).tensors]
    config = json.loads((source.path / "config.json").read_text())
    experts = config.get("num_local_experts") or config["num_experts"]
    shape = ModelShape("llama" if arch == "mixtral" else "qwen2moe", config["num_hidden_layers"],
                       config["num_attention_heads"], config["num_key_value_heads"], experts=experts)
    for file_type in K_FILE_TYPES:
        rules = MixRules(file_type, shape, [name for name, _ in tensors])
        ours = {name: rules.type_of(name, dims[0]) for name, dims in tensors if is_quantized(name, dims)}
        assert ours == {name: kind for name, kind in theirs[file_type].items() if name in ours}, file_type
