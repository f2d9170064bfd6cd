"""Memory figures: bytes of the weights in memory, of the KV cache, and the process's peak.

Every figure is a byte count of real tensors or of the process, never an estimate from a parameter
count: a quantized layer's packed buffers count as what they are, and tied weights count once.
"""

from __future__ import annotations

import torch


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds, looking inside tensor subclasses (torchao keeps int8 data + scales)."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def _storage_key(tensor: torch.Tensor):
    try:
        return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
    except (RuntimeError, NotImplementedError):  # subclasses without a plain storage
        return id(tensor)


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Parameters and persistent buffers, each shared tensor once (a tied LM head is the embedding); a
    model run by another runtime (ONNX Runtime) reports its own weight bytes."""
    if hasattr(model, "weight_bytes"):
        return int(model.weight_bytes())
    seen: set = set()
    total = 0
    for module in model.modules():
        tensors = list(module.named_parameters(recurse=False)) + [
            (name, buf) for name, buf in module.named_buffers(recurse=False)
            if name not in module._non_persistent_buffers_set]
        for _, tensor in tensors:
            key = _storage_key(tensor)
            if key in seen:
                continue
            seen.add(key)
            total += tensor_bytes(tensor)
    return total


def runtime_cache_bytes(model: torch.nn.Module) -> int:
    """Extra bytes modules keep beside their weights at run time (QuantLinear's unpacked codes)."""
    return sum(int(m.runtime_bytes()) for m in model.modules() if hasattr(m, "runtime_bytes"))


def parameter_count(model: torch.nn.Module) -> int:
    """Logical weights (a packed 4-bit layer still counts in_features x out_features), tied once; a model run
    by another runtime (llama.cpp) counts its own."""
    if hasattr(model, "parameter_count"):
        return int(model.parameter_count())
    seen: set = set()
    total = 0
    for module in model.modules():
        logical = getattr(module, "logical_weight_count", None)
        if logical is not None:
            total += logical() + sum(p.numel() for p in module.parameters(recurse=False))
            continue
        for param in module.parameters(recurse=False):
            key = _storage_key(param)
            if key not in seen:
                seen.add(key)
                total += param.numel()
    return total


def kv_cache_bytes(cache) -> int:
    """Bytes of every tensor a transformers cache holds (DynamicCache layers, or legacy tuples)."""
    if cache is None:
        return 0
    if hasattr(cache, "bytes_held"):  # a runtime that keeps the cache itself (llama.cpp) says what it holds
        return int(cache.bytes_held())
    if isinstance(cache, torch.Tensor):
        return tensor_bytes(cache)
    if isinstance(cache, (tuple, list)):
        return sum(kv_cache_bytes(item) for item in cache)
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return sum(kv_cache_bytes(getattr(layer, name, None)) for layer in layers for name in ("keys", "values"))
    if hasattr(cache, "key_cache"):
        return kv_cache_bytes(cache.key_cache) + kv_cache_bytes(cache.value_cache)
    raise TypeError(f"cannot count the bytes of a {type(cache).__name__} cache")


# --- process peak --------------------------------------------------------------------------------


def reset_peak(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator counter, or Linux's VmHWM (writing 5 to clear_refs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not permitted: the peak then counts from process start
        pass


def peak_bytes(device: torch.device) -> int:
    """Peak allocated GPU memory on CUDA; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    from compress.runtime import peak_rss_bytes

    return peak_rss_bytes()


def peak_kind(device: torch.device) -> str:
    return "peak allocated (torch CUDA allocator)" if device.type == "cuda" else "peak RSS of the process (VmHWM)"
