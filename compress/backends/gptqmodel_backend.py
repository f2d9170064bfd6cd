"""GPTQModel's own loader and kernels for GPTQ-format checkpoints: on CUDA its Marlin/ExLlama/Triton
kernels, on the CPU its torch kernels. The kernel it picked is read off the loaded layers."""

from __future__ import annotations

import os


from compress.backends import Backend, register_backend
from compress.backends.reference import dtype_name, gptq_summary


@register_backend
class GPTQModelKernels(Backend):
    name = "gptqmodel"
    summary = "GPTQModel.load: its automatically selected QuantLinear kernel"
    formats = ("gptq",)
    requires = "gptqmodel"
    extra = "gptqmodel"

    def load(self, resolved, qcfg, dtype, device, trust_remote_code):
        from transformers import AutoTokenizer

        from compress.bench.load import LoadedModel
        from compress.checkpoint import read_manifest

        # As for GPTQModel quantization: no more workers than cores, no C++ extension build.
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(2, os.cpu_count() or 1)))
        os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
        from gptqmodel import GPTQModel

        from compress.errors import UserError

        try:
            wrapped = GPTQModel.load(str(resolved.path), device=device.type, dtype=dtype,
                                     trust_remote_code=trust_remote_code)
        except (NotImplementedError, RuntimeError, ValueError) as exc:  # its kernels' limits, e.g. bits per kernel
            raise UserError(f"GPTQModel cannot run {resolved.path.name} on {device.type}: "
                            f"{str(exc).strip().splitlines()[0]}; use --backend dequant or torch")
        model = wrapped.model
        kernels = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=trust_remote_code)
        return LoadedModel(model, tokenizer, resolved, dtype, gptq_summary(qcfg, read_manifest(resolved.path) or {}),
                           f"GPTQModel {' + '.join(kernels)} ({dtype_name(dtype)})", float(qcfg["bits"]),
                           backend=self.name)
