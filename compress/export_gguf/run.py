"""`compress export-gguf`: check the request, then write one of our GPTQ checkpoints as a GGUF file."""

from __future__ import annotations

import json
import time
from pathlib import Path

from compress.errors import UserError
from compress.export_gguf.blocks import BLOCK_TYPES


def default_output(folder: Path, type_name: str) -> Path:
    return Path("out") / f"{folder.name}-{type_name}.gguf"


def export_gguf(model: str, type_name: str = "q4_0", out: str | None = None, force: bool = False) -> dict:
    from compress.export_gguf.llama import export_llama
    from compress.models import resolve

    if type_name not in (*BLOCK_TYPES, "f16"):
        raise UserError(f"unknown GGUF type '{type_name}': choose one of {', '.join(BLOCK_TYPES)} or f16")
    folder = resolve(model).path
    qcfg = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    if type_name == "f16":
        if qcfg:
            raise UserError(f"{model} is already quantized: f16 writes a float model (its float original)")
    elif qcfg.get("quant_method") != "gptq":
        block = BLOCK_TYPES[type_name]
        raise UserError(f"{model} is not a GPTQ-format checkpoint: quantize it first, e.g. `compress quantize {model} "
                        f"--bits {block.bits} --group-size 32 {'--sym' if block.sym else '--asym'} --no-act-order`")
    target = Path(out) if out else default_output(folder, type_name)
    if target.exists() and not force:
        raise UserError(f"{target} exists: pass --force to replace it, or --out another file")
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    record = export_llama(folder, target, type_name)
    record.update(file=str(target), bytes=target.stat().st_size, seconds=round(time.perf_counter() - started, 3))
    return record
