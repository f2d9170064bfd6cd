"""Mixture of experts: experts become one layer each with the same numbers, are calibrated on the tokens
routed to them, and an expert too few tokens reach is handled by the stated rule, recorded and said."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compress.api import QuantizeRequest, quantize
from compress.checkpoint import load_quantized
from compress.errors import UserError
from compress.models import resolve
from compress.moe import UnfusedExperts, unfuse_experts
from compress.prune.run import PruneRequest, prune
from tests.conftest import model_output


@pytest.fixture
def mixtral_with_a_dead_expert(monkeypatch) -> Path:
    """tiny-mixtral whose router never picks expert 3 (its logit masked), as a real router can leave an
    expert without calibration tokens."""
    from transformers.models.mixtral import modeling_mixtral

    def route(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = torch.nn.functional.linear(hidden_states, self.weight)
        logits[:, 3] = float("-inf")
        probs = torch.softmax(logits.float(), dim=-1)
        top, index = torch.topk(probs, self.top_k, dim=-1)
        return logits, top / top.sum(dim=-1, keepdim=True), index

    monkeypatch.setattr(modeling_mixtral.MixtralTopKRouter, "forward", route)
    return resolve("tiny-mixtral").path


def test_unfused_experts_compute_what_the_fused_module_computes():
    from torch import nn
    from transformers import AutoConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = AutoConfig.from_pretrained(resolve("tiny-mixtral").path)
    holder = nn.Module()
    holder.experts = MixtralExperts(config)
    with torch.no_grad():
        holder.experts.gate_up_proj.normal_()
        holder.experts.down_proj.normal_()
        hidden = torch.randn(20, 64)
        weights, index = torch.topk(torch.softmax(torch.randn(20, 4), -1), 2, dim=-1)
        fused = holder.experts(hidden, index, weights)
        assert unfuse_experts(holder) == 1
        experts = holder.experts
        assert isinstance(experts, UnfusedExperts) and len(experts) == 4
        assert experts[0].gate_proj.weight.shape == (128, 64) and experts[0].down_proj.weight.shape == (64, 128)
        torch.testing.assert_close(experts(hidden, index, weights), fused, rtol=1e-5, atol=1e-5)


def test_an_expert_no_token_reaches_is_quantized_by_the_stated_rule(mixtral_with_a_dead_expert, tmp_path,
                                                                     calib_file, capsys):
    result = quantize(QuantizeRequest(model=str(mixtral_with_a_dead_expert), method="gptq", bits=4, group_size=32,
                                      calib=str(calib_file), nsamples=8, seqlen=64, out=str(tmp_path / "q"),
                                      device="cpu", progress=False))
    manifest = json.loads((result.folder / "compress_manifest.json").read_text())
    experts = manifest["experts"]
    assert experts["min_tokens"] == 3  # ceil(0.5% of 8 x 64 tokens)
    assert "RTN" in experts["rule"]
    for name, record in experts["layers"].items():
        dead = ".experts.3." in name
        assert record["data_free"] is dead and (record["tokens"] == 0) is dead, name
    layers = {layer["name"]: layer for layer in manifest["layers"]}
    assert layers["model.layers.0.mlp.experts.3.gate_proj"]["fallback"] == "rtn"
    assert layers["model.layers.0.mlp.experts.3.gate_proj"]["proxy_loss"] is None
    assert layers["model.layers.0.mlp.experts.0.gate_proj"]["fallback"] is None
    assert layers["model.layers.0.mlp.experts.0.gate_proj"]["proxy_loss"] > 0
    said = capsys.readouterr().err
    assert "experts: 18 of 24 expert layers calibrated" in said and "model.layers.0.mlp.experts.3.gate_proj" in said
    # The router stays in float, the dead expert is packed like the others, and our loader runs it.
    ours, _ = load_quantized(result.folder)
    assert type(ours.model.layers[0].mlp.experts[3].gate_proj).__name__ == "QuantLinear"
    assert isinstance(ours.model.layers[0].mlp.gate.weight, torch.nn.Parameter)
    assert torch.isfinite(model_output(ours, torch.randint(0, 512, (1, 12)))).all()


def test_pruning_an_uncalibrated_expert_falls_back_to_magnitude(mixtral_with_a_dead_expert, tmp_path, calib_file):
    result = prune(PruneRequest(model=str(mixtral_with_a_dead_expert), method="wanda", pattern="2:4",
                                calib=str(calib_file), nsamples=8, seqlen=64, out=str(tmp_path / "p"),
                                device="cpu", progress=False))
    layers = {layer["name"]: layer for layer in result.manifest["layers"]}
    dead, alive = layers["model.layers.1.mlp.experts.3.down_proj"], layers["model.layers.1.mlp.experts.1.down_proj"]
    assert dead["fallback"] == "magnitude" and alive["fallback"] is None
    assert dead["sparsity"] == alive["sparsity"] == 0.5
    # A dense output keeps the checkpoint's names, so transformers fuses the experts as it loads them.
    from transformers import AutoModelForCausalLM

    keys = load_file(str(result.folder / "model.safetensors")).keys()
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in keys
    reloaded = AutoModelForCausalLM.from_pretrained(result.folder)
    experts = reloaded.model.layers[1].mlp.experts
    # transformers fuses them; in a process that imported GPTQModel its Defuser keeps one layer each.
    down = experts[3].down_proj.weight if isinstance(experts, torch.nn.ModuleList) else experts.down_proj[3]
    assert float((down == 0).float().mean()) == 0.5


def test_other_fused_experts_are_refused():
    from torch import nn

    class OtherExperts(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.zeros(2, 8, 4))
            self.down_proj = nn.Parameter(torch.zeros(2, 4, 4))

    with pytest.raises(UserError, match="OtherExperts.*cannot split into experts yet"):
        unfuse_experts(nn.Sequential(OtherExperts()))
