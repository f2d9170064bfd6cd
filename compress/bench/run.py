"""``bench(BenchRequest) -> BenchResult``: memory, speed and accuracy of one model, as one JSON record.

Order matters for honest figures: the base model's reference is made (or read from its cache)
first and freed; the peak-memory counter is reset; only then is the measured model loaded, scored
and timed, so the peak is this model's own.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compress.bench import memory, throughput
from compress.bench.agreement import DEFAULT_TOP_K, Reference, windows_digest
from compress.bench.bandwidth import read_bandwidth_gbps
from compress.bench.load import LoadedModel, choose_for, load_for_bench, resolve_dtype
from compress.bench.result import (
    AccuracyResult,
    BaseReferenceInfo,
    BenchResult,
    KVCacheSummary,
    MemoryResult,
    ModelInfo,
    Protocol,
    SpeedResult,
)
from compress.bench.score import output_vocab, score_windows
from compress.bench.task_accuracy import is_classifier, task_accuracy
from compress.data import eval_windows_of_text, leading_bos, load_labelled, load_text
from compress.errors import UserError
from compress.models import cache_dir, is_causal_lm, source_license, weight_bytes_on_disk
from compress.runtime import environment, resolve_device
from compress.typed_json import to_plain

DEFAULT_SEQLEN = 2048


@dataclass
class BenchRequest:
    model: str = "smollm2-135m"
    """Alias or folder: a dense model or a GPTQ-format checkpoint."""
    base: str | None = None
    """Uncompressed model to compare with (KL divergence, top-1 agreement, ratios)."""
    name: str | None = None
    """Label of this row in reports (default: the model's folder or alias)."""
    device: str = "auto"
    dtype: str = "auto"
    """Compute dtype: auto = the backend's (bfloat16 for torch's int kernels), else float32 on CPU, float16 on CUDA."""
    base_dtype: str | None = None
    """dtype of the base model (default: the same as dtype)."""
    transform: str | None = None
    """A peer's in-memory scheme applied after loading (e.g. torchao-int8wo)."""
    backend: str = "auto"
    """What runs the model: auto, dense, dequant, torch, gptqmodel, bitsandbytes, onnxruntime, llamacpp
    (compress.backends)."""
    eval: str = "wikitext2"
    """Perplexity text: NAME[:SPLIT] or a file (WikiText-2 test by default)."""
    seqlen: int | None = None
    """Window length (default min(2048, the model's context))."""
    bos: str = "auto"
    """Each perplexity window starts with the BOS token: auto = as the tokenizer does (Llama, Mistral, Gemma add
    one; GPT-2-style tokenizers such as SmolLM2's do not), yes, or no. With BOS a window holds seqlen - 1 text
    tokens, every one of them predicted."""
    windows: int | None = None
    """Number of windows from the start of the text (default: all)."""
    batch_size: int | None = None
    """Windows per forward pass when scoring (default: as many as fit a fixed logits budget)."""
    top_k: int = DEFAULT_TOP_K
    """Base log-probs kept per position for KL."""
    task: str = "sst2:dev"
    """Labelled task for classifiers."""
    tasks: list[str] | None = None
    """Language models: lm-evaluation-harness tasks (e.g. lambada_openai, arc_easy), run on the model as this
    backend runs it."""
    limit: int | None = None
    """Examples per task (the first N of its split; default all)."""
    num_fewshot: int = 0
    speed: bool = True
    prompt_tokens: int = 128
    decode_tokens: int = 32
    decode_batches: list[int] = field(default_factory=lambda: [1, 8])
    task_batch: int = 32
    """Classifiers: batch size of the timed pass over the task's examples."""
    warmup: int = 1
    repeats: int = 3
    trust_remote_code: bool = False
    progress: bool = True
    out: str | None = None
    """Write the result JSON here (atomically)."""


# --- evaluation text and the base reference ------------------------------------------------------


def _windows(request: BenchRequest, tokenizer, context: int | None):
    text, record = load_text(request.eval)
    if not text.strip():
        raise UserError(f"evaluation text {request.eval} is empty: point --eval at a text with content")
    seqlen = request.seqlen or min(DEFAULT_SEQLEN, context or DEFAULT_SEQLEN)
    if request.seqlen and context and request.seqlen > context:
        raise UserError(f"--seqlen {request.seqlen} exceeds the model's context of {context} tokens")
    if request.windows is not None and request.windows <= 0:
        raise UserError(f"--windows must be positive, not {request.windows}")
    bos = bos_token(tokenizer, request.bos)
    if bos is None:
        return eval_windows_of_text(tokenizer, text, record, seqlen, request.windows)
    if seqlen < 2:
        raise UserError(f"--seqlen {seqlen} leaves no text after the BOS token: use at least 2, or --bos no")
    windows, window_record = eval_windows_of_text(tokenizer, text, record, seqlen - 1, request.windows)
    window_record.bos = True
    return [torch.cat([torch.tensor([bos], dtype=w.dtype), w]) for w in windows], window_record


BOS_CHOICES = ("auto", "yes", "no")


def bos_token(tokenizer, choice: str) -> int | None:
    """The BOS id each perplexity window starts with, or None. ``auto`` follows the tokenizer's own convention:
    whether it puts BOS before a text it encodes (scoring without it inflates perplexity and KL for models
    trained always to see one: Gemma's first 4 x 512 WikiText-2 windows score 64.3 without and 23.1 with)."""
    if choice not in BOS_CHOICES:
        raise UserError(f"--bos {choice!r}: use auto (the tokenizer's convention), yes or no")
    bos = getattr(tokenizer, "bos_token_id", None)
    if choice == "no":
        return None
    if choice == "yes":
        if bos is None:
            raise UserError("--bos yes: this tokenizer has no BOS token; use --bos no")
        return bos
    return leading_bos(tokenizer)


def _check_same_vocabulary(model_tok, base_tok, model_ref: str, base_ref: str) -> None:
    if base_tok is None or model_tok is None:
        raise UserError("both the model and --base need a tokenizer in their folders to be compared")
    if len(model_tok) != len(base_tok) or model_tok.get_vocab() != base_tok.get_vocab():
        raise UserError(f"--base {base_ref} has another tokenizer/vocabulary than {model_ref} "
                        f"({len(base_tok)} vs {len(model_tok)} tokens): compare a model with its own base")


def _reference_key(base_path: Path, dtype: torch.dtype, device: torch.device, windows, top_k: int) -> str:
    from compress.fingerprint import source_hash

    parts = [source_hash(base_path), str(dtype), device.type, windows_digest(windows), str(top_k), "ref-v1"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def base_reference(request: BenchRequest, device: torch.device, windows, tokenizer, vocab_size: int | None
                   ) -> tuple[Reference, BaseReferenceInfo]:
    """The base model's top-K reference on ``windows``, from the cache or made now (then cached)."""
    from transformers import AutoConfig, AutoTokenizer

    from compress.models import resolve

    dtype = resolve_dtype(request.base_dtype or request.dtype, device)
    resolved = resolve(request.base, request.trust_remote_code)
    base_tokenizer = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=request.trust_remote_code)
    _check_same_vocabulary(tokenizer, base_tokenizer, request.model, request.base)
    base_vocab = getattr(AutoConfig.from_pretrained(resolved.path, trust_remote_code=request.trust_remote_code),
                         "vocab_size", None)
    if vocab_size != base_vocab:
        raise UserError(f"--base {request.base} has a vocabulary of {base_vocab} logits, {request.model} "
                        f"{vocab_size}: compare a model with its own base")
    path = reference_path(resolved.path, dtype, device, windows, request.top_k)
    info = BaseReferenceInfo(request.base, str(resolved.path), str(dtype)[6:], request.top_k, str(path))
    cached = cached_reference(path, windows, request.top_k)
    if cached is not None:
        return cached, dataclasses.replace(info, cached=True)
    from compress.bench.streamed import can_stream, streamed_reference

    if can_stream(resolved.path, request.trust_remote_code):
        # block by block: a float base never sits whole in memory beside (or before) the measured model
        reference = streamed_reference(resolved.path, dtype, device, windows, request.top_k,
                                       request.trust_remote_code, request.progress)
    else:
        base = load_for_bench(request.base, dtype, device, request.trust_remote_code)
        try:
            _, reference = score_windows(base.model, windows, device, request.batch_size,
                                         make_reference_k=request.top_k, show_progress=request.progress,
                                         desc="base reference")
        finally:
            del base
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    reference.meta = to_plain(info) | {"windows_sha256": windows_digest(windows)}
    reference.save(path)
    return reference, dataclasses.replace(info, cached=False)


def reference_path(model_path: Path, dtype: torch.dtype, device: torch.device, windows, top_k: int) -> Path:
    """Where the top-K reference of this model (as `--base` loads it) on these windows is cached."""
    return cache_dir() / "references" / f"{_reference_key(model_path, dtype, device, windows, top_k)}.safetensors"


def cached_reference(path: Path, windows, top_k: int) -> Reference | None:
    """The cached reference at ``path`` if it is whole and made on these windows; a damaged or mismatched file
    (truncated, edited, another text) is said, removed and made again, never trusted."""
    if not path.is_file():
        return None
    try:
        reference = Reference.load(path)
        rows = sum(w.numel() - 1 for w in windows)
        problem = ("it was made on other windows" if reference.meta.get("windows_sha256") != windows_digest(windows)
                   else f"it holds {tuple(reference.logprobs.shape)} log-probs, not ({rows}, {top_k})"
                   if tuple(reference.logprobs.shape) != (rows, top_k) or reference.token_ids.shape
                   != reference.logprobs.shape else None)
    except Exception as exc:  # safetensors raises its own types for a truncated or garbled file
        problem = f"it cannot be read: {str(exc).splitlines()[0][:120]}"
    if problem is None:
        return reference
    print(f"the cached base reference {path} is damaged ({problem}): making it again", file=sys.stderr)
    path.unlink()
    return None


def _config_and_tokenizer(request: BenchRequest):
    """(config, tokenizer) of the measured model, without loading its weights."""
    from transformers import AutoConfig, AutoTokenizer

    from compress.models import gguf_config_and_tokenizer, resolve

    resolved = resolve(request.model, request.trust_remote_code, allow_gguf=True)
    if resolved.path.is_file():  # a GGUF file carries its config and tokenizer
        return gguf_config_and_tokenizer(resolved.path)
    config = AutoConfig.from_pretrained(resolved.path, trust_remote_code=request.trust_remote_code)
    if not (resolved.path / "tokenizer_config.json").is_file() and not (resolved.path / "tokenizer.json").is_file():
        raise UserError(f"{request.model} has no tokenizer in its folder: the benchmark needs one to make windows")
    tokenizer = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=request.trust_remote_code)
    return config, tokenizer


def ensure_reference(request: BenchRequest) -> BaseReferenceInfo:
    """Make (or find) the base reference ``bench(request)`` will use, without loading the measured
    model: a sweep calls this once so that no variant's process pays for, or counts, the base."""
    config, tokenizer = _config_and_tokenizer(request)
    windows, _ = _windows(request, tokenizer, _context(config))
    _, info = base_reference(request, bench_device(request), windows, tokenizer,
                             getattr(config, "vocab_size", None))
    return info


# --- the benchmark ---------------------------------------------------------------------------------


def bench_device(request: BenchRequest) -> torch.device:
    """``--device``; ``auto`` is the CPU for a GGUF file, which only the CPU build of llama.cpp runs here (a GPU
    beside it does not make a GGUF file runnable, and auto means the best device that can run the model)."""
    from compress.models import is_gguf

    device = resolve_device(request.device)
    if request.device == "auto" and device.type != "cpu" and is_gguf(Path(request.model).expanduser()):
        return torch.device("cpu")
    return device


def _context(config) -> int | None:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _speed(request: BenchRequest, loaded: LoadedModel, window: torch.Tensor, device: torch.device,
           weight_bytes: int, bandwidth: float, task_batches: list[dict] | None) -> SpeedResult:
    model = loaded.model
    speed = SpeedResult(prefill=throughput.prefill(model, window, device, request.warmup, request.repeats),
                        warmup=request.warmup, repeats=request.repeats)
    if task_batches:
        speed.classify = throughput.classify(model, task_batches, device, request.warmup, request.repeats)
    if is_causal_lm(model.config):
        prompt = window[: request.prompt_tokens]
        speed.decode = [throughput.decode(model, prompt, request.decode_tokens, b, device, request.warmup,
                                          request.repeats) for b in request.decode_batches]
        speed.memory_bandwidth_gbps = bandwidth
        speed.memory_bandwidth_method = "median of 7 timed sums over a float32 buffer (512 MiB CPU, 2 GiB CUDA)"
        batch1 = speed.decode_at(1)
        if batch1 is not None:
            speed.achieved_gbps = weight_bytes * batch1.tokens_per_s / 1e9
            speed.bandwidth_fraction = speed.achieved_gbps / bandwidth
    return speed


def bench(request: BenchRequest) -> BenchResult:
    device = bench_device(request)
    if request.top_k <= 0:
        raise UserError(f"--top-k must be positive, not {request.top_k}")
    started = time.perf_counter()
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    # `python -m compress.cli bench ...` (how a sweep runs it) is the `compress bench ...` command.
    command = ["compress" if program == "cli.py" else program, *sys.argv[1:]] if program else []

    # The tokenizer first (cheap), so the evaluation windows and the base reference exist before the
    # measured model is loaded.
    config, tokenizer = _config_and_tokenizer(request)
    resolved, qcfg, chosen, chosen_dtype, _ = choose_for(request.model, request.dtype, device,
                                                         request.trust_remote_code, request.backend)  # fail fast
    causal = is_causal_lm(config)
    if chosen.runs_itself:
        refuse_for_external(request, chosen.name, causal)
    classifier = is_classifier(config)
    if request.tasks:
        if not causal:
            raise UserError("--tasks are language-model tasks (lm-evaluation-harness); this model has no LM head: "
                            "use --task for a classifier")
        from compress.tasks.run import check_tasks

        check_tasks(request.tasks, request.limit, request.num_fewshot)  # before the model loads

    windows = record = reference = reference_info = None
    if causal:
        windows, record = _windows(request, tokenizer, _context(config))
        if request.base:
            reference, reference_info = base_reference(request, device, windows, tokenizer,
                                                       getattr(config, 'vocab_size', None))
    elif request.base:
        raise UserError("--base compares language-model distributions; this model has no LM head")
    if chosen.runs_itself:
        from compress.bench.vllm_bench import bench_in_vllm

        return _written(request, bench_in_vllm(request, config, resolved, qcfg, chosen_dtype, device, windows, record,
                                               reference, reference_info, started, command))
    task_rows = task_record = None
    if classifier:
        task_rows, task_record = load_labelled(request.task)

    # The bandwidth probe's buffer (512 MiB on CPU, 2 GiB on CUDA) must not count in the model's peak.
    bandwidth = read_bandwidth_gbps(device) if request.speed and causal else None
    gc.collect()
    memory.reset_peak(device)
    rss_before = memory.peak_bytes(device)
    load_started = time.perf_counter()
    loaded = load_for_bench(request.model, request.dtype, device, request.trust_remote_code, request.transform,
                            request.backend)
    load_seconds = time.perf_counter() - load_started
    model, dtype = loaded.model, loaded.dtype

    accuracy = AccuracyResult()
    bos = bool(causal and record.bos)
    protocol = Protocol(device=str(device), dtype=str(dtype)[6:], bos=bos, bos_choice=request.bos,
                        tokenization=f"from the start of the text, no special tokens, {record.rule}" if causal
                        else "each example alone")
    if causal:
        # A dense model benched alone is what a later `--base` run of it loads: its scoring pass also makes that
        # run's reference (top-K per position, a small cost), so the base is not scored twice.
        own_reference = (None if request.base or loaded.backend != "dense" or request.transform else
                         reference_path(loaded.resolved.path, dtype, device, windows, request.top_k))
        make_k = request.top_k if own_reference is not None and not own_reference.is_file() else None
        score, made = score_windows(model, windows, device, request.batch_size, reference, make_reference_k=make_k,
                                    show_progress=request.progress, desc="scoring")
        if made is not None:
            made.meta = to_plain(BaseReferenceInfo(request.model, str(loaded.resolved.path), str(dtype)[6:],
                                                   request.top_k, str(own_reference))) | {
                "windows_sha256": windows_digest(windows)}
            made.save(own_reference)
        accuracy.perplexity, accuracy.agreement = score.perplexity, score.agreement
        accuracy.scoring_tokens_per_s = score.tokens_per_s
        protocol.eval, protocol.seqlen, protocol.stride = record.text, record.seqlen + bos, record.seqlen
        protocol.windows, protocol.text_tokens, protocol.scored_tokens = record.count, record.tokens, \
            score.perplexity.tokens
        protocol.remainder, protocol.batch_size, protocol.scoring_threads = "dropped", score.batch_size, score.threads
        protocol.kl, protocol.base_reference = f"top-{request.top_k} + rest bucket (lower bound)", reference_info
    if classifier:
        accuracy.task = dataclasses.replace(task_accuracy(model, tokenizer, task_rows, device, request.task),
                                            data=task_record)
    if request.tasks:
        from compress.tasks.run import run_tasks

        context = min(_context(config) or 2048, 2048)
        accuracy.tasks = dataclasses.replace(
            run_tasks(model, tokenizer, device, request.tasks, context, output_vocab(model), request.limit,
                      request.num_fewshot, request.batch_size, request.progress),
            dtype=str(dtype)[6:], max_length=context)

    speed: SpeedResult | None = None
    weight_bytes = memory.model_weight_bytes(model)
    peak_all = memory.peak_bytes(device)
    # A second peak over the timed prefill/decode only: what serving the model takes, without the
    # scoring pass's batch of full-vocabulary logits.
    memory.reset_peak(device)
    if request.speed:
        window = windows[0] if windows else tokenizer("hello " * 127, return_tensors="pt")["input_ids"][0]
        task_batches = throughput.classification_batches(tokenizer, [t for t, _ in task_rows], request.task_batch) \
            if classifier else None
        speed = _speed(request, loaded, window, device, weight_bytes, bandwidth, task_batches)

    result = BenchResult(
        name=request.name or _default_name(request),
        model=ModelInfo(reference=request.model, path=str(loaded.resolved.path), origin=loaded.resolved.origin,
                        model_type=config.model_type, parameters=memory.parameter_count(model),
                        dtype=str(dtype)[6:], quantization=loaded.quantization, weight_bits=loaded.weight_bits,
                        transform=request.transform, backend=loaded.backend, kernel=loaded.kernel,
                        notes=list(loaded.notes or []), license=source_license(loaded.resolved)),
        base=reference_info,
        memory=MemoryResult(
            artifact_bytes=weight_bytes_on_disk(loaded.resolved.path),
            weight_bytes=weight_bytes,
            runtime_cache_bytes=memory.runtime_cache_bytes(model),
            peak_bytes=max(peak_all, memory.peak_bytes(device)),
            peak_speed_bytes=memory.peak_bytes(device) if request.speed else None,
            peak_kind=memory.peak_kind(device),
            rss_before_load_bytes=rss_before if device.type == "cpu" else None,
            kv_cache=_kv_summary(speed)),
        speed=speed,
        accuracy=accuracy,
        protocol=protocol,
        environment=environment() | {"device_name": _device_name(device), "threads": torch.get_num_threads(),
                                     "backend_threads": loaded.threads},
        timings_s={"load": round(load_seconds, 3), "total": round(time.perf_counter() - started, 3)},
        command=command,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    return _written(request, result)


def refuse_for_external(request: BenchRequest, backend: str, causal: bool) -> None:
    """What a backend that runs the model in its own process (vLLM) cannot measure, refused before any work."""
    if not causal:
        raise UserError(f"--backend {backend} measures language models; this one has no LM head: use --backend auto")
    for option, given in (("--tasks", request.tasks), ("--transform", request.transform)):
        if given:
            raise UserError(f"{option} runs on a model loaded here; --backend {backend} runs it in its own process: "
                            "drop one of them")


def _written(request: BenchRequest, result: BenchResult) -> BenchResult:
    if request.out:
        result.write(Path(request.out))
    return result


def _kv_summary(speed: SpeedResult | None) -> KVCacheSummary | None:
    if not speed or not speed.decode:
        return None
    first = speed.decode[0]
    tokens = first.prompt_tokens + first.new_tokens
    return KVCacheSummary(first.kv_cache_bytes, first.batch, tokens, first.kv_cache_bytes / (first.batch * tokens))


def _default_name(request: BenchRequest) -> str:
    name = Path(request.model).name if Path(request.model).is_dir() else request.model
    if request.transform:
        name += f"+{request.transform}"
    if request.dtype != "auto":
        name += f"-{request.dtype}"
    return name


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"
