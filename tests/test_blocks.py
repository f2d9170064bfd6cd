"""The driver's block source and carried activations: streaming holds one block, not the model, and
memory does not grow with depth; activations spilled to files give the same result as in memory."""

from pathlib import Path

import pytest
import torch

from compress.api import QuantizeRequest, quantize
from compress.activations import Activations
from compress.output import ModelOutput
from tests.conftest import assert_same_checkpoint

LAYERS, HIDDEN, MLP = 16, 512, 1536


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> Path:
    """16 blocks of width 512 (13.6 MB each in float32, 218 MB in all), stored in float16."""
    from transformers import AutoModelForCausalLM

    from compress.tiny import tiny_config, tiny_tokenizer

    config = tiny_config("llama")
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = LAYERS, HIDDEN, MLP
    config.num_attention_heads = config.num_key_value_heads = 8
    folder = tmp_path_factory.mktemp("wide") / "llama16"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float16).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def block_fp32_bytes() -> int:
    return (4 * HIDDEN * HIDDEN + 3 * HIDDEN * MLP) * 4


def test_streaming_memory_is_one_block_and_flat_in_depth(wide_llama, tmp_path, calib_file, monkeypatch):
    after_block: list[int] = []
    real = ModelOutput.checkpoint

    def checkpoint(self, next_block, *args, **kwargs):
        after_block.append(rss_bytes())
        real(self, next_block, *args, **kwargs)

    monkeypatch.setattr(ModelOutput, "checkpoint", checkpoint)
    before = rss_bytes()
    quantize(QuantizeRequest(model=str(wide_llama), method="gptq", bits=4, group_size=128, calib=str(calib_file),
                             nsamples=4, seqlen=32, out=str(tmp_path / "q"), progress=False, device="cpu"))
    assert len(after_block) == LAYERS
    growth = after_block[-1] - after_block[1]
    assert growth < block_fp32_bytes() / 4, f"RSS grew {growth / 2**20:.1f} MiB from block 2 to block {LAYERS}"
    model_fp32 = LAYERS * block_fp32_bytes()
    assert max(after_block) - before < model_fp32 / 3, "the run held far more than a block"


def test_the_in_memory_path_holds_the_model(wide_llama, tmp_path, calib_file, monkeypatch):
    """The yardstick the streaming test is measured against: loading everything first costs the model."""
    after_block: list[int] = []
    real = ModelOutput.checkpoint
    monkeypatch.setattr(ModelOutput, "checkpoint",
                        lambda self, *a, **k: (after_block.append(rss_bytes()), real(self, *a, **k)))
    before = rss_bytes()
    result = quantize(QuantizeRequest(model=str(wide_llama), method="rtn", bits=4, group_size=128,
                                      out=str(tmp_path / "q"), progress=False, device="cpu", in_memory=True))
    assert max(after_block) - before > LAYERS * block_fp32_bytes() / 2
    del result


def test_spilled_activations_give_the_same_checkpoint(tmp_path, calib_file):
    common = dict(model="tiny-mistral", method="gptq", bits=4, group_size=32, calib=str(calib_file), nsamples=8,
                  seqlen=64, progress=False, device="cpu")
    memory = quantize(QuantizeRequest(out=str(tmp_path / "m"), **common))
    spilled = quantize(QuantizeRequest(out=str(tmp_path / "d"), activation_budget=0, **common))
    assert_same_checkpoint(memory.folder, spilled.folder)


def test_activation_files_are_replaced_whole(tmp_path):
    tensors = [torch.randn(3, 4) for _ in range(5)]
    store = Activations(tensors, torch.device("cpu"), tmp_path)
    assert store.on_disk and len(store) == 5 and torch.equal(store[2], tensors[2])
    saved = store.save(tmp_path / "saved")
    replacement = store.replacing()
    for i in range(5):
        replacement.put(i, store[i] * 2)  # each new value is made from the old set, still readable
        assert torch.equal(store[4], tensors[4])
    replacement.commit()
    assert all(torch.equal(store[i], tensors[i] * 2) for i in range(5))
    restored = Activations.restore(saved, torch.device("cpu"), None)  # the saved copy is still the old set
    assert all(torch.equal(restored[i], tensors[i]) for i in range(5))


def test_the_capture_holds_no_more_than_the_budget_plus_one_window(tmp_path):
    """The first block's states are spilled as the capture makes them, once the next window would pass
    the budget: 48 windows of 4 MiB would be 192 MiB held; the budget is 16 MiB."""
    from transformers import AutoModelForCausalLM

    from compress.block_inputs import capture_block_inputs
    from compress.runtime import return_freed_memory
    from compress.select import find_blocks
    from compress.tiny import tiny_config
    from tests.conftest import calibration_ids

    config = tiny_config("llama")
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = 1, 2048, 256
    config.num_attention_heads = config.num_key_value_heads = 16
    model = AutoModelForCausalLM.from_config(config).eval()
    _, blocks = find_blocks(model)
    windows = calibration_ids(48, 512, vocab=200)
    window_bytes, budget = 512 * 2048 * 4, 16 << 20
    store = Activations([], torch.device("cpu"), tmp_path / "spill", budget=budget)
    growth = []
    real_add = store.add

    def add(tensor):
        real_add(tensor)
        return_freed_memory()
        growth.append(rss_bytes() - start)

    store.append = add
    return_freed_memory()
    start = rss_bytes()
    capture_block_inputs(model, blocks, windows, first_block_output=lambda first: first.raw_call(blocks[0], 0),
                         hidden=store)
    assert len(store) == 48 and store.on_disk
    # From the first window on (before it: the one real run of the first block, and the model's own
    # buffers), what the capture holds grows by at most the budget plus one window.
    held = [g - growth[0] + window_bytes for g in growth]
    assert max(held) <= budget + window_bytes + (4 << 20), [g >> 20 for g in growth]
    assert torch.equal(store[47], model.model.embed_tokens(windows[47].unsqueeze(0)).detach())
