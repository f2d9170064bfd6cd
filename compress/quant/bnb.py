"""bitsandbytes as a quantization method: LLM.int8() (8 bits, fp16 outlier columns above a threshold)
or 4-bit NF4/FP4 blocks of 64, applied by transformers' ``BitsAndBytesConfig`` at load and saved with
the standard ``quantization_config`` (quant_method bitsandbytes), so ``from_pretrained`` reloads it.

Data-free, so there is no calibration step. Double quantization (the block scales themselves
quantized) is on by default: measured here, a 4-bit checkpoint saved and reloaded on the CPU without
it does not give back the same weights.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from compress.errors import UserError
from compress.quant.config import BnbConfig
from compress.registry import QuantMethod, register_method


@register_method
class BitsAndBytesMethod(QuantMethod):
    name = "bnb"
    config_cls = BnbConfig
    needs_calibration = False
    writes_own_checkpoint = True
    summary = "bitsandbytes LLM.int8() or NF4/FP4, saved with its standard quantization_config"

    def quantize_checkpoint(self, request, cfg: BnbConfig):
        """load -> quantize (transformers + bitsandbytes) -> save atomically; a QuantizeResult."""
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("the bnb method needs bitsandbytes: pip install 'compress-workbench[bnb]'")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from compress import __version__
        from compress.fingerprint import source_hash
        from compress.quant.run import QuantizeResult
        from compress.checkpoint import MANIFEST_NAME
        from compress.output import atomic_folder, refuse_existing, refuse_output_of_source, refuse_source_overlap
        from compress.models import check_checkpoint, is_causal_lm, quiet_transformers, resolve, weight_bytes_on_disk
        from compress.runtime import environment, peak_rss_bytes, resolve_device

        device = resolve_device(request.device)
        out = request.output_folder(cfg.tag)
        refuse_output_of_source(out, request.model)
        refuse_existing(out, request.force)
        started = time.perf_counter()
        resolved = resolve(request.model, request.trust_remote_code)
        refuse_source_overlap(out, resolved.path)
        check_checkpoint(resolved.path, request.trust_remote_code)
        from compress.models import refuse_quantized_source, source_license
        from compress.shards import ShardReader

        refuse_quantized_source(request.model, ShardReader(resolved.path))
        from transformers import AutoConfig

        if not is_causal_lm(AutoConfig.from_pretrained(resolved.path, trust_remote_code=request.trust_remote_code)):
            raise UserError(f"{request.model} is not a causal language model: the bnb method writes causal LMs")
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                resolved.path, quantization_config=cfg.transformers_config(), dtype=getattr(torch, cfg.compute_dtype),
                device_map=device.type, trust_remote_code=request.trust_remote_code, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=request.trust_remote_code)
        quant_seconds = time.perf_counter() - started
        layers = [name for name, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes")]
        manifest = {
            "tool": "compress-workbench", "version": __version__, "method": self.name,
            "config": dataclasses.asdict(cfg),
            "source": {"reference": request.model, "path": str(resolved.path), "origin": resolved.origin,
                       "license": source_license(resolved), "sha256_safetensors": source_hash(resolved.path),
                       "bytes": weight_bytes_on_disk(resolved.path)},
            "calibration": None, "quantized_layers": len(layers), "device": str(device),
            "timings_s": {"quantize": round(quant_seconds, 3)}, "peak_rss_bytes": peak_rss_bytes(),
            "environment": environment(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        import json

        from compress.models import quiet_transformers

        with atomic_folder(out, force=request.force, source=resolved.path) as tmp, quiet_transformers():
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        return QuantizeResult(Path(out), manifest["source"]["bytes"], weight_bytes_on_disk(out),
                              time.perf_counter() - started, peak_rss_bytes(), manifest, model)
