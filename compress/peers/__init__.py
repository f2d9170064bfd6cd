"""Peers' schemes as rows beside ours: in-memory transforms applied at benchmark load, and peer
quantizers that write a checkpoint. Each names the extra that installs it."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

from compress.errors import UserError


@dataclass(frozen=True)
class Transform:
    name: str
    module: str
    """The import that must succeed for the transform to run."""
    extra: str
    apply: Callable
    description: str

    def available(self) -> bool:
        return importlib.util.find_spec(self.module) is not None


def _torchao_int8_weight_only(loaded) -> None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    if loaded.quantization is not None:
        raise UserError("the torchao-int8wo transform applies to a dense model, not to a quantized checkpoint")
    quantize_(loaded.model, Int8WeightOnlyConfig())
    loaded.quantization = {"bits": 8, "group_size": -1, "sym": True, "method": "torchao Int8WeightOnlyConfig"}
    loaded.weight_bits = 8.0
    loaded.kernel = f"torchao int8 weight-only (AffineQuantizedTensor, activations {str(loaded.dtype)[6:]})"
    loaded.notes.append("embeddings stay in the load dtype; torchao's in-memory tensors are counted by their "
                        "inner int8 data and scales")


TRANSFORMS: dict[str, Transform] = {t.name: t for t in [
    Transform("torchao-int8wo", "torchao", "torchao", _torchao_int8_weight_only,
              "torchao Int8WeightOnlyConfig on every nn.Linear"),
]}


def get_transform(name: str) -> Transform:
    if name not in TRANSFORMS:
        raise UserError(f"unknown transform '{name}': choose one of {', '.join(TRANSFORMS)}")
    transform = TRANSFORMS[name]
    if not transform.available():
        raise UserError(f"transform '{name}' needs {transform.module}: pip install 'compress-workbench[{transform.extra}]'")
    return transform
