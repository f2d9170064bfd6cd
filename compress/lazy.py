"""A model opened without its weights: the module tree on the meta device, tensors read from the
shards only when a part of the model is needed, and released again after.

This is how a 7B model is worked on in a few GiB: quantization and pruning materialise the modules
that run before the first block, then one block at a time; loading for inference materialises every
module straight into its final (packed) form, never into a dense float copy first.

Checkpoint names and the model's own names can differ (transformers renames a few tensors while
loading, e.g. GPT-NeoX's ``embed_out`` is ``lm_head`` in memory): :class:`NameMap` translates both
ways with transformers' own renaming rules, so what is written back carries the names other tools
expect.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compress.errors import UserError
from compress.moe import checkpoint_renames, unfuse_experts
from compress.shards import ShardReader


class NameMap:
    """Checkpoint (disk) tensor names <-> the model's (memory) names."""

    def __init__(self, model: nn.Module, disk_keys: list[str]) -> None:
        renamed = _renamer(model)
        self.to_memory = {key: renamed(key) for key in disk_keys}
        self.to_disk = {memory: disk for disk, memory in self.to_memory.items()}
        # Module paths that differ, so names of new tensors (a packed layer's qweight) follow the same rule.
        self._modules: dict[str, str] = {}
        for disk, memory in self.to_memory.items():
            disk_module, _, disk_leaf = disk.rpartition(".")
            memory_module, _, memory_leaf = memory.rpartition(".")
            if disk_leaf == memory_leaf and disk_module != memory_module:
                self._modules[memory_module] = disk_module

    def disk_name(self, memory_key: str) -> str:
        if memory_key in self.to_disk:
            return self.to_disk[memory_key]
        module, _, leaf = memory_key.rpartition(".")
        return f"{self._modules.get(module, module)}.{leaf}" if module else leaf

    def disk_module(self, memory_module: str) -> str:
        return self._modules.get(memory_module, memory_module)


def _renamer(model: nn.Module):
    """disk name -> memory name, by the renaming rules transformers applies when it loads ``model``
    (renames only: a tensor that transformers would merge with others keeps its name)."""
    experts = checkpoint_renames(model)

    def ours(key: str) -> str:
        for pattern, replacement in experts:
            key = pattern.sub(replacement, key)
        return key

    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        renamings = [c for c in get_model_conversion_mapping(model) if isinstance(c, WeightRenaming)]
    except (ImportError, AttributeError, TypeError):  # a transformers without renaming rules renames nothing
        return ours
    prefix = getattr(model, "base_model_prefix", None)
    # Only the names matter for deciding a prefix, so the state dict's keys are enough.
    names = dict.fromkeys(model.state_dict(keep_vars=True))
    return lambda key: ours(rename_source_key(key, renamings, [], prefix, names)[0])


def empty_model(path: Path, dtype: torch.dtype, trust_remote_code: bool = False, config=None,
                unfuse: bool = True) -> nn.Module:
    """The model of ``path``'s config with every parameter on the meta device (no memory) and its
    computed buffers (rotary frequencies, position ids) real; tied weights tied; with ``unfuse`` one
    linear layer per mixture-of-experts expert (compress.moe)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from compress.models import auto_class, quiet_transformers

    config = config or AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False), quiet_transformers():
        model = auto_class(config).from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    if unfuse:
        unfuse_experts(model)  # one layer per expert, as checkpoints store them
    model.eval()
    return model


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """id(tensor) -> every (module, attribute, full name) holding it: tied weights have several."""
    owners: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, tensor in list(module._parameters.items()) + [
                (b, t) for b, t in module._buffers.items() if b not in module._non_persistent_buffers_set]:
            if tensor is not None:
                full = f"{module_name}.{attr}" if module_name else attr
                entry = owners.setdefault(id(tensor), [])
                if all(full != f for _, _, f in entry):
                    entry.append((module, attr, full))
    return owners


@dataclass
class Materialized:
    names: list[str]
    """Memory names of the tensors that were read."""
    bytes_read: int


class LazyModel:
    """A model whose tensors live in its checkpoint until asked for."""

    def __init__(self, path: Path, dtype: torch.dtype, trust_remote_code: bool = False, model: nn.Module | None = None,
                 reader: ShardReader | None = None, requires_grad: bool = False, unfuse: bool = True) -> None:
        self.path = Path(path)
        self.dtype = dtype
        """The compute dtype the skeleton is built in; each float tensor is read into the dtype its module
        declares for it (this one, except where a module fixes its own, as packed layers' fp16 scales)."""
        self.reader = reader or ShardReader(self.path)
        self.model = model if model is not None else empty_model(self.path, dtype, trust_remote_code, unfuse=unfuse)
        self.names = NameMap(self.model, self.reader.keys())
        self.requires_grad = requires_grad
        """Materialised parameters are trainable (as from_pretrained makes them) or not (changing runs)."""

    def covers_checkpoint(self) -> bool:
        """Every tensor the model holds is stored in the checkpoint (directly or through a tied one)."""
        def on_meta(holders) -> bool:
            module, attr, _ = holders[0]
            return getattr(module, attr).is_meta

        return all(any(full in self.names.to_disk for _, _, full in holders)
                   for holders in _owners(self.model).values() if on_meta(holders))

    def disk_dtype(self, memory_key: str) -> torch.dtype | None:
        """The dtype a tensor is stored in (None when the source does not hold it)."""
        disk = self.names.disk_name(memory_key)
        return self.reader.dtype_of(disk) if disk in self.reader else None

    def disk_key(self, memory_name: str) -> str:
        """The stored name of a model tensor (through any tensor it is tied to)."""
        if memory_name in self.names.to_disk:
            return self.names.to_disk[memory_name]
        for holders in _owners(self.model).values():
            fulls = [f for _, _, f in holders]
            if memory_name in fulls:
                found = next((self.names.to_disk[f] for f in fulls if f in self.names.to_disk), None)
                if found is not None:
                    return found
        raise UserError(f"{self.path} lacks the weight {self.names.disk_name(memory_name)}: re-create or "
                        "re-download the checkpoint")

    def read(self, memory_name: str) -> torch.Tensor:
        """One model tensor as stored, without touching the model."""
        return self.reader.read(self.disk_key(memory_name))

    def materialize(self, module: nn.Module, prefix: str, device: torch.device | str = "cpu") -> Materialized:
        """Read every tensor of ``module`` (named ``prefix`` in the model) that is still on meta."""
        return self.materialize_names([name for name, _ in _persistent_tensors(module, prefix)], device)

    def materialize_names(self, names: list[str], device: torch.device | str = "cpu") -> Materialized:
        """Read the tensors of the model named ``names`` (memory names) that are still on meta; a tied
        tensor is read once and set everywhere it is used."""
        device = torch.device(device)
        owners = _owners(self.model)
        by_name = {full: (key, holders) for key, holders in owners.items() for _, _, full in holders}
        done, read = [], 0
        for name in names:
            key, holders = by_name[name]
            tensor = getattr(holders[0][0], holders[0][1])
            if not tensor.is_meta:
                continue
            disk = next((self.names.to_disk[f] for _, _, f in holders if f in self.names.to_disk), None)
            if disk is None:
                raise UserError(f"{self.path} lacks the weight {self.names.disk_name(name)}: re-create or "
                                "re-download the checkpoint")
            value = self.reader.read(disk)
            read += value.numel() * value.element_size()
            if tuple(value.shape) != tuple(tensor.shape):
                raise UserError(f"{self.path}: {disk} has shape {tuple(value.shape)}, the config implies "
                                f"{tuple(tensor.shape)}: the checkpoint does not match its config.json")
            if value.is_floating_point() and tensor.is_floating_point():
                value = value.to(tensor.dtype)  # the dtype the module declares (the compute dtype, fp16 scales)
            value = value.to(device)
            # One object, so tied weights stay tied.
            param = nn.Parameter(value, requires_grad=self.requires_grad and value.is_floating_point())
            for owner, attr, _ in holders:
                if attr in owner._parameters:
                    owner._parameters[attr] = param
                else:
                    owner._buffers[attr] = value
            done.append(name)
        return Materialized(done, read)

    def materialize_all(self, device: torch.device | str = "cpu") -> Materialized:
        return self.materialize(self.model, "", device)

    def release_names(self, names: list[str]) -> None:
        """Give the named tensors back (to meta), wherever they are used."""
        owners = _owners(self.model)
        by_name = {full: holders for holders in owners.values() for _, _, full in holders}
        replacements: dict = {}
        for name in names:
            for owner, attr, _ in by_name.get(name, []):
                _to_meta(owner, attr, replacements)


def _persistent_tensors(module: nn.Module, prefix: str):
    for name, param in module.named_parameters(prefix=prefix, remove_duplicate=False):
        yield name, param
    for sub_name, sub in module.named_modules(prefix=prefix):
        for attr, buffer in sub._buffers.items():
            if buffer is not None and attr not in sub._non_persistent_buffers_set:
                yield f"{sub_name}.{attr}" if sub_name else attr, buffer


def _to_meta(owner: nn.Module, attr: str, replacements: dict | None = None) -> None:
    """Put ``owner.attr`` on meta; ``replacements`` maps id(old) -> new, so tied weights stay one object."""
    replacements = {} if replacements is None else replacements
    if attr in owner._parameters:
        param = owner._parameters[attr]
        if param is not None and not param.is_meta:
            if id(param) not in replacements:
                replacements[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
            owner._parameters[attr] = replacements[id(param)]
    else:
        buffer = owner._buffers.get(attr)
        if buffer is not None and not buffer.is_meta:
            owner._buffers[attr] = torch.empty_like(buffer, device="meta")


def release(module: nn.Module) -> None:
    """Give a module's parameters and persistent buffers back (to meta); computed buffers stay."""
    replacements: dict = {}
    for sub in module.modules():
        for attr in list(sub._parameters):
            _to_meta(sub, attr, replacements)
        for attr in [a for a in sub._buffers if a not in sub._non_persistent_buffers_set]:
            _to_meta(sub, attr, replacements)
