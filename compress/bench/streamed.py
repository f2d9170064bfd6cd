"""The base model's reference made block by block: `compress bench --base` never holds a second whole model.

The windows go through the base as the quantization driver takes a model (compress.driver): the modules before the
first block run once to give each block its inputs, then each block is read from the checkpoint, run on every
window and given back. The logits come from the model's own forward with every block stood in for by a
pass-through and the last one handing over the stored hidden states, so the final norm, the head and whatever a
family does after its blocks (Gemma 2's soft-capping) are the model's own code. What is held is one block, the
windows' hidden states, and the embedding and head while the logits are made.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from compress.bench.agreement import Reference, reference_rows

def can_stream(path: Path, trust_remote_code: bool = False) -> bool:
    """A float checkpoint folder whose every tensor the model's modules hold as stored (no conversion on load)."""
    import json

    from compress.lazy import LazyModel

    if not (path / "config.json").is_file() or json.loads((path / "config.json").read_text()).get(
            "quantization_config"):
        return False
    return LazyModel(path, torch.float32, trust_remote_code).covers_checkpoint()  # experts one linear each


def _stand_ins(blocks, sample, final: list[torch.Tensor]):
    """Every block a pass-through returning what a block returns (``sample``'s form), the last one the stored
    output of the window being run (in order)."""
    from compress.block_inputs import _split_hidden

    last, handed = len(blocks) - 1, iter(final)

    def stand_in(index: int):
        def forward(*args, **kwargs):
            hidden, _, _, _ = _split_hidden(args, kwargs)
            if index == last:
                hidden = next(handed).to(hidden.device)
            return (hidden, *sample[1:]) if isinstance(sample, tuple) else hidden
        return forward
    return stand_in


@torch.no_grad()
def streamed_reference(path: Path, dtype: torch.dtype, device: torch.device, windows: list[torch.Tensor], top_k: int,
                       trust_remote_code: bool = False, show_progress: bool = False) -> Reference:
    """The top-``top_k`` log-probabilities of the float model in ``path`` on ``windows`` (as ``score_windows``
    makes them from the whole model), computed one block at a time."""
    from compress.block_inputs import capture_block_inputs, stood_in
    from compress.blocks import BlockSource
    from compress.driver import _first_block_output
    from compress.lazy import LazyModel
    from compress.shards import ShardReader

    lazy = LazyModel(path, dtype, trust_remote_code, reader=ShardReader(path))
    source = BlockSource(lazy.model, lazy, streaming=True)
    model, blocks = lazy.model, source.blocks
    seen = {}

    def first_output(first):
        seen["sample"] = _first_block_output(source, first, device)
        return seen["sample"]

    with source.front(device) as front_device:
        inputs = capture_block_inputs(model, blocks, windows, front_device, first_block_output=first_output)
    inputs = inputs.moved(device)
    bar = tqdm(total=len(blocks) + 1, desc="base reference", unit="block", disable=not show_progress,
               dynamic_ncols=True)
    try:
        for index in range(len(blocks)):
            block = source.load(index, device)
            inputs.use_block(index)
            for i in range(len(windows)):
                inputs.hidden[i] = inputs.call(block, i)
            source.unload(block, device)
            bar.update(1)
        outside = [name for name in model.state_dict(keep_vars=True) if not name.startswith(source.prefix + ".")]
        lazy.materialize_names(outside, device)
        rows = []
        with stood_in(blocks, _stand_ins(blocks, seen["sample"], list(inputs.hidden))):
            for window in windows:
                logits = model(window.unsqueeze(0).to(device), use_cache=False).logits[0]
                rows.append(reference_rows(torch.log_softmax(logits.float(), dim=-1), top_k))
        lazy.release_names(outside)
        bar.update(1)
    finally:
        bar.close()
    return Reference(torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]))
