"""``--backend vllm``: vLLM's CPU build, in an environment and processes of its own (`compress setup vllm`). It loads
the checkpoint itself, so the benchmark hands it the evaluation windows instead of loading a model here
(compress/bench/vllm_bench.py)."""

from __future__ import annotations

import torch

from compress.backends import Backend, register_backend
from compress.backends.reference import dtype_name
from compress.errors import UserError


@register_backend
class Vllm(Backend):
    name = "vllm"
    summary = ("vLLM's CPU build in its own environment (`compress setup vllm`): its kernels score the windows and its "
               "OpenAI server is timed under concurrent clients")
    formats = ("dense", "compressed-tensors", "gptq")
    devices = ("cpu",)
    runs_itself = True
    install_hint = "run `compress setup vllm` once (or point COMPRESS_VLLM_PYTHON at a python that imports vllm)"

    def available(self) -> bool:
        from compress.backends.vllm_env import vllm_python

        return vllm_python() is not None

    def preferred_dtype(self, qcfg, device):
        return torch.bfloat16

    def unsupported(self, qcfg, device, dtype):
        if qcfg is not None and dtype is not None and dtype not in (torch.bfloat16, torch.float16):
            return (f"vLLM's CPU kernels for quantized weights compute in bfloat16 or float16, not "
                    f"{dtype_name(dtype)}: use --dtype bfloat16 or auto")
        return None

    def load(self, resolved, qcfg, dtype, device, trust_remote_code):
        raise UserError("--backend vllm runs the model in vLLM's own process: `compress bench` measures it there "
                        "(perplexity, KL, serving); other commands need a backend that loads the model here")
