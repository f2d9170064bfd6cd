"""bitsandbytes checkpoints (LLM.int8(), NF4, FP4) run by bitsandbytes' own layers through transformers,
on the CPU or CUDA. The kernel named is the bnb layer class with its quant type and compute dtype."""

from __future__ import annotations

import torch

from compress.backends import Backend, register_backend
from compress.backends.reference import dtype_name


def bnb_summary(qcfg: dict) -> dict:
    if qcfg.get("load_in_8bit"):
        return {"bits": 8, "group_size": -1, "sym": True, "method": "bitsandbytes LLM.int8()",
                "threshold": qcfg.get("llm_int8_threshold")}
    return {"bits": 4, "group_size": qcfg.get("bnb_4bit_blocksize", 64), "sym": True,
            "method": f"bitsandbytes {qcfg.get('bnb_4bit_quant_type', 'nf4').upper()}",
            "double_quant": qcfg.get("bnb_4bit_use_double_quant")}


@register_backend
class BitsAndBytes(Backend):
    name = "bitsandbytes"
    summary = "bitsandbytes' Linear8bitLt / Linear4bit through transformers"
    formats = ("bitsandbytes",)
    requires = "bitsandbytes"
    extra = "bnb"

    def preferred_dtype(self, qcfg, device):
        """The 4-bit layers' compute dtype as saved; LLM.int8() computes in float16."""
        if qcfg.get("load_in_8bit"):
            return torch.float16
        return getattr(torch, str(qcfg.get("bnb_4bit_compute_dtype", "bfloat16")).removeprefix("torch."))

    def load(self, resolved, qcfg, dtype, device, trust_remote_code):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from compress.bench.load import LoadedModel
        from compress.models import quiet_transformers

        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype, device_map=device.type,
                                                         trust_remote_code=trust_remote_code, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=trust_remote_code)
        layers = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("bitsandbytes")})
        summary = bnb_summary(qcfg)
        return LoadedModel(model, tokenizer, resolved, dtype, summary,
                           f"bitsandbytes {' + '.join(layers)} ({summary['method'].split()[-1]}, compute "
                           f"{dtype_name(dtype)})", float(summary["bits"]), backend=self.name)
