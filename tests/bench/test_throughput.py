import torch

from compress.bench.bandwidth import read_bandwidth_gbps
from compress.bench.throughput import decode, prefill


def test_decode_generates_the_requested_tokens_and_counts_the_cache(tiny_llama):
    model, _ = tiny_llama
    prompt = torch.randint(0, 512, (12,))
    result = decode(model, prompt, new_tokens=5, batch=3, device=torch.device("cpu"), warmup=0, repeats=2)
    assert result.batch == 3 and result.new_tokens == 5 and result.prompt_tokens == 12
    assert result.tokens_per_s > 0
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    # The cache holds the prompt and each of the 5 tokens fed back in by the decode steps.
    positions = 12 + 5
    assert result.kv_cache_bytes == 2 * cfg.num_hidden_layers * 3 * cfg.num_key_value_heads * positions * head_dim * 4


def test_prefill_times_one_window(tiny_llama):
    model, _ = tiny_llama
    result = prefill(model, torch.randint(0, 512, (40,)), torch.device("cpu"), warmup=0, repeats=1)
    assert result.seqlen == 40 and result.tokens_per_s > 0


def test_bandwidth_is_the_buffers_bytes_over_the_median_timed_pass(monkeypatch):
    from types import SimpleNamespace

    import compress.bench.bandwidth as bandwidth

    # The clock's readings: the warm-up pass's start (it is not timed), then each timed pass's start and end,
    # 0.5, 0.25 and 2 s. The figure must take the median, 0.5 s.
    clock = iter([0.0, 20.0, 20.5, 30.0, 30.25, 40.0, 42.0])
    monkeypatch.setattr(bandwidth, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    gbps = read_bandwidth_gbps(torch.device("cpu"), megabytes=8, repeats=3)
    assert gbps == 8 * (1 << 20) / 0.5 / 1e9
