"""`compress export-gguf`: check the request, quantize a float model on the way if asked, then write the
checkpoint's codes as a GGUF file."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

from compress.errors import UserError
from compress.formats import PACKED_METHODS, activations_refusal
from compress.export_gguf.blocks import BLOCK_TYPES
from compress.export_gguf.kexport import AUTO, check_k_request
from compress.export_gguf.kmix import K_FILE_TYPES
from compress.output import atomic_file, refuse_existing_file, refuse_source_overlap

QUANTIZE_METHODS = ("gptq", "awq", "rtn")
EXPORT_FIX = "export its float original, or a checkpoint quantized without --act-bits"
"""Methods whose codes are w = s * (q - z) per group: the grids ggml's legacy blocks hold."""


def default_output(folder: Path, type_name: str) -> Path:
    return Path("out") / f"{folder.name}-{type_name}.gguf"


def _quantize_flags(type_name: str) -> str:
    block = BLOCK_TYPES[type_name]
    return f"--bits {block.bits} --group-size 32 {'--sym' if block.sym else '--asym'} --no-act-order"


@contextmanager
def _maybe_atomic_file(target: Path | None, force: bool, source: Path):
    if target is None:
        yield None
        return
    with atomic_file(target, force=force, source=source) as partial:
        yield partial


def export_gguf(model: str, type_name: str = "q4_0", out: str | None = None, force: bool = False,
                method: str | None = None, quantize_settings: dict | None = None, keep_float: bool = False) -> dict:
    """Write ``model`` as a GGUF file of ``type_name``. A GPTQ-format checkpoint of ours is written with its
    codes; a float model is written as f16, or (``method``) quantized first with the grid the type needs,
    into a checkpoint kept beside (``quantize_settings``: the quantize request's other settings, its ``out``
    the checkpoint's folder). The embedding and a float head take llama.cpp's types for the file type, or
    float16 with ``keep_float``."""
    from compress.export_gguf.layouts import layout_for
    from compress.export_gguf.writer import check_widths, export_checkpoint
    from compress.models import FLOAT_READER_FIX, refuse_quantized_source, resolve
    from compress.shards import ShardReader

    if type_name not in (*BLOCK_TYPES, *K_FILE_TYPES, AUTO, "f16"):
        raise UserError(f"unknown GGUF type '{type_name}': choose one of {', '.join(BLOCK_TYPES)}, "
                        f"{', '.join(K_FILE_TYPES)}, auto (with --bpw) or f16")
    if (type_name == AUTO) != ("bpw" in (quantize_settings or {})):
        raise UserError("--type auto chooses each tensor's type under a size budget: give both --type auto and "
                        "--bpw B (bits per weight of the blocks' linear layers, e.g. 4.9)")
    settings = dict(quantize_settings or {})
    imatrix_out = settings.pop("imatrix_out", None)
    asked = [k for k in settings if k != "progress"]
    if asked and method is None:
        raise UserError(f"{', '.join('--' + k.replace('_', '-') for k in asked)} set how a float model is "
                        "quantized on the way: add --method gptq, awq or rtn")
    folder = resolve(model, settings.get("trust_remote_code", False)).path
    config = json.loads((folder / "config.json").read_text())
    qcfg = config.get("quantization_config") or {}
    layout_for(config, model)
    w8a8 = activations_refusal(qcfg, "llama.cpp's weight blocks", EXPORT_FIX)
    if type_name in (*K_FILE_TYPES, AUTO):
        check_k_request(config, model, method, bool(qcfg))
        refuse_quantized_source(model, ShardReader(folder), FLOAT_READER_FIX)
        unused = [k for k in ("out", "resume") if k in settings]
        if unused:
            raise UserError(f"{', '.join('--' + {'out': 'checkpoint'}.get(k, k) for k in unused)}: a K file is "
                            "fitted in one pass and keeps no checkpoint; leave it out")
        check_widths(folder, model)
        if imatrix_out is not None and method == "rtn" and type_name != AUTO:
            raise UserError("--imatrix-out writes the statistics of a calibrated run, and --method rtn reads no "
                            "calibration data: use --method gptq or awq (or --type auto)")
    elif imatrix_out is not None:
        raise UserError("--imatrix-out writes the calibration statistics of a K file's pass: use a K type "
                        "(e.g. --type q4_k_m --method gptq)")
    elif type_name == "f16":
        if qcfg:
            raise UserError(f"{model} is already quantized: f16 writes a float model (its float original)")
        if method:
            raise UserError("--method quantizes on the way to q4_0, q4_1 or q8_0; f16 writes the float model as it is")
        # FP8 tensors or packed codes without a quantization_config would be cast as floats: garbage, silently.
        refuse_quantized_source(model, ShardReader(folder), FLOAT_READER_FIX)
    elif method is not None:
        if qcfg:
            raise UserError(f"{model} is already quantized: drop --method to write its own codes")
        if method not in QUANTIZE_METHODS:
            raise UserError(f"--method {method} does not make ggml's block grids: choose {', '.join(QUANTIZE_METHODS)}")
        check_widths(folder, model)
    elif w8a8:
        raise UserError(w8a8)
    elif qcfg.get("quant_method") not in PACKED_METHODS:
        raise UserError(f"{model} is not a packed (compressed-tensors or GPTQ) checkpoint: add --method gptq (or awq, rtn) to quantize it on "
                        f"the way, or quantize it first: `compress quantize {model} {_quantize_flags(type_name)}`")
    target = Path(out) if out else None
    if target is not None:
        refuse_source_overlap(target, folder)
        refuse_existing_file(target, force)
    quantized = None
    if type_name in (*K_FILE_TYPES, AUTO):
        from compress.export_gguf.kexport import export_kquants

        target = target or default_output(folder, type_name)
        imatrix_target = Path(imatrix_out) if imatrix_out is not None else None
        if imatrix_target is not None:
            if imatrix_target.resolve() == target.resolve():
                raise UserError(f"--imatrix-out {imatrix_target} is the GGUF file itself: name another file, "
                                f"e.g. {target.with_suffix('.imatrix.gguf')}")
            refuse_source_overlap(imatrix_target, folder)
            refuse_existing_file(imatrix_target, force)
        started = time.perf_counter()
        with atomic_file(target, force=force, source=folder) as partial, \
                _maybe_atomic_file(imatrix_target, force, folder) as imatrix_partial:
            record = export_kquants(folder, partial, type_name, method, settings, keep_float, imatrix_partial)
        record.update(file=str(target), bytes=target.stat().st_size, seconds=round(time.perf_counter() - started, 3))
        if imatrix_target is not None:
            record["imatrix"]["file"] = str(imatrix_target)
        return record
    if method is not None:
        from compress.api import QuantizeRequest, quantize, takes_option

        block = BLOCK_TYPES[type_name]
        grid = {"bits": block.bits, "group_size": 32, "sym": block.sym}
        if takes_option(method, "act_order"):
            grid["act_order"] = False  # groups must be 32 columns in their original order
        quantized = quantize(QuantizeRequest(model=model, method=method, **grid, **settings))
        folder = quantized.folder
    target = target or default_output(folder, type_name)
    started = time.perf_counter()
    # Written whole under another name, then renamed: a killed export leaves no file that looks complete.
    with atomic_file(target, force=force, source=folder) as partial:
        record = export_checkpoint(folder, partial, type_name, keep_float)
    record.update(file=str(target), bytes=target.stat().st_size, seconds=round(time.perf_counter() - started, 3))
    if quantized is not None:
        record["checkpoint"] = {"folder": str(quantized.folder), "method": method,
                                "seconds": round(quantized.seconds, 1)}
    return record
