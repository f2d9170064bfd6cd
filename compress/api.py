"""The Python API: ``quantize(QuantizeRequest)`` does load -> calibrate -> quantize -> save.

The CLI is a thin layer over this; tests and benchmarks call it directly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compress import __version__
from compress.checkpoint import gptq_quantization_config, save_quantized
from compress.data import calibration_windows, load_calibration_text, tokenize
from compress.errors import UserError
from compress.fsutil import refuse_existing
from compress.models import load_model, resolve, weight_bytes_on_disk
from compress.quant.apply import quantize_model
from compress.registry import get_method
from compress.runtime import environment, peak_rss_bytes, resolve_device
from compress.select import ModuleSelection


@dataclass
class QuantizeRequest:
    model: str = "smollm2-135m"
    """Alias (see `compress models`) or a local model folder."""
    method: str = "gptq"
    """Quantization method: gptq or rtn (or a plugin's name)."""
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = True
    """GPTQ: quantize columns by decreasing Hessian diagonal (desc_act). On by default, as in auto-gptq:
    measured on SmolLM2 with out-of-domain calibration text it decides whether GPTQ beats RTN at W4."""
    static_groups: bool = False
    damp_percent: float = 0.01
    calib: str = "auto"
    """Calibration text: NAME[:SPLIT] (wikitext2, c4, sst2), a file, or auto."""
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    """Output folder; default out/<model>-<method>-<tag>."""
    force: bool = False
    trust_remote_code: bool = False
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    progress: bool = True

    def method_config(self):
        method = get_method(self.method)
        names = {f.name for f in dataclasses.fields(method.config_cls)}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k in names}
        return method, method.config_cls(**values)


@dataclass
class QuantizeResult:
    folder: Path
    source_bytes: int
    output_bytes: int
    seconds: float
    peak_rss_bytes: int
    manifest: dict
    model: object = field(default=None, repr=False)
    """The quantized model still in memory (on the CPU), for callers that measure it next."""


def default_output(request: QuantizeRequest, tag: str) -> Path:
    stem = Path(request.model).name if Path(request.model).is_dir() else request.model
    return Path("out") / f"{stem}-{request.method}-{tag}"


def source_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def quantize(request: QuantizeRequest) -> QuantizeResult:
    method, cfg = request.method_config()
    device = resolve_device(request.device)
    out = Path(request.out) if request.out else default_output(request, cfg.tag)
    refuse_existing(out, request.force)  # fail before the slow part, and again at the rename
    if request.nsamples <= 0 or request.seqlen <= 0:
        raise UserError(f"--nsamples ({request.nsamples}) and --seqlen ({request.seqlen}) must be positive")

    started = time.perf_counter()
    # Everything the user could have got wrong is checked before the slow part starts.
    resolved = resolve(request.model, request.trust_remote_code)
    text, text_record = load_calibration_text(request.calib) if method.needs_calibration else (None, None)
    model, tokenizer = load_model(resolved.path, torch.float32 if device.type == "cpu" else torch.float16,
                                  request.trust_remote_code)
    load_seconds = time.perf_counter() - started

    windows, calib_record = None, None
    if method.needs_calibration:
        seqlen = min(request.seqlen, getattr(model.config, "max_position_embeddings", None) or request.seqlen)
        windows, calib_record = calibration_windows(tokenize(tokenizer, text), text_record, request.nsamples, seqlen,
                                                    request.seed)
        _say(request, f"calibration: {calib_record.count} x {seqlen} tokens from {text_record.source}:"
                      f"{text_record.split} ({text_record.origin}), seed {request.seed}")

    quant_started = time.perf_counter()
    stats = quantize_model(model, method, cfg, windows, device,
                           ModuleSelection(list(request.include), list(request.exclude)), request.progress)
    quant_seconds = time.perf_counter() - quant_started

    manifest = {
        "tool": "compress-workbench",
        "method": method.name,
        "config": dataclasses.asdict(cfg),
        "source": {"reference": request.model, "path": str(resolved.path), "origin": resolved.origin,
                   "sha256_safetensors": source_hash(resolved.path),
                   "bytes": weight_bytes_on_disk(resolved.path)},
        "calibration": calib_record.to_dict() if calib_record else None,
        "selection": {"include": request.include, "exclude": request.exclude},
        "layers": [dataclasses.asdict(layer) for layer in stats.layers],
        "device": str(device),
        "timings_s": {"load": round(load_seconds, 3), "quantize": round(quant_seconds, 3)},
        "peak_rss_bytes": peak_rss_bytes(),
        "environment": environment(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    model = model.to("cpu")
    save_quantized(model, tokenizer, out,
                   gptq_quantization_config(cfg, method.name, __version__, stats.block_prefix,
                                            [layer.shape[1] for layer in stats.layers]), manifest, request.force)
    return QuantizeResult(out, manifest["source"]["bytes"], weight_bytes_on_disk(out),
                          time.perf_counter() - started, peak_rss_bytes(), manifest, model)


def _say(request: QuantizeRequest, message: str) -> None:
    if request.progress:
        print(message, file=sys.stderr)
