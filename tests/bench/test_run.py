"""`bench()` end to end on tiny checkpoints: the record, the agreement with itself, bad input."""

import json

import pytest
import torch

from compress.bench.memory import model_weight_bytes
from compress.bench.result import SCHEMA_VERSION, BenchResult
from compress.bench.run import BenchRequest, bench
from compress.errors import UserError
from compress.models import load_model, resolve, weight_bytes_on_disk


def quick(eval_file, **kw) -> BenchRequest:
    values = dict(model="tiny-llama", device="cpu", eval=str(eval_file), seqlen=32, windows=4, decode_tokens=3,
                  decode_batches=[1, 2], repeats=1, progress=False)
    values.update(kw)
    return BenchRequest(**values)


def test_bench_against_itself_and_the_record(eval_file, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "r.json"
    result = bench(quick(eval_file, base="tiny-llama", out=str(out)))
    assert BenchResult.read(out) == result and result.name == "tiny-llama"
    agreement = result.accuracy.agreement
    assert agreement.kl_mean < 1e-6 and agreement.top1_agreement == 1.0
    assert result.protocol.windows == 4 and result.protocol.seqlen == 32
    assert result.protocol.bos is False and result.protocol.scored_tokens == 4 * 31
    path = resolve("tiny-llama").path
    model, tokenizer = load_model(path)
    from compress.bench.run import _windows
    from tests.conftest import naive_perplexity

    windows, _ = _windows(quick(eval_file), tokenizer, 512)
    assert result.accuracy.perplexity.perplexity == pytest.approx(naive_perplexity(model, windows), rel=1e-4)
    assert result.memory.weight_bytes == model_weight_bytes(model)
    assert result.memory.artifact_bytes == weight_bytes_on_disk(path)
    assert result.memory.kv_cache.bytes > 0
    speed = result.speed
    assert [d.batch for d in speed.decode] == [1, 2]
    assert speed.achieved_gbps == pytest.approx(result.memory.weight_bytes * speed.decode[0].tokens_per_s / 1e9)
    assert speed.memory_bandwidth_gbps > 0
    assert result.environment["threads"] == torch.get_num_threads()
    from compress.cpu_features import cpu_features

    # What picked the kernels: the CPU's instruction sets and the versions of the libraries that dispatch on them.
    assert result.environment["cpu"] == cpu_features().to_dict() and result.environment["cpu"]["isa"]
    assert "onnxruntime" in result.environment and result.environment["backend_threads"] == {}
    # The base reference is cached: a second run reads it instead of recomputing.
    again = bench(quick(eval_file, base="tiny-llama", speed=False))
    assert again.base.cached is True
    assert again.accuracy.perplexity == result.accuracy.perplexity


@pytest.mark.parametrize("backend, kernel, dtype", [("auto", "_weight_int4pack_mm_for_cpu", "bfloat16"),
                                                   ("dequant", "QuantLinear", "float32")])
def test_a_quantized_checkpoint_is_measured_by_the_kernel_that_runs_it(eval_file, tmp_path, calib_file, monkeypatch,
                                                                       backend, kernel, dtype):
    from compress.api import QuantizeRequest, quantize

    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "q"
    quantize(QuantizeRequest(model="tiny-llama", method="rtn", bits=4, group_size=32, out=str(folder), device="cpu",
                             progress=False))
    result = bench(quick(eval_file, model=str(folder), base="tiny-llama", speed=False, backend=backend))
    assert kernel in result.model.kernel
    assert result.model.backend == ("torch" if backend == "auto" else backend)
    assert result.model.dtype == dtype
    assert result.model.quantization["bits"] == 4
    assert result.model.weight_bits == 4.0
    assert 0 < result.accuracy.agreement.kl_mean
    assert result.memory.weight_bytes < bench(quick(eval_file, speed=False)).memory.weight_bytes


def test_a_base_with_another_vocabulary_is_refused(eval_file, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from compress.tiny import tiny_config, tiny_tokenizer

    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    other = tmp_path / "other"
    config = tiny_config("llama")
    config.vocab_size = 300
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    tiny_tokenizer(300).save_pretrained(other)
    with pytest.raises(UserError, match="another tokenizer/vocabulary"):
        bench(quick(eval_file, base=str(other)))


def test_an_empty_evaluation_text_is_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    with pytest.raises(UserError, match="empty"):
        bench(quick(empty))


def test_a_result_of_another_schema_version_is_refused(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"schema": "compress-workbench/bench", "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(UserError, match="schema version"):
        BenchResult.read(path)
    path.write_text(json.dumps({"something": "else"}))
    with pytest.raises(UserError, match="not a compress bench result"):
        BenchResult.read(path)


def test_cuda_without_a_gpu_is_refused(eval_file):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UserError, match="no CUDA GPU"):
        bench(quick(eval_file, device="cuda"))


def test_the_inference_peak_does_not_hold_the_bandwidth_probe(eval_file, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    result = bench(quick(eval_file))
    mem = result.memory
    # The probe streams a 512 MiB buffer; a tiny model's serving peak stays far below baseline + that.
    assert mem.peak_speed_bytes - mem.rss_before_load_bytes < 256 << 20


class _AddsBos:
    """A tokenizer that puts BOS before what it encodes, as Llama's and Gemma's do."""

    def __init__(self, inner):
        self.inner, self.bos_token_id = inner, inner.convert_tokens_to_ids(inner.all_special_tokens[0])

    def __call__(self, text, add_special_tokens=True, **kwargs):
        out = self.inner(text, **kwargs)
        if add_special_tokens:
            out["input_ids"] = [self.bos_token_id, *out["input_ids"]]
        return out


def test_windows_follow_the_tokenizers_bos_convention(eval_file):
    from compress.bench.run import _windows, bos_token
    from compress.tiny import tiny_tokenizer

    plain = tiny_tokenizer()
    adds = _AddsBos(plain)
    assert bos_token(plain, "auto") is None and bos_token(adds, "auto") == adds.bos_token_id
    assert bos_token(adds, "no") is None
    with pytest.raises(UserError, match="--bos 'maybe'"):
        bos_token(adds, "maybe")
    request = quick(eval_file, windows=3)
    without, record = _windows(request, plain, 512)
    with_bos, bos_record = _windows(request, adds, 512)
    assert [w.numel() for w in with_bos] == [32] * 3 and all(int(w[0]) == adds.bos_token_id for w in with_bos)
    # With BOS a window holds 31 text tokens, every one predicted; the text's tiling moves by 31.
    assert torch.equal(torch.cat([w[1:] for w in with_bos]), torch.cat(without)[:93])
    assert bos_record.seqlen == 31 and record.seqlen == 32 and bos_record.bos and not record.bos


def test_bos_is_recorded_and_changes_what_is_scored(eval_file, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    no = bench(quick(eval_file, bos="no", speed=False))
    yes = bench(quick(eval_file, bos="yes", speed=False))
    assert (no.protocol.bos, yes.protocol.bos) == (False, True)
    assert yes.protocol.seqlen == 32 and yes.protocol.stride == 31
    assert yes.protocol.scored_tokens == no.protocol.scored_tokens == 4 * 31
    assert yes.accuracy.perplexity.perplexity != no.accuracy.perplexity.perplexity


def test_a_base_benched_alone_fills_the_reference_its_base_runs_need(eval_file, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    bench(quick(eval_file, speed=False))
    (made,) = (tmp_path / "cache" / "references").iterdir()
    compared = bench(quick(eval_file, base="tiny-llama", speed=False))
    assert compared.base.cached is True and compared.base.cache == str(made)
    assert compared.accuracy.agreement.kl_mean < 1e-6  # the reference is the model's own


def test_the_child_command_carries_every_setting():
    """A sweep's or a recipe's row is measured by `compress bench` in a child: every BenchRequest field must reach
    it (a recipe's `bench: {speed: false}` was dropped before)."""
    import dataclasses

    from compress.bench.command import bench_command
    from compress.cli import build_parser

    changed = BenchRequest(model="m", base="b", name="n", device="cpu", dtype="bfloat16", base_dtype="float32",
                           transform="torchao-int8wo", backend="dense", eval="e.txt", seqlen=64, bos="yes", windows=3,
                           batch_size=2, top_k=7, task="t.tsv", tasks=["arc_easy", "piqa"], limit=5, num_fewshot=1,
                           speed=False, prompt_tokens=16, decode_tokens=4, decode_batches=[1, 4], task_batch=8,
                           warmup=0, repeats=2, trust_remote_code=True, progress=False, out="o.json")
    for request in (changed, BenchRequest(model="m", out="o.json")):
        args = vars(build_parser().parse_args(bench_command(request)[3:]))
        values = {k: v for k, v in args.items() if k not in ("command", "handler")}
        assert BenchRequest(**values) == request
    assert {f.name for f in dataclasses.fields(BenchRequest)} == set(vars(changed))
