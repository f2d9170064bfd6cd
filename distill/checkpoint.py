"""Training checkpoints for ``--resume``: tensors in safetensors, the rest in JSON (never pickle).

A checkpoint holds everything that decides the next step: the student's and projections' weights,
the optimizer's moments, the step, the RNG states and the history so far. It is written to a
temporary file and renamed, so an interruption while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from compress.errors import UserError

STATE_FILE = "state.json"
TENSORS_FILE = "tensors.safetensors"


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().contiguous().clone()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(folder: Path, *, stage: int, step: int, student: torch.nn.Module, extra: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, history: list[dict], fingerprint: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"student.{k}": v.detach().contiguous().clone() for k, v in student.state_dict().items()}
    tensors.update({f"extra.{k}": v.detach().contiguous().clone() for k, v in extra.state_dict().items()})
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    # Tied weights share storage; safetensors refuses shared tensors, and clone() above unshares them.
    tmp = folder / f".{TENSORS_FILE}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / TENSORS_FILE)
    state = {"fingerprint": fingerprint, "stage": stage, "step": step, "optimizer": opt_meta, "history": history}
    tmp = folder / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, folder / STATE_FILE)


def read_checkpoint(folder: Path, fingerprint: str) -> dict | None:
    """The saved state, or None when there is none; a checkpoint of other settings is an error."""
    if not (folder / STATE_FILE).is_file():
        return None
    state = json.loads((folder / STATE_FILE).read_text())
    if state.get("fingerprint") != fingerprint:
        raise UserError(f"the checkpoint in {folder} was made with other settings: resume with the same config, or "
                        "remove that folder to start over")
    state["tensors"] = load_file(str(folder / TENSORS_FILE))
    return state


def restore_weights(state: dict, student: torch.nn.Module, extra: torch.nn.Module) -> None:
    tensors = state["tensors"]
    student.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("student.")}, strict=True)
    extra.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}, strict=True)


def restore_training(state: dict, optimizer: torch.optim.Optimizer) -> None:
    """Optimizer moments and RNG states of a checkpoint taken inside a stage."""
    tensors = state["tensors"]
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
