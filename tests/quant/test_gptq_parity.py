"""Our GPTQ against GPTQModel's on the very same layer inputs: the same output error."""

import copy
import os

import pytest
import torch

from compress.block_inputs import capture_block_inputs, collect_hessian, for_each_layer_call
from compress.models import load_model, resolve
from compress.quant.apply import output_error
from compress.quant.gptq import GPTQConfig, gptq_quantize
from compress.select import ModuleSelection, block_linears, find_blocks
from tests.conftest import calibration_ids

gptqmodel = pytest.importorskip("gptqmodel", reason="install the [gptqmodel] extra")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")


def peer_quantize(layer, block, inputs, qcfg) -> torch.Tensor:
    """GPTQModel's GPTQ class (7.6.0), fed the layer inputs our driver captured."""
    from gptqmodel.quantization.gptq import GPTQ

    task = GPTQ(copy.deepcopy(layer), qcfg)
    task.quantizer.configure(perchannel=True)  # as its GPTQ processor does
    task.fallback = qcfg.fallback

    for_each_layer_call(block, layer, inputs, lambda x, out: task.add_batch(x.detach(), out.detach()))
    return task.quantize()[0].reshape(layer.weight.shape).float()


def assert_same_layer_error(ours_cfg: GPTQConfig, **peer) -> None:
    """Our GPTQ with ``ours_cfg`` against GPTQModel's with ``peer`` settings, on tiny Llama's block-0 q_proj and
    gate_proj and the very same inputs: our output error at most 2% above theirs."""
    from gptqmodel import QuantizeConfig

    model, _ = load_model(resolve("tiny-llama").path)
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, calibration_ids(16, 64))
    linears = block_linears(blocks[0], ModuleSelection())
    for name in ("self_attn.q_proj", "mlp.gate_proj"):
        layer = linears[name]
        hessian = collect_hessian(blocks[0], linears, [name], inputs)
        ours = gptq_quantize(layer.weight.data, hessian, ours_cfg).dequantize()
        qcfg = QuantizeConfig(bits=ours_cfg.bits, group_size=32, sym=True, damp_percent=0.01, mse=0.0, device="cpu",
                              **peer)
        theirs = peer_quantize(layer, blocks[0], inputs, qcfg)
        ours_err = output_error(layer.weight.data, ours, hessian)
        theirs_err = output_error(layer.weight.data, theirs, hessian)
        assert ours_err <= 1.02 * theirs_err, f"{name}: ours {ours_err:.4e} vs GPTQModel {theirs_err:.4e}"


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [4, 3])
def test_same_layer_error_as_gptqmodel(act_order, bits):
    assert_same_layer_error(GPTQConfig(bits, 32, act_order=act_order, static_groups=True, group_aware=False),
                            desc_act=act_order, act_group_aware=False)


@pytest.mark.parametrize("bits", [4, 3])
def test_group_aware_order_has_the_layer_error_of_gptqmodels(bits):
    """--group-aware against GPTQModel's act_group_aware (GAR), both with min/max grids: the same order of whole
    groups, so the same output error."""
    assert_same_layer_error(GPTQConfig(bits, 32, sym=True, scale_search="none", act_order=True, group_aware=True),
                            desc_act=False, act_group_aware=True)
