"""The driver hands every block the inputs that block gets in the model's own forward: its hidden states
and its own mask, rotary embeddings and other per-layer inputs (Gemma 2/3 sliding and global layers, a
sliding window shorter than the sequence), on every seed architecture."""

from __future__ import annotations

import pytest
import torch

from compress.blocks import BlockSource
from compress.driver import run_layerwise
from compress.models import load_model, resolve
from compress.select import ModuleSelection, find_blocks
from tests.conftest import CAUSAL_ARCHS, calibration_ids

SEQLEN = 16  # longer than the sliding windows below


def per_layer_models() -> dict:
    """Tiny models whose blocks get different inputs by layer type."""
    from transformers import Gemma2Config, Gemma3TextConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    return {
        # Layer 0 is a sliding layer with a local RoPE base; layer 2 is global with another base.
        "gemma3": Gemma3TextConfig(**common, head_dim=16, num_hidden_layers=3, sliding_window=4,
                                   layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
        "gemma2": Gemma2Config(**common, head_dim=16, num_hidden_layers=2, sliding_window=4,
                               layer_types=["sliding_attention", "full_attention"]),
        "qwen2-sliding": Qwen2Config(**common, num_hidden_layers=2, use_sliding_window=True, sliding_window=4,
                                     max_window_layers=1),
        "mistral-sliding": MistralConfig(**common, num_hidden_layers=2, sliding_window=4),
    }


def build(name: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if name in CAUSAL_ARCHS:
        model, _ = load_model(resolve(f"tiny-{name}").path)
        return model
    return AutoModelForCausalLM.from_config(per_layer_models()[name]).eval()


def flatten(obj) -> list:
    """Every tensor (and None) inside a block's inputs, in order."""
    if isinstance(obj, torch.Tensor) or obj is None:
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in flatten(o)]
    if isinstance(obj, dict):
        return [t for k in sorted(obj) for t in flatten(obj[k])]
    return [obj]


def recorder(calls: list):
    def hook(_module, args, kwargs):
        calls.append(flatten((args, {k: v for k, v in kwargs.items() if k != "use_cache"})))
    return hook


def same(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or not torch.allclose(x.float(), y.float(), atol=1e-5, rtol=1e-4):
                return False
        elif x != y:
            return False
    return True


@pytest.mark.parametrize("name", [*CAUSAL_ARCHS, *per_layer_models()])
def test_each_block_gets_the_inputs_of_the_models_own_forward(name):
    model = build(name)
    windows = calibration_ids(3, SEQLEN, vocab=200)
    _, blocks = find_blocks(model)
    expected: list[list] = [[] for _ in blocks]
    handles = [block.register_forward_pre_hook(recorder(expected[b]), with_kwargs=True) for b, block in enumerate(blocks)]
    with torch.no_grad():
        for window in windows:
            model(window.unsqueeze(0), use_cache=False)
    for h in handles:
        h.remove()

    given: list[list] = [[] for _ in blocks]
    handles = [block.register_forward_pre_hook(recorder(given[b]), with_kwargs=True) for b, block in enumerate(blocks)]
    # Quantization off: every layer keeps its weight, so each block's inputs must match the forward's.
    run_layerwise(BlockSource.in_memory(model), windows, lambda _n, layer, _h: layer.weight.data.clone(),
                  ModuleSelection(), torch.device("cpu"), lambda *_: None, desc="identity", show_progress=False)
    for h in handles:
        h.remove()
    for b in range(len(blocks)):
        reached = set()
        for k, call in enumerate(given[b]):  # the driver runs a block many times (per layer group, then onward)
            match = next((w for w in range(len(windows)) if same(call, expected[b][w])), None)
            assert match is not None, f"block {b}, call {k}: inputs the model's forward never gives it"
            reached.add(match)
        assert reached == set(range(len(windows))), f"block {b} did not see every window"
    if name in ("gemma3", "gemma2", "qwen2-sliding"):  # the case is real: layer types get different inputs
        assert not same(expected[0][0], expected[-1][0])


def test_gemma3_streams_to_the_bytes_of_an_in_memory_run(tmp_path, calib_file):
    """Streaming, the first block is read from the shards to show the stand-ins what a block returns,
    and every block still gets its own layer type's inputs: the same bytes as the in-memory run."""
    from compress.api import QuantizeRequest, quantize
    from compress.tiny import tiny_tokenizer
    from tests.conftest import assert_same_checkpoint

    folder = tmp_path / "gemma3"
    build("gemma3").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    common = dict(model=str(folder), method="gptq", bits=4, group_size=32, calib=str(calib_file), nsamples=4,
                  seqlen=SEQLEN, device="cpu", progress=False)
    streamed = quantize(QuantizeRequest(**common, out=str(tmp_path / "streamed")))
    in_memory = quantize(QuantizeRequest(**common, out=str(tmp_path / "in-memory"), in_memory=True))
    assert streamed.manifest["streaming"] and not in_memory.manifest["streaming"]
    assert_same_checkpoint(streamed.folder, in_memory.folder)


def test_a_model_whose_blocks_are_not_called_once_each_is_refused():
    """The stand-ins can only speak for blocks the forward calls once per window, in order; a model that
    runs a block twice is refused in one line rather than calibrated with the wrong inputs."""
    from torch import nn

    from compress.block_inputs import capture_block_inputs
    from compress.errors import UserError

    class RepeatsItsFirstBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(16, 8)
            self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

        def forward(self, ids):
            h = self.layers[0](self.layers[0](self.embed(ids)))
            return self.layers[1](h)

    model = RepeatsItsFirstBlock()
    with pytest.raises(UserError, match=r"RepeatsItsFirstBlock: its blocks were called \[2, 4\] times for 2 windows"):
        capture_block_inputs(model, model.layers, [torch.arange(4), torch.arange(4)],
                             first_block_output=lambda first: first.raw_call(model.layers[0], 0))
