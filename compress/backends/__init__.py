"""Backends: what runs a model once it is made, and which kernel that really is.

A backend loads one checkpoint format (dense, gptq, bitsandbytes, ...) on some devices and returns a
LoadedModel whose ``kernel`` names the code that computes its layers. ``choose_backend`` picks one:
``auto`` takes the first of the format's preference list that can run the checkpoint on the device;
a backend asked for by name that cannot is an error, never a silent switch to another.
Built-ins register on import; each lives in its own module.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import ClassVar

import torch

from compress.errors import UserError

_BUILTIN_MODULES = ("compress.backends.reference", "compress.backends.torch_backend",
                    "compress.backends.gptqmodel_backend", "compress.backends.bnb",
                    "compress.backends.onnxruntime_backend", "compress.backends.llamacpp_backend",
                    "compress.backends.vllm_backend")

BACKENDS: dict[str, "Backend"] = {}
AUTO_ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    # format -> device type -> backends tried in order by `auto`
    "dense": {"cpu": ("dense",), "cuda": ("dense",)},
    "gptq": {"cpu": ("torch", "dequant"), "cuda": ("gptqmodel", "dequant")},
    "compressed-tensors": {"cpu": ("torch", "dequant"), "cuda": ("dequant",)},
    "bitsandbytes": {"cpu": ("bitsandbytes",), "cuda": ("bitsandbytes",)},
    "onnx": {"cpu": ("onnxruntime",), "cuda": ()},
    "gguf": {"cpu": ("llamacpp",), "cuda": ()},
}
_loaded = False


class Backend:
    name: ClassVar[str]
    summary: ClassVar[str]
    formats: ClassVar[tuple[str, ...]]
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    requires: ClassVar[str | None] = None
    """Module that must be importable."""
    extra: ClassVar[str | None] = None
    """The package extra that installs it."""
    runs_itself: ClassVar[bool] = False
    """It loads and runs the checkpoint in a process of its own (vLLM): the benchmark hands it the windows."""

    @property
    def install_hint(self) -> str:
        """How to make it available."""
        return f"pip install 'compress-workbench[{self.extra}]'"

    def available(self) -> bool:
        return self.requires is None or importlib.util.find_spec(self.requires) is not None

    def preferred_dtype(self, qcfg: dict | None, device: torch.device) -> torch.dtype | None:
        """The compute dtype ``--dtype auto`` means here (None: the benchmark's usual choice)."""
        return None

    def unsupported(self, qcfg: dict | None, device: torch.device, dtype: torch.dtype | None) -> str | None:
        """Why this backend cannot run a checkpoint with this quantization_config here, in ``dtype``
        (None: the dtype was left to the backend); None when it can."""
        return None

    def load(self, resolved, qcfg: dict | None, dtype: torch.dtype, device: torch.device,
             trust_remote_code: bool):  # pragma: no cover - every backend overrides it
        raise NotImplementedError


class Float32Runtime(Backend):
    """A runtime of its own (ONNX Runtime, llama.cpp) that takes and returns float32 activations: auto means
    float32, and any other dtype asked for is refused with ``float32_only``'s reason."""

    float32_only: ClassVar[str]

    def preferred_dtype(self, qcfg, device):
        return torch.float32

    def unsupported(self, qcfg, device, dtype):
        if dtype is not None and dtype != torch.float32:
            return f"{self.float32_only} (--dtype float32 or auto)"
        return None


class HeadShape:
    """What the benchmark asks of a model's output head when another runtime (ONNX Runtime, llama.cpp) computes
    it: its width, the vocabulary."""

    def __init__(self, vocab: int) -> None:
        self.out_features = vocab


def register_backend(cls: type) -> type:
    BACKENDS[cls.name] = cls()
    return cls


def available_backends() -> dict[str, Backend]:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
    return dict(BACKENDS)


def checkpoint_format(qcfg: dict | None, onnx: bool = False, gguf: bool = False) -> str:
    if gguf:
        return "gguf"
    if onnx:
        return "onnx"
    if qcfg is None:
        return "dense"
    method = qcfg.get("quant_method")
    if method not in AUTO_ORDER:
        raise UserError(f"checkpoints quantized with {method!r} have no backend here; the benchmark reads dense, "
                        "compressed-tensors (pack-quantized), GPTQ-format and bitsandbytes checkpoints, `compress "
                        "export-onnx` folders and GGUF files")
    return method


def choose_backend(name: str, qcfg: dict | None, device: torch.device,
                   dtype: torch.dtype | None = None, onnx: bool = False, gguf: bool = False
                   ) -> tuple[Backend, list[str]]:
    """(backend, why each faster candidate was passed over by ``auto``)."""
    backends = available_backends()
    fmt = checkpoint_format(qcfg, onnx, gguf)
    if name == "auto":
        reasons = []
        if not AUTO_ORDER[fmt][device.type]:
            others = [d for d, names in AUTO_ORDER[fmt].items() if names]
            raise UserError(f"no backend here runs {fmt} models on {device.type}: use --device {' or '.join(others)}")
        for candidate in AUTO_ORDER[fmt][device.type]:
            backend = backends[candidate]
            why = None if backend.available() else f"needs {backend.requires or backend.name}: {backend.install_hint}"
            why = why or backend.unsupported(qcfg, device, dtype)
            if why is None:
                return backend, reasons
            reasons.append(f"{candidate}: {why}")
        raise UserError(f"no backend runs this {fmt} checkpoint on {device.type} ({'; '.join(reasons)})")
    if name not in backends:
        raise UserError(f"unknown backend '{name}': choose auto or one of {', '.join(sorted(backends))}")
    backend = backends[name]
    if fmt not in backend.formats:
        raise UserError(f"backend '{name}' runs {', '.join(backend.formats)} models, not a {fmt} one: use "
                        f"--backend auto or one of {', '.join(AUTO_ORDER[fmt][device.type])}")
    if device.type not in backend.devices:
        raise UserError(f"backend '{name}' does not run on {device.type}: use --backend auto or one of "
                        f"{', '.join(AUTO_ORDER[fmt][device.type])}")
    if not backend.available():
        raise UserError(f"backend '{name}' needs {backend.requires or name}: {backend.install_hint}")
    why = backend.unsupported(qcfg, device, dtype)
    if why:
        raise UserError(f"backend '{name}' cannot run this checkpoint: {why}")
    return backend, []
