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
import tempfile
import time
from pathlib import Path

import torch

from compress.bench.agreement import Reference, kl_known, rest_mass
from compress.bench.perplexity import perplexity_from_nll
from compress.bench.result import AgreementResult, ServingResult
from compress.errors import UserError

VLLM_TOP_K = 64
"""Log-probabilities vLLM returns per position for KL (its own most likely tokens, plus the window's own)."""
SERVING_CLIENTS = (1, 4, 16)
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

    version = subprocess.run([str(python), "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
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
