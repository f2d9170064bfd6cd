"""The llamacpp backend: a GGUF file run by llama.cpp behind the benchmark's calling convention, and
`compress bench FILE.gguf` end to end against our loader on the same codes."""

import pytest
import torch

from compress.api import QuantizeRequest, quantize
from compress.cli import main
from compress.export_gguf.run import export_gguf

pytest.importorskip("llama_cpp", reason="install the [llamacpp] extra")

from compress.backends.llamacpp_model import LlamaCppCausalLM  # noqa: E402
from compress.bench.load import load_for_bench  # noqa: E402
from compress.bench.run import BenchRequest, bench  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def q8_files(tmp_path_factory):
    """A tiny Llama's RTN W8 g32 checkpoint and its Q8_0 export (8 bits keep llama.cpp's int8 activations
    the only difference from our loader)."""
    work = tmp_path_factory.mktemp("gguf")
    folder = quantize(QuantizeRequest(model="tiny-llama", method="rtn", bits=8, group_size=32, sym=True,
                                      out=str(work / "q8"), progress=False, device="cpu")).folder
    export_gguf(str(folder), "q8_0", str(work / "q8.gguf"))
    return folder, work / "q8.gguf"


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_logits_match_our_loader_on_the_same_codes_in_batches_and_steps(q8_files):
    folder, gguf = q8_files
    ours = load_for_bench(str(folder), "float32", CPU, backend="dequant").model
    loaded = load_for_bench(str(gguf), "auto", CPU)
    model = loaded.model
    assert isinstance(model, LlamaCppCausalLM) and loaded.backend == "llamacpp"
    ids = torch.randint(0, 512, (3, 24))
    with torch.no_grad():
        expected = ours(ids).logits
    full = model(ids, use_cache=False).logits
    assert full.shape == expected.shape
    assert relative_error(full, expected) < 0.02
    # A prompt, then steps that continue it: each row its own llama.cpp sequence, the same logits as the
    # whole sequence at once (0.3% seen: single-token steps take other kernels and read an f16 cache).
    out = model(ids[:, :20], use_cache=True, logits_to_keep=1)
    assert out.logits.shape == (3, 1, 512)
    assert relative_error(out.logits[:, 0], full[:, 19]) < 0.01
    cache = out.past_key_values
    for step in range(20, 24):
        out = model(ids[:, step:step + 1], past_key_values=cache)
        cache = out.past_key_values
        assert relative_error(out.logits[:, 0], full[:, step]) < 0.01
    assert cache.tokens == 24 and cache.bytes_held() > 0
    # A new prompt starts a new generation: an older cache cannot silently continue the wrong sequence.
    model(ids[:1, :4], use_cache=True)
    with pytest.raises(ValueError, match="no longer held"):
        model(ids[:, :1], past_key_values=cache)


def test_bench_of_a_gguf_file_measures_llama_cpp_with_the_same_windows(q8_files, eval_file, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    folder, gguf = q8_files
    settings = dict(device="cpu", eval=str(eval_file), seqlen=32, windows=4, decode_tokens=3, decode_batches=[1, 2],
                    repeats=1, progress=False, base="tiny-llama")
    theirs = bench(BenchRequest(model=str(gguf), **settings))
    ours = bench(BenchRequest(model=str(folder), backend="dequant", speed=False, **settings))
    model = theirs.model
    assert model.backend == "llamacpp" and "llama.cpp CPU" in model.kernel and "q8_0 x14" in model.kernel
    assert model.quantization["bits"] == 8 and model.quantization["bits_per_weight"] == 8.5
    assert model.parameters == ours.model.parameters
    assert theirs.memory.artifact_bytes == gguf.stat().st_size
    assert theirs.protocol.scored_tokens == ours.protocol.scored_tokens
    ppl_theirs = theirs.accuracy.perplexity.perplexity
    ppl_ours = ours.accuracy.perplexity.perplexity
    assert abs(ppl_theirs / ppl_ours - 1) < 0.01
    assert theirs.accuracy.agreement.top1_agreement > 0.9
    assert [d.batch for d in theirs.speed.decode] == [1, 2]
    assert theirs.memory.kv_cache.bytes > 0
    assert theirs.environment["backend_threads"] == {"llama_cpp": torch.get_num_threads()}


@pytest.mark.parametrize("args, message", [
    (["quantize", "{gguf}"], "is a GGUF file: `compress bench"),
    (["bench", "{gguf}", "--dtype", "bfloat16"], "float32 activations"),
    (["bench", "{gguf}", "--backend", "torch"], "backend 'torch' runs gptq, compressed-tensors models, not a gguf one"),
])
def test_gguf_requests_a_command_cannot_serve_are_one_line_errors(args, message, q8_files, capsys):
    gguf = str(q8_files[1])
    assert main([a.replace("{gguf}", gguf) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_lm_eval_scores_the_gguf_as_llama_cpp_runs_it(q8_files):
    """lm-eval's requests through llama.cpp: the log-likelihoods of our loader on the same codes, in batches
    of several llama.cpp sequences."""
    pytest.importorskip("lm_eval", reason="install the [eval] extra")
    from lm_eval.api.instance import Instance

    from compress.tasks.lm import CompressLM

    folder, gguf = q8_files
    pairs = [("The quick brown fox", " jumps over"), ("Paragraph 3: the model", " reads the text"), ("a b c", " d")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    scores = {}
    for name, backend, model in (("ours", "dequant", str(folder)), ("llama.cpp", "auto", str(gguf))):
        loaded = load_for_bench(model, "float32", CPU, backend=backend)
        lm = CompressLM(loaded.model, loaded.tokenizer, CPU, 64, 512)
        scores[name] = [lp for lp, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    for ours, theirs in zip(scores["ours"], scores["llama.cpp"]):
        assert theirs == pytest.approx(ours, rel=0.02)


def test_auto_device_runs_a_gguf_file_on_the_cpu_beside_a_gpu(q8_files, monkeypatch):
    import compress.bench.run as run

    monkeypatch.setattr(run, "resolve_device", lambda name: torch.device("cuda" if name == "auto" else name))
    assert run.bench_device(BenchRequest(model=str(q8_files[1]), device="auto")) == CPU
    assert run.bench_device(BenchRequest(model=str(q8_files[0]), device="auto")).type == "cuda"  # a folder: as asked
