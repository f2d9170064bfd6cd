"""bench --base makes the base's reference block by block: the same top-K log-probabilities as the whole model's
forward pass, for the families whose blocks get different inputs (sliding and global layers) and whose logits are
changed after the blocks (soft-capping), while holding one block at a time."""

import pytest
import torch

from compress.bench.score import score_windows
from compress.bench.streamed import can_stream, streamed_reference
from compress.models import load_model, resolve
from tests.test_blocks import wide_llama  # noqa: F401 (a fixture)


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gemma2", "tiny-gemma3", "tiny-qwen3", "tiny-phi3", "tiny-opt",
                                    "tiny-gpt_neox", "tiny-falcon", "tiny-bloom", "tiny-qwen2_moe", "tiny-mixtral",
                                    "tiny-mpt", "tiny-gptj", "tiny-llama3", "tiny-qwen2"])
def test_the_streamed_reference_is_the_whole_model_s(family):
    path = resolve(family).path
    assert can_stream(path)
    generator = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 200, (24,), generator=generator) for _ in range(3)]
    model, _ = load_model(path, torch.float32)
    _, whole = score_windows(model, windows, torch.device("cpu"), batch_size=1, make_reference_k=16)
    streamed = streamed_reference(path, torch.float32, torch.device("cpu"), windows, 16)
    assert torch.equal(streamed.token_ids, whole.token_ids)
    assert torch.allclose(streamed.logprobs, whole.logprobs, atol=1e-4)


def test_a_quantized_base_is_not_streamed(tmp_path):
    from compress.api import QuantizeRequest, quantize

    folder = quantize(QuantizeRequest(model="tiny-llama", method="rtn", out=str(tmp_path / "q"), progress=False,
                                      device="cpu")).folder
    assert not can_stream(folder)


def test_the_streamed_reference_holds_one_block(wide_llama, monkeypatch):  # noqa: F811
    from compress.blocks import BlockSource
    from tests.test_blocks import LAYERS, block_fp32_bytes, rss_bytes

    after_block: list[int] = []
    real = BlockSource.unload
    monkeypatch.setattr(BlockSource, "unload", lambda self, block, device: (real(self, block, device),
                                                                           after_block.append(rss_bytes())))
    generator = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 200, (32,), generator=generator) for _ in range(4)]
    streamed_reference(wide_llama, torch.float32, torch.device("cpu"), windows[:1], 8)  # imports, allocator
    after_block.clear()
    before = rss_bytes()
    streamed_reference(wide_llama, torch.float32, torch.device("cpu"), windows, 8)
    assert len(after_block) == LAYERS + 1  # the first block is run once alone to show its output's form
    growth = after_block[-1] - after_block[2]
    assert growth < block_fp32_bytes() / 4, f"RSS grew {growth / 2**20:.1f} MiB from block 2 to the last"
    assert max(after_block) - before < LAYERS * block_fp32_bytes() / 3, "the reference held far more than a block"
