"""The CUDA paths, run where a GPU is present (skipped elsewhere; CI has none, the lent GPU machine has)."""

import pytest
import torch

from compress.api import QuantizeRequest, quantize
from compress.bench.run import BenchRequest, bench
from compress.checkpoint import load_quantized
from tests.conftest import model_output

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_on_cuda_reloads_and_runs_on_both_devices(method, tmp_path, calib_file):
    result = quantize(QuantizeRequest(model="tiny-llama", method=method, bits=4, group_size=32, calib=str(calib_file),
                                      nsamples=8, seqlen=64, device="cuda", out=str(tmp_path / "q"), progress=False))
    assert result.manifest["device"].startswith("cuda")
    model, _ = load_quantized(result.folder)
    ids = torch.randint(0, 512, (2, 16))
    cpu_logits = model_output(model, ids)
    gpu_logits = model_output(model.to("cuda"), ids.to("cuda")).cpu()
    assert torch.allclose(cpu_logits, gpu_logits, atol=1e-3 * cpu_logits.abs().max().item())


def test_bench_on_cuda_measures_the_gpu(tmp_path, eval_file, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    result = bench(BenchRequest(model="tiny-llama", base="tiny-llama", device="cuda", eval=str(eval_file), seqlen=32,
                                windows=4, decode_tokens=3, decode_batches=[1, 4], repeats=1, progress=False))
    assert result.protocol.device.startswith("cuda") and result.protocol.dtype == "float16"
    assert result.accuracy.agreement.kl_mean < 1e-6
    assert result.accuracy.agreement.top1_agreement == 1.0
    assert result.memory.peak_kind.startswith("peak allocated")
    assert result.memory.peak_bytes >= result.memory.weight_bytes
    assert result.speed.memory_bandwidth_gbps > 100  # HBM, not host memory
    assert result.environment["device_name"] == torch.cuda.get_device_name(0)


def test_streaming_on_cuda_holds_one_block_on_the_gpu_and_matches_in_memory(tmp_path, calib_file):
    """GPU memory is bounded by one block and its activations, not by the model: a 16-block model's peak
    allocated memory stays below half its float16 size (blocks are changed in float32) (and the streaming and in-memory CUDA runs
    write the same bytes)."""
    from transformers import AutoModelForCausalLM

    from compress.tiny import tiny_config, tiny_tokenizer
    from tests.conftest import assert_same_checkpoint

    config = tiny_config("llama")
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = 16, 512, 1536
    config.num_attention_heads = config.num_key_value_heads = 8
    source = tmp_path / "wide"
    AutoModelForCausalLM.from_config(config, dtype=torch.float16).save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    common = dict(model=str(source), method="gptq", bits=4, group_size=128, calib=str(calib_file), nsamples=4,
                  seqlen=32, device="cuda", progress=False)
    torch.cuda.reset_peak_memory_stats()
    streamed = quantize(QuantizeRequest(out=str(tmp_path / "s"), **common))
    peak = torch.cuda.max_memory_allocated()
    blocks_fp16 = 16 * (4 * 512 * 512 + 3 * 512 * 1536) * 2
    assert peak < blocks_fp16 / 2, f"{peak / 2**20:.0f} MiB on the GPU for a {blocks_fp16 / 2**20:.0f} MiB model"
    in_memory = quantize(QuantizeRequest(out=str(tmp_path / "m"), in_memory=True, **common))
    assert_same_checkpoint(streamed.folder, in_memory.folder)
