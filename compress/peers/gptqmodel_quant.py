"""GPTQModel as a peer quantizer: the same calibration windows, classic GPTQ settings, its own code.

Its newer defaults (act_group_aware, MSE grid search) are turned off so that both tools run the
algorithm of the paper; the checkpoint it writes is standard GPTQ and is measured by our loader.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from compress.errors import UserError
from compress.output import atomic_folder

# On a 2-core machine GPTQModel otherwise asks for more workers than there are cores, and compiles a
# C++ packing extension on first use (~30 s).
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(2, os.cpu_count() or 1)))
os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                    "vocab.txt", "tokenizer.model")


def quantize_with_gptqmodel(source: Path, bits: int, group_size: int, act_order: bool, damp_percent: float,
                            calib: list[torch.Tensor], folder: Path, device: str = "cpu", force: bool = False,
                            sym: bool = True, act_group_aware: bool = False, mse: float = 0.0) -> Path:
    """GPTQModel's quantization of ``source`` on ``calib`` into ``folder``. The defaults are the classic
    GPTQ settings; ``act_group_aware`` (GAR, its default without act-order), asymmetric grids and ``mse``
    (its grid search's norm, e.g. 2.4) give its newer best."""
    from gptqmodel import GPTQModel, QuantizeConfig

    qcfg = QuantizeConfig(bits=bits, group_size=group_size, sym=sym, desc_act=act_order, damp_percent=damp_percent,
                          act_group_aware=act_group_aware, mse=mse, true_sequential=True, offload_to_disk=False,
                          device=device)
    dtype = torch.float32 if device == "cpu" else torch.float16
    source, folder = Path(source).resolve(), Path(folder)
    with atomic_folder(folder, force=force) as tmp:
        tmp = tmp.resolve()  # absolute: the working directory changes below
        cwd = os.getcwd()
        with tempfile.TemporaryDirectory() as scratch:
            os.chdir(scratch)  # GPTQModel writes a logs/ folder into the working directory
            try:
                model = GPTQModel.load(str(source), qcfg, dtype=dtype)
                model.quantize([{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in calib], batch_size=1)
                model.save(str(tmp))
            finally:
                os.chdir(cwd)
        if not (tmp / "config.json").is_file() or not list(tmp.glob("*.safetensors")):
            raise UserError(f"GPTQModel finished but wrote no checkpoint into {folder}: nothing was kept")
        for name in _TOKENIZER_FILES:  # the benchmark needs the tokenizer beside the weights
            if (source / name).is_file() and not (tmp / name).exists():
                shutil.copyfile(source / name, tmp / name)
    return folder
