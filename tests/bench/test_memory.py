import torch
from torch import nn

from compress.bench.memory import kv_cache_bytes, model_weight_bytes, parameter_count, tensor_bytes
from compress.quant.linear import QuantLinear
from compress.quant.rtn import RTNConfig, rtn_quantize


def test_weight_bytes_are_the_tensors_byte_counts_with_tied_weights_once():
    emb = nn.Embedding(100, 16)
    head = nn.Linear(16, 100, bias=False)
    head.weight = emb.weight  # tied, as a causal LM's head often is
    model = nn.Sequential(emb, nn.Linear(16, 8), head).to(torch.float32)
    expected = 100 * 16 * 4 + (16 * 8 + 8) * 4
    assert model_weight_bytes(model) == expected
    assert parameter_count(model) == 100 * 16 + 16 * 8 + 8
    assert model_weight_bytes(model.to(torch.bfloat16)) == expected // 2


def test_a_packed_layer_counts_its_packed_buffers():
    w = torch.randn(64, 128)
    layer = QuantLinear.from_quantized(rtn_quantize(w, RTNConfig(bits=4, group_size=32)), 32, None)
    packed = sum(t.numel() * t.element_size() for t in (layer.qweight, layer.qzeros, layer.scales, layer.g_idx))
    assert model_weight_bytes(layer) == packed
    assert packed < w.numel() * 4 / 5  # 4-bit codes plus fp16 scales: far below fp32
    assert parameter_count(nn.Sequential(layer)) == 64 * 128


def test_kv_cache_bytes_match_the_cache_tensors(tiny_llama):
    model, _ = tiny_llama
    cfg = model.config
    ids = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    expected = 2 * cfg.num_hidden_layers * 2 * kv_heads * 10 * head_dim * 4
    assert kv_cache_bytes(cache) == expected


def test_tensor_bytes_of_a_plain_tensor():
    assert tensor_bytes(torch.zeros(3, 5, dtype=torch.float16)) == 30
