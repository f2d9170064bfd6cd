"""Models opened without their weights: a meta skeleton, tensors read only for the part asked for, given
back after; checkpoint names translated both ways; tied weights read once."""

import pytest
import torch

from compress.errors import UserError
from compress.lazy import LazyModel, NameMap, empty_model, release
from compress.models import load_model, resolve
from compress.select import find_blocks
from tests.conftest import ALL_ARCHS


def on_meta(module) -> bool:
    return all(t.is_meta for t in module.parameters())


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_materialising_everything_gives_the_model_transformers_loads(arch):
    path = resolve(f"tiny-{arch}").path
    lazy = LazyModel(path, torch.float32)
    assert on_meta(lazy.model)
    done = lazy.materialize_all()
    assert done.bytes_read == lazy.reader.nbytes()  # every stored tensor read once, tied ones included
    reference, _ = load_model(path)
    if arch in ("mixtral", "qwen2_moe"):  # transformers fuses the experts that we keep one layer each: same numbers
        ids = torch.randint(0, 512, (2, 12))
        with torch.no_grad():
            torch.testing.assert_close(lazy.model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
        return
    ours = lazy.model.state_dict()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(ours[name], tensor), name


def test_a_block_is_read_alone_and_given_back():
    lazy = LazyModel(resolve("tiny-llama").path, torch.float32)
    prefix, blocks = find_blocks(lazy.model)
    done = lazy.materialize(blocks[1], f"{prefix}.1")
    stored = [k for k in lazy.reader.keys() if k.startswith(f"{prefix}.1.")]
    assert done.bytes_read == lazy.reader.nbytes(stored) and len(done.names) == len(stored)
    assert not on_meta(blocks[1]) and on_meta(blocks[0]) and lazy.model.lm_head.weight.is_meta
    release(blocks[1])
    assert on_meta(blocks[1])
    assert lazy.model.model.rotary_emb.inv_freq.device.type == "cpu"  # computed buffers stay real


def test_tied_weights_are_read_once_and_stay_tied():
    lazy = LazyModel(resolve("tiny-opt").path, torch.float32)
    head, embedding = lazy.model.lm_head, lazy.model.get_input_embeddings()
    assert head.weight is embedding.weight
    lazy.materialize(head, "lm_head")  # the file stores only the embedding
    assert head.weight is embedding.weight and not head.weight.is_meta
    lazy.release_names(["lm_head.weight"])
    assert head.weight is embedding.weight and head.weight.is_meta
    assert lazy.disk_key("lm_head.weight") == "model.decoder.embed_tokens.weight"


def test_names_follow_transformers_renames_both_ways():
    model = empty_model(resolve("tiny-gpt_neox").path, torch.float32)
    names = NameMap(model, ["embed_out.weight", "gpt_neox.final_layer_norm.weight"])
    assert names.to_memory["embed_out.weight"] == "lm_head.weight"
    assert names.disk_name("lm_head.weight") == "embed_out.weight"
    assert names.disk_name("lm_head.qweight") == "embed_out.qweight"  # a new tensor of the renamed module
    assert names.disk_name("gpt_neox.layers.0.mlp.dense_h_to_4h.qweight") == \
        "gpt_neox.layers.0.mlp.dense_h_to_4h.qweight"


def test_checkpoints_that_do_not_match_their_config_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    source = resolve("tiny-llama").path
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    tensors = load_file(str(source / "model.safetensors"))
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    lazy = LazyModel(tmp_path, torch.float32)
    _, blocks = find_blocks(lazy.model)
    with pytest.raises(UserError, match=r"up_proj.weight has shape \(3, 3\).*does not match its config.json"):
        lazy.materialize(blocks[0], "model.layers.0")
    with pytest.raises(UserError, match="lacks the weight model.layers.1.mlp.up_proj.weight"):
        lazy.materialize(blocks[1], "model.layers.1")
