"""`compress export-gguf MODEL --type q4_k_m --method gptq|awq|rtn`: a float model into one of llama.cpp's K file types.

Each tensor gets the type llama.cpp's own quantizer would give it in that file (``kmix``). The blocks stream through
the shared driver (compress.driver: one block in memory at a time) and each linear layer is fitted into its type
as it comes: with ``gptq``, the format's grids are chosen first for the least output error on the calibration
inputs and GPTQ's error propagation then picks the codes on them; with ``rtn``, the grids are chosen on the weights
alone (``kquants``); with ``awq``, AWQ's channel scales (searched with each layer rounded into its own type) are
folded into the block first and the grids then chosen weighted by the inputs' mean squares. Every later layer is calibrated on the quantized layers before it. The fitted blocks wait in a
temporary folder until the file is written; the embedding and head take their types by the same weighted fit, the
norms float32, anything else float16, as in the files llama.cpp makes.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import torch

from compress.errors import UserError
from compress.export_gguf.kmix import K_FILE_TYPES, MixRules, ModelShape, is_quantized
from compress.export_gguf.kquants import KFORMATS, LEGACY_FORMATS, dequantize, encode, fit_gptq, fit_weighted
from compress.export_gguf.kauto import type_bits_per_weight
from compress.export_gguf.layouts import layout_for
from compress.export_gguf.writer import EXPERT_LAYER, FLOAT32_MATRICES, _float_tensor

FORMATS = {**KFORMATS, **LEGACY_FORMATS}
K_METHODS = ("gptq", "awq", "rtn")
AUTO = "auto"
"""--type auto --bpw B: each block linear's type chosen under the budget (compress.export_gguf.kauto)."""
K_FILE_ENUMS = {name: getattr(gguf.LlamaFileType, f"MOSTLY_{name.upper()}") for name in K_FILE_TYPES}
# an auto file is labelled by its blocks' most common type
K_FILE_ENUMS.update({kind: getattr(gguf.LlamaFileType, label) for kind, label in (
    ("q3_k", "MOSTLY_Q3_K_M"), ("q4_k", "MOSTLY_Q4_K_M"), ("q5_k", "MOSTLY_Q5_K_M"), ("q4_0", "MOSTLY_Q4_0"),
    ("q5_0", "MOSTLY_Q5_0"), ("q5_1", "MOSTLY_Q5_1"), ("q8_0", "MOSTLY_Q8_0"))})
MOE_KEYS = ("num_local_experts", "num_experts")


def check_k_request(config: dict, where: str, method: str | None, quantized: bool) -> None:
    """One-line errors, before any work, for what a K file cannot be made from."""
    if quantized:
        raise UserError(f"{where} is already quantized: K types are fitted from the float model (point at its float "
                        "original and add --method gptq, awq or rtn)")
    if method is None:
        raise UserError("K types are fitted from the float model on the way: add --method gptq (calibrated), awq "
                        "(calibrated) or rtn")
    if method not in K_METHODS:
        raise UserError(f"--method {method} does not make K blocks: choose gptq, awq or rtn")


def _quantized(hf: str, fmt, members: list[str], fitted: dict[str, Path], lazy, layout, config: dict) -> np.ndarray:
    """A quantized tensor's blocks: a block linear's from the scratch folder (a block's experts of one kind
    stacked), the embedding or head fitted now (on the weights alone, in the rows' GGUF order)."""
    name = hf.removesuffix(".weight")
    if members and members != [name]:
        return np.stack([np.load(fitted[member]) for member in members])
    if name in fitted:
        return np.load(fitted[name], mmap_mode="r")
    tensor = lazy.read(hf).float()
    order = layout.row_order(name, tensor.shape[0], config)
    return encode(fit_weighted(tensor if order is None else tensor[order], fmt))


def export_kquants(folder: Path, out: Path, file_type: str, method: str, settings: dict,
                   keep_float: bool = False, imatrix_out: Path | None = None) -> dict:
    """Write the float model in ``folder`` to ``out`` (the caller renames it into place) as ``file_type``;
    ``keep_float`` leaves the embedding and head in float16; ``imatrix_out`` gets the calibration pass's
    statistics in llama.cpp's imatrix format (a calibrated run only: gptq, or auto)."""
    from transformers import AutoTokenizer

    from compress.blocks import BlockSource
    from compress.data import calibration_windows_of_text, load_calibration_text
    from compress.driver import DriverReport, run_layerwise
    from compress.export_gguf.imatrix import Imatrix, entry_from_hessian, stacked, write_imatrix
    from compress.output import WRITER
    from compress.export_gguf.writer import _Names, extra_entries, start_file, write_streamed
    from compress.lazy import LazyModel
    from compress.runtime import resolve_device
    from compress.select import ModuleSelection, block_linears
    from compress.shards import ShardReader

    config = json.loads((folder / "config.json").read_text())
    layout = layout_for(config, str(folder))
    trust = settings.get("trust_remote_code", False)
    lazy = LazyModel(folder, torch.float32, trust, reader=ShardReader(folder))
    source = BlockSource(lazy.model, lazy, streaming=True)
    names = _Names(layout, config)
    tied = bool(config.get("tie_word_embeddings", False)) and not layout.writes_tied_output
    selection = ModuleSelection()
    linears = [f"{source.prefix}.{i}.{name}" for i, block in enumerate(source.blocks)
               for name in block_linears(block, selection)]
    shapes = {key: tuple(value.shape) for key, value in lazy.model.state_dict().items()}
    others = [key for key in shapes if key.rpartition(".")[0] not in linears or not key.endswith(".weight")]
    if tied:
        others = [key for key in others if not key.startswith("lm_head.")]
    # A block's experts of one kind are one [experts, rows, columns] tensor in llama.cpp (stacked when written).
    stacks: dict[str, list[str]] = {}
    for name in linears:
        match = EXPERT_LAYER.match(name)
        key = f"{match['experts']}.{match['kind']}" if match else name
        stacks.setdefault(key, []).append(name)
    for key, members in stacks.items():
        if len(members) > 1 or members[0] != key:
            shapes[f"{key}.weight"] = (len(members), *shapes[f"{members[0]}.weight"])
    plan = [(f"{key}.weight", names(f"{key}.weight")) for key in stacks]
    plan += [(key, names(key)) for key in others]
    heads = config.get("num_attention_heads") or config.get("n_head")
    experts = max((config.get(key) or 0) for key in MOE_KEYS)
    shape = ModelShape(gguf.MODEL_ARCH_NAMES[layout.arch], len(source.blocks), heads,
                       config.get("num_key_value_heads") or heads, experts=experts, tied=tied)
    auto = file_type == AUTO
    # auto: the tensors outside the blocks (embedding, head) take Q4_K_M's types; the blocks' are measured below.
    rules = MixRules("q4_k_m" if auto else file_type, shape, [target for _, target in plan])
    types = {hf: rules.type_of(target, shapes[hf][-1]) for hf, target in plan if is_quantized(target, shapes[hf])}
    if keep_float:
        types = {hf: kind for hf, kind in types.items() if names(hf) not in ("token_embd.weight", "output.weight")}

    if auto:
        from compress.export_gguf.kauto import candidate_types

        floor = type_bits_per_weight({f"{key}.weight": candidate_types(shapes[f"{key}.weight"][-1])[0]
                                      for key in stacks}, shapes)
        if settings["bpw"] < floor:
            raise UserError(f"--bpw {settings['bpw']:g} is below {floor:.3f}, what the smallest types store: "
                            "raise it")
    windows = None
    if method in ("gptq", "awq") or auto:
        text, record = load_calibration_text(settings.get("calib", "auto"))
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
        windows, _ = calibration_windows_of_text(tokenizer, text, record, settings.get("nsamples", 128),
                                                 settings.get("seqlen", 512), settings.get("seed", 0))
    device = resolve_device(settings.get("device", "cpu"))
    chosen = None
    if auto:
        from compress.export_gguf.kauto import choose_types, fake_quantize
        from compress.quant.sensitivity import measure_sensitivities

        costs = measure_sensitivities(source, windows, lambda layer: candidate_types(layer.in_features), fake_quantize,
                                      selection, device, settings.get("progress", True))
        by_layer, reached = choose_types(costs, settings["bpw"], list(stacks.values()))
        for key, members in stacks.items():
            types[f"{key}.weight"] = by_layer[members[0]]
        chosen = {"bpw": settings["bpw"], "reached": round(reached, 4)}
    block_types = [types[f"{key}.weight"] for key in stacks]
    with tempfile.TemporaryDirectory(prefix=".kquants-", dir=out.parent) as scratch:
        fitted: dict[str, Path] = {}

        stacked_as = {member: key for key, members in stacks.items() for member in members}
        report = DriverReport()
        tokens = sum(int(w.numel()) for w in windows) if windows is not None else 0
        statistics = {}

        folded: dict[str, Path] = {}  # float tensors of a block that AWQ scaled (its norms, a producer's bias)
        scalings = []

        def prepare_awq(block_name, block, linears, groups, inputs, experts) -> None:
            from compress.export_gguf.kauto import fake_quantize
            from compress.quant.awq import awq_prepare_block

            def rounded(name: str, weight: torch.Tensor) -> torch.Tensor:
                return fake_quantize(weight, types[f"{stacked_as[f'{block_name}.{name}']}.weight"])

            scalings.extend(awq_prepare_block(block_name, block, linears, groups, inputs, 4, 32, False, skip=experts,
                                              fake_quantize=rounded))

        def keep_folded(block_name: str, block: torch.nn.Module) -> None:
            for name, param in block.named_parameters():
                key = f"{block_name}.{name}"
                if key in others_set:
                    folded[key] = Path(scratch) / f"float-{len(folded)}.npy"
                    np.save(folded[key], param.detach().float().cpu().numpy())

        def fit_layer(name: str, layer: torch.nn.Linear, hessian: torch.Tensor | None) -> torch.Tensor:
            fmt = FORMATS[types[f"{stacked_as[name]}.weight"]]
            if imatrix_out is not None:
                # an expert no token reached often enough has no Hessian: a count of 0 (llama.cpp reads 1s)
                statistics[name] = entry_from_hessian(hessian, report.experts.get(name, {}).get("tokens", tokens)) \
                    if hessian is not None else entry_from_hessian(torch.zeros(layer.in_features, layer.in_features), 0)
            weight = layer.weight.data.float().cpu()
            if hessian is None:
                blocks = fit_weighted(weight, fmt)
            elif method == "awq":  # the scales are folded: round on grids weighted by the inputs' mean squares
                blocks = fit_weighted(weight, fmt, torch.diagonal(hessian).cpu())
            else:
                blocks = fit_gptq(weight, hessian.cpu(), fmt)
            data = encode(blocks)
            order = layout.row_order(name, data.shape[0], config)
            fitted[name] = Path(scratch) / f"{len(fitted)}.npy"
            np.save(fitted[name], data if order is None else data[order.numpy()])
            return dequantize(blocks).to(layer.weight.dtype)

        awq = method == "awq"
        others_set = set(others)
        run_layerwise(source, windows, fit_layer, selection, device, keep_folded if awq else lambda *_: None,
                      desc=f"{method} {file_type}", show_progress=settings.get("progress", True), report=report,
                      prepare_block=prepare_awq if awq else None)
        if imatrix_out is not None:
            entries = {names(f"{key}.weight"): stacked([statistics[m] for m in members])
                       for key, members in stacks.items()}
            write_imatrix(imatrix_out, Imatrix(entries, [f"{record.source}:{record.split} ({record.origin})"], len(windows), int(windows[0].numel())),
                          WRITER)
        enum = K_FILE_ENUMS[max(set(block_types), key=block_types.count)] if auto else K_FILE_ENUMS[file_type]
        writer, vocab = start_file(folder, config, layout, enum)
        # Every tensor's place and size is written first, then its data one tensor at a time (read from the scratch
        # folder, or made then): the file is never held in memory.
        entries = []
        for hf, target in plan:
            kind, dims = types.get(hf), shapes[hf]
            if kind is not None:
                fmt = FORMATS[kind]
                row_bytes = dims[-1] // fmt.block * fmt.block_bytes
                members = stacks.get(hf.removesuffix(".weight"), [])
                entries.append((target, (*dims[:-1], row_bytes), np.uint8, int(np.prod(dims[:-1])) * row_bytes, kind,
                                lambda hf=hf, fmt=fmt, members=members:
                                _quantized(hf, fmt, members, fitted, lazy, layout, config)))
            else:
                as_float32 = len(dims) == 1 or target.endswith(FLOAT32_MATRICES)
                dtype = np.float32 if as_float32 else np.float16
                entries.append((target, dims, dtype, int(np.prod(dims)) * np.dtype(dtype).itemsize, None,
                                lambda hf=hf, dtype=dtype: _float_tensor(
                                    lazy, hf, dtype, layout, config,
                                    torch.from_numpy(np.load(folded[hf])) if hf in folded else None)))
        entries += extra_entries(layout, config)
        write_streamed(writer, out, entries)
        counts = Counter(kind or np.dtype(dtype).name.replace("float", "f") for _, _, dtype, _, kind, _ in entries)
    return {"type": file_type, "architecture": config["architectures"][0],
            "gguf_architecture": gguf.MODEL_ARCH_NAMES[layout.arch], "method": method,
            "tensor_types": dict(sorted(counts.items())), "pre_tokenizer": vocab.pre, "auto": chosen,
            # tensors whose rows hold no K blocks, in the blocks of 32 llama.cpp falls back to
            "fallbacks": {names(hf): kind for hf, kind in types.items() if kind in LEGACY_FORMATS},
            "block_bits_per_weight": round(type_bits_per_weight({f"{k}.weight": t for k, t in zip(stacks, block_types)},
                                                                shapes), 4),
            "calibration": None if windows is None else {"windows": len(windows), "seqlen": int(windows[0].numel())},
            "imatrix": None if imatrix_out is None else {"entries": len(stacks)},
            "awq": None if method != "awq" else {"scaled": sum(s.ratio is not None for s in scalings),
                                                 "unscaled": sum(s.ratio is None for s in scalings)}}
