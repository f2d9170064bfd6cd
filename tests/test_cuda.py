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
    assert result["protocol"]["device"].startswith("cuda") and result["protocol"]["dtype"] == "float16"
    assert result["accuracy"]["agreement"]["kl_mean"] < 1e-6
    assert result["accuracy"]["agreement"]["top1_agreement"] == 1.0
    assert result["memory"]["peak_kind"].startswith("peak allocated")
    assert result["memory"]["peak_bytes"] >= result["memory"]["weight_bytes"]
    assert result["speed"]["memory_bandwidth_gbps"] > 100  # HBM, not host memory
    assert result["environment"]["device_name"] == torch.cuda.get_device_name(0)
