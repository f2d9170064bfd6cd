"""The output head (lm_head) quantized too, and an input embedding tied to it.

In a small model the head is the largest single matrix (SmolLM2-135M: 49,152 x 576, a fifth of the
weights) and batch-1 decode reads it for every token, so a checkpoint that leaves it in float is
neither small nor fast. The head is quantized data-free (RTN), by default to 8 bits per output
channel: the choice llama.cpp makes for its output tensor, since 4 bits there costs more accuracy than
anywhere else.

Where the embedding is tied to the head, the quantized model reads embedding rows from the head's
codes (:class:`QuantEmbedding`): one copy in memory. Loaders that cannot do that (transformers, vLLM) find a
float16 copy of the same dequantized rows in the file, under the embedding's usual name: both ways give the same
numbers up to float16 rounding. A compressed-tensors checkpoint says the two are not tied (vLLM would otherwise
run the float embedding as the head); a GPTQ one keeps the source's tie, which is how transformers through
optimum, quantizing only the blocks, gets its head from that copy.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from compress.errors import UserError
from compress.quant.config import WeightQuantConfig
from compress.quant.linear import QuantLinear
from compress.quant.rtn import rtn_quantize
from compress.select import set_submodule


class QuantEmbedding(nn.Module):
    """An embedding whose rows are read from a quantized head's codes (no weights of its own).

    The source layer is kept outside the module tree (a tuple), so the state dict and the weight
    count hold the head's tensors once, under the head's name. A subclass of nn.Embedding with its own
    forward (Gemma's scaled embedding multiplies by sqrt(hidden)) is kept too: its forward runs on just
    the rows the ids need, with the ids renumbered into them (``check_reproducible`` proves it can).
    """

    def __init__(self, source: nn.Module, dtype: torch.dtype, original: nn.Module | None = None) -> None:
        super().__init__()
        self._source = (source,)
        # Kept outside the module tree too (its weight is never read); its computed buffers move with the ids.
        self._lookup = (original,) if original is not None and type(original) is not nn.Embedding else None
        # An empty non-persistent buffer carries the output dtype, so model.to(dtype) moves it along.
        self.register_buffer("_dtype", torch.empty(0, dtype=dtype), persistent=False)
        self.num_embeddings, self.embedding_dim = source.out_features, source.in_features

    @property
    def source(self) -> nn.Module:
        return self._source[0]

    def retarget(self, source: nn.Module) -> None:
        """Read rows from ``source`` from now on (a backend replaced the head with its own layer)."""
        self._source = (source,)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self._lookup is None:
            return self.source.embedding_rows(ids).to(self._dtype.dtype)
        unique, renumbered = torch.unique(ids, return_inverse=True)
        rows = self.source.embedding_rows(unique).to(self._dtype.dtype)
        return run_on_rows(self._lookup[0], rows, renumbered)

    def extra_repr(self) -> str:
        kind = "" if self._lookup is None else f", through {type(self._lookup[0]).__name__}'s forward"
        return f"{self.num_embeddings}, {self.embedding_dim}, rows from the quantized head{kind}"


def run_on_rows(embedding: nn.Module, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``embedding``'s own forward with ``rows`` as its weight table (its buffers on the ids' device)."""
    from torch.func import functional_call

    tensors = {name: b.to(ids.device) for name, b in embedding.named_buffers()}
    tensors["weight"] = rows
    return functional_call(embedding, tensors, (ids,))


def check_reproducible(embedding: nn.Module, weight: torch.Tensor) -> None:
    """Refuse an embedding whose forward a table of just the needed rows cannot reproduce exactly (one that
    looks at the ids themselves beyond the lookup, or is no nn.Embedding at all). ``weight``: its table,
    or any rows of the same width (the check runs on the first 64)."""
    if type(embedding) is nn.Embedding:
        return
    if not isinstance(embedding, nn.Embedding):
        raise UserError(f"the input embedding tied to the head is a {type(embedding).__name__}, not an embedding "
                        "table: drop --lm-head-bits")
    table = weight[:64].float()
    ids = torch.randint(0, table.shape[0], (2, 16), generator=torch.Generator().manual_seed(0))
    full = run_on_rows(embedding, table, ids)
    unique, renumbered = torch.unique(ids, return_inverse=True)
    if not torch.equal(full, run_on_rows(embedding, table[unique], renumbered)):
        raise UserError(f"the input embedding tied to the head ({type(embedding).__name__}) computes more than a "
                        "row lookup, which a quantized head cannot reproduce: drop --lm-head-bits")


def module_name(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError("module not found in the model")


def head_and_embedding(model: nn.Module) -> tuple[str, nn.Linear, str | None]:
    """(head name, head, name of the input embedding tied to it or None)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise UserError(f"{type(model).__name__} has no linear output head to quantize: drop --lm-head-bits")
    embedding = model.get_input_embeddings()
    tied = isinstance(getattr(embedding, "weight", None), torch.Tensor) and (embedding.weight is head.weight or (
        not head.weight.is_meta and embedding.weight.data_ptr() == head.weight.data_ptr()))
    return module_name(model, head), head, module_name(model, embedding) if tied else None


HEAD_CHUNK_ROWS = 8192
"""Rows of the head quantized (and dequantized for the float16 copy) at a time: a 128k-vocabulary head
of width 4096 is 2 GiB in float32, and whole-matrix steps would hold several such copies at once. RTN
works row by row, so the result does not depend on the chunk (a multiple of 32: packed zero points
split on word boundaries)."""


def pack_head(weight: torch.Tensor, bias: torch.Tensor | None, cfg: WeightQuantConfig,
              checkpoint_format: str = "gptq", chunk_rows: int = HEAD_CHUNK_ROWS) -> QuantLinear:
    """The head quantized data-free (RTN, per output channel by default) and packed in the file's
    ``checkpoint_format``, ``chunk_rows`` rows at a time from ``weight`` in whatever dtype it is stored in."""
    out_features, in_features = weight.shape
    layer = QuantLinear(in_features, out_features, cfg.bits, cfg.group_size, bias is not None,
                        bias_dtype=bias.dtype if bias is not None else torch.float16,
                        checkpoint_format=checkpoint_format, sym=cfg.sym).to(weight.device)
    for start in range(0, out_features, chunk_rows):
        end = min(start + chunk_rows, out_features)
        layer.set_rows(start, end, rtn_quantize(weight[start:end], cfg))
    if bias is not None:
        layer.bias.copy_(bias.detach())
    return layer


def float16_rows(layer: QuantLinear, chunk_rows: int = HEAD_CHUNK_ROWS) -> torch.Tensor:
    """The head's dequantized weight in float16 (the copy loaders without our modules read), made
    ``chunk_rows`` rows at a time."""
    rows = torch.empty(layer.out_features, layer.in_features, dtype=torch.float16, device=_device(layer))
    for start in range(0, layer.out_features, chunk_rows):
        end = min(start + chunk_rows, layer.out_features)
        rows[start:end] = layer.dequantized_rows(start, end)
    return rows


def head_record(name: str, cfg: WeightQuantConfig, tied: str | None) -> dict:
    """The manifest's record of a quantized head."""
    return {"module": name, "method": "rtn", "bits": cfg.bits, "group_size": cfg.group_size, "sym": cfg.sym,
            "tied_embedding": tied}


def head_file_tensors(record: dict, packed: QuantLinear) -> dict[str, torch.Tensor]:
    """What a checkpoint holds for a quantized head, by memory name: its packed tensors, and the float16 copy of its
    dequantized rows that loaders without our modules read: under the tied embedding's name (the embedding every
    loader needs), or in the GPTQ layout as the head's own ``weight`` too (transformers, through optimum, packs only
    the blocks' layers and would otherwise start the head from random numbers; GPTQModel reads the packed head). A
    compressed-tensors head has no float copy of its own: every reader of that format packs the head as its config
    says."""
    tensors = packed.state_dict(prefix=f"{record['module']}.")
    if record["tied_embedding"]:
        tensors[f"{record['tied_embedding']}.weight"] = float16_rows(packed)
    elif packed.checkpoint_format != "compressed-tensors":
        tensors[f"{record['module']}.weight"] = float16_rows(packed)
    return tensors


def quantize_head(model: nn.Module, cfg: WeightQuantConfig, dtype: torch.dtype,
                  checkpoint_format: str = "gptq") -> dict:
    """Replace the head by a QuantLinear (RTN) and a tied embedding by a QuantEmbedding on it; the
    manifest's record of what was done."""
    name, head, tied = head_and_embedding(model)
    if tied:
        check_reproducible(model.get_submodule(tied), head.weight.data)
    packed = pack_head(head.weight.data, head.bias, cfg, checkpoint_format)
    set_submodule(model, name, packed)
    if tied:
        set_submodule(model, tied, QuantEmbedding(packed, dtype, model.get_submodule(tied)))
    return head_record(name, cfg, tied)


def dynamic_override(head: dict, body: WeightQuantConfig) -> dict:
    """GPTQModel's per-module override (``dynamic``) for a head quantized differently from the body."""
    settings = {"bits": head["bits"], "group_size": head["group_size"], "sym": head["sym"], "desc_act": False}
    if (head["bits"], head["group_size"], head["sym"]) == (body.bits, body.group_size, body.sym):
        return {}
    return {f"+:^{re.escape(head['module'])}$": settings}


def layer_settings(qcfg: dict, name: str) -> tuple[int, int]:
    """(bits, group_size) of the packed layer ``name`` under a GPTQ quantization_config, with its
    ``dynamic`` per-module overrides (positive patterns only: negative ones mark float layers)."""
    bits, group_size = int(qcfg["bits"]), int(qcfg["group_size"])
    for pattern, override in (qcfg.get("dynamic") or {}).items():
        if pattern.startswith("-:"):
            continue
        if re.match(pattern.removeprefix("+:"), name):
            return int(override.get("bits", bits)), int(override.get("group_size", group_size))
    return bits, group_size


def _device(module: nn.Module) -> torch.device:
    return next(iter(module.buffers())).device
