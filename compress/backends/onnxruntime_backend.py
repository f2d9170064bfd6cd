"""ONNX Runtime for folders written by `compress export-onnx`: the CPU execution provider, with the
node kinds the graph really holds (MatMulNBits, MatMulInteger, float MatMul) named as its kernel."""

from __future__ import annotations

import torch

from compress.backends import Float32Runtime, register_backend
from compress.formats import packed_settings


@register_backend
class OnnxRuntime(Float32Runtime):
    name = "onnxruntime"
    summary = "onnxruntime CPUExecutionProvider on an exported decoder with its KV cache"
    formats = ("onnx",)
    devices = ("cpu",)
    requires = "onnxruntime"
    extra = "onnx"
    float32_only = "the exported graph computes in float32"

    def load(self, resolved, qcfg, dtype, device, trust_remote_code):
        from transformers import AutoConfig, AutoTokenizer

        from compress.bench.load import LoadedModel
        from compress.checkpoint import read_manifest
        from compress.ort.runtime import OrtCausalLM

        manifest = read_manifest(resolved.path) or {}
        config = AutoConfig.from_pretrained(resolved.path)
        if "cache" not in manifest:
            from compress.errors import UserError

            raise UserError(f"{resolved.path} was not written by `compress export-onnx` (no cache shape in "
                            "compress_manifest.json): export it with compress export-onnx")
        model = OrtCausalLM(resolved.path, config, manifest["cache"], torch.get_num_threads())
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        nodes = manifest.get("nodes") or {}
        weights = manifest.get("weights", "float")
        # Whichever format the packed source was written in (compressed-tensors keeps its bits in config groups).
        source = packed_settings((manifest.get("source") or {}).get("quantization_config") or {})
        bits = {"int8": 8.0, "packed": float(source.bits if source else 4)}.get(weights, 32.0)
        described = ", ".join(f"{k} x{v}" for k, v in sorted(nodes.items())) or "float MatMul"
        if manifest.get("accuracy_level") is not None:
            described += f" (accuracy_level {manifest['accuracy_level']}" + \
                (": int8 activations per block)" if manifest["accuracy_level"] == 4 else ")")
        int8 = manifest.get("int8") or {}
        if weights == "int8":
            described += f"; {int8.get('weights', 'int8')} per-channel weights x uint8 per-tensor activations"
        quantization = None if weights == "float" else {
            "bits": int(bits), "group_size": -1 if weights == "int8" else source and source.group_size,
            # Files written before the uint8 (no-saturation) format held symmetric int8 weights.
            "sym": int8.get("weights", "int8") == "int8" if weights == "int8" else source and source.sym,
            "method": "onnxruntime dynamic INT8" if weights == "int8" else
            f"{(source and source.method) or 'gptq'} codes in MatMulNBits"}
        return LoadedModel(model, tokenizer, resolved, torch.float32, quantization,
                           f"onnxruntime {model.session.get_providers()[0]}: {described}; activations float32",
                           bits, backend=self.name,
                           threads={"onnxruntime_intra_op": model.threads, "onnxruntime_inter_op": 1})
