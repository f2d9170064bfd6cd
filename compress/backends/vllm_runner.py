"""Runs in vLLM's own environment (compress/backends/vllm_env.py), never imported by compress: it takes a JSON
request and writes a JSON result, so that nothing of ours has to import beside vLLM's pinned packages.

    python vllm_runner.py REQUEST.json RESULT.json

Request: {"jobs": [{"model": folder, "dtype": "bfloat16", "max_model_len": 512, "prompts": [[token ids], ...],
"top_k": 20, "env": {vLLM's environment settings for this job}}, ...]}: the models are loaded one after another in this one process (vLLM's engine and its worker
in-process: a second process costs each model about 15 s of imports on 2 cores). Result: per job, its
"prompt_logprobs" (per prompt, per position, the first having none: {token id: log probability} for the prompt's
own token and the top_k most likely ones), "kernels" (what computes its quantized linear layers, read from the loaded model),
"quantization" (its quantization method), "parameters" (elements of its parameters as vLLM holds them), "load_s" and
"score_s"; and "peak_rss_bytes" (this process's VmHWM, every job's). vLLM's log goes to RESULT.json.log.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

def linear_kernels(model) -> set[str]:
    """What computes the model's quantized linear layers: "KERNEL (SCHEME)" (e.g. CPUWNA16LinearKernel
    (CompressedTensorsWNA16)), or the quantization method's class where it names no kernel; "+ int8 activations"
    where a 4-bit layer quantizes its input too (vLLM's W4A8 path on AMX CPUs, VLLM_CPU_INT4_W4A8=1)."""
    found = set()
    for module in model.modules():
        method = getattr(module, "scheme", None) or getattr(module, "quant_method", None)
        if method is None or type(method).__name__.startswith("Unquantized"):
            continue
        kernel = getattr(method, "kernel", None) or getattr(method, "fp8_linear", None)
        name = f"{type(kernel).__name__} ({type(method).__name__})" if kernel is not None else type(method).__name__
        found.add(name + (" + int8 activations" if getattr(module, "use_w4a8", False) else ""))
    return found


def run_job(job: dict) -> dict:
    from vllm import LLM, SamplingParams

    saved = {key: os.environ.get(key) for key in job.get("env", {})}
    os.environ.update(job.get("env", {}))
    started = time.perf_counter()
    llm = LLM(model=job["model"], dtype=job.get("dtype", "bfloat16"), enforce_eager=True,
              max_model_len=job.get("max_model_len", 512), seed=0, distributed_executor_backend="uni",
              max_logprobs=max(20, job.get("top_k", 20)))
    loaded = time.perf_counter()
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=job.get("top_k", 20))
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in job["prompts"]], params, use_tqdm=False)
    scored = time.perf_counter()
    logprobs = [[{str(token): entry.logprob for token, entry in (position or {}).items()}
                 for position in output.prompt_logprobs] for output in outputs]
    quantization = llm.llm_engine.vllm_config.model_config.quantization
    kernels = sorted(set().union(*llm.apply_model(linear_kernels)))
    parameters = sum(llm.apply_model(lambda model: sum(p.numel() for p in model.parameters())))
    del llm
    gc.collect()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    return {"prompt_logprobs": logprobs, "kernels": kernels, "quantization": quantization, "parameters": parameters,
            "load_s": round(loaded - started, 3), "score_s": round(scored - loaded, 3)}


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def main(request_path: str, result_path: str) -> int:
    log_path = result_path + ".log"
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: no hub look-ups to wait on
    # On AMX CPUs vLLM runs 4-bit layers with int8 activations unless told not to: the checkpoint says 16-bit ones
    # (SmolLM2's default W4 scored 5% worse perplexity that way). A job may ask for it ("env").
    os.environ.setdefault("VLLM_CPU_INT4_W4A8", "0")
    request = json.loads(open(request_path).read())
    results = [run_job(job) for job in request["jobs"]]
    with open(result_path, "w") as out:
        json.dump({"jobs": results, "peak_rss_bytes": peak_rss_bytes()}, out)
    return 0


if __name__ == "__main__":  # vLLM starts its workers by spawning: the entry must be guarded
    sys.exit(main(sys.argv[1], sys.argv[2]))
