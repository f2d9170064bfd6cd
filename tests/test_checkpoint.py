"""The GPTQ-format checkpoint (--format gptq) loads in the ecosystem's loaders and agrees with ours
(the default compressed-tensors format: tests/formats/)."""

import json
import os

import pytest
import torch

from compress.api import QuantizeRequest, quantize
from compress.checkpoint import load_quantized
from compress.formats import TRANSFORMERS_CANNOT
from tests.conftest import CAUSAL_ARCHS

pytest.importorskip("gptqmodel", reason="install the [gptqmodel] extra")
pytest.importorskip("optimum", reason="install the [gptqmodel] extra")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")

# transformers hands GPTQ loading to optimum, which replaces only exact nn.Linear modules; Falcon's
# layers are a subclass (FalconLinear), and transformers 5 fuses Mixtral's experts into 3-D tensors that
# no GPTQ layer replaces, so those checkpoints load through GPTQModel.load instead.
TRANSFORMERS_ARCHS = [a for a in CAUSAL_ARCHS if a not in TRANSFORMERS_CANNOT]


def quantized(arch, tmp_path, calib_file, **kw):
    settings = dict(model=arch if "/" in arch else f"tiny-{arch}", method="gptq", bits=4, group_size=32,
                    calib=str(calib_file), nsamples=8, seqlen=64, out=str(tmp_path / arch), progress=False,
                    device="cpu", format="gptq")
    settings.update(kw)
    return quantize(QuantizeRequest(**settings)).folder


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("arch", TRANSFORMERS_ARCHS)
def test_transformers_from_pretrained_agrees_with_our_loader(arch, tmp_path, calib_file):
    from transformers import AutoModelForCausalLM

    folder = quantized(arch, tmp_path, calib_file)
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(1))
    ours, _ = load_quantized(folder)
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    kernels = {type(m).__name__ for m in theirs.modules() if hasattr(m, "qweight")}
    assert kernels, "transformers did not put GPTQ modules in place"
    with torch.no_grad():
        # The automatic CPU kernel computes in bf16: agreement to a few 1e-3 of the logit scale (GPT-J 5.8e-3 with 2
        # threads, under 5e-3 with 1: the order bf16 products are summed in moves it); a wrong code is far more.
        # Gemma's scaled embedding and soft-capping take more from bf16: our own loader in bf16 is 1.4e-2 (Gemma 3)
        # and 1.1e-2 (Gemma 2) from itself in fp32.
        tolerance = 2.5e-2 if arch.startswith("gemma") else 1e-2
        assert relative_gap(theirs(ids).logits, ours(ids).logits) < tolerance


def test_partial_group_checkpoint_loads_in_transformers(tmp_path, calib_file):
    """96-wide inputs at group 64 (like SmolLM2's 576 at 128): a partial last group, which
    llm-compressor refuses and the automatic CPU kernel (torch int4 pack-mm) can fail on: the
    checkpoint names GPTQModel's torch kernel, loads and agrees."""
    from transformers import AutoModelForCausalLM

    from compress.tiny import tiny_config, tiny_tokenizer

    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size = 96, 192
    source = tmp_path / "wide"
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    folder = quantized(str(source), tmp_path, calib_file, group_size=64, out=str(tmp_path / "q"))
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qcfg["backend"] == "torch"
    ids = torch.randint(0, 512, (1, 16))
    ours, _ = load_quantized(folder)
    assert ours.model.layers[0].self_attn.q_proj.scales.shape[0] == 2  # groups of 64 and 32
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        assert relative_gap(theirs(ids).logits, ours(ids).logits) < 5e-3


@pytest.mark.parametrize("arch", ["falcon", "mixtral"])
def test_gptqmodel_loads_what_transformers_cannot(arch, tmp_path, calib_file):
    from gptqmodel import BACKEND, GPTQModel

    folder = quantized(arch, tmp_path, calib_file)
    ids = torch.randint(0, 512, (1, 16))
    ours, _ = load_quantized(folder)
    theirs = GPTQModel.load(str(folder), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
    with torch.no_grad():
        assert relative_gap(theirs.model(ids).logits, ours(ids).logits) < 5e-3


def one_signed_rows_model(tmp_path):
    """A tiny Llama in which the first rows of every linear are all positive or all negative: their
    asymmetric zero points sit at the ends of the code range (0 and the top code), the case the GPTQ v1
    layout cannot store for every loader."""
    from transformers import AutoModelForCausalLM

    from compress.tiny import tiny_config, tiny_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not model.lm_head:
                module.weight[:8] = module.weight[:8].abs() + 0.01
                module.weight[8:16] = -module.weight[8:16].abs()
    source = tmp_path / "signed"
    model.save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    return source


def worst_weight_gap_in_steps(theirs: torch.nn.Module, ours: torch.nn.Module) -> float:
    """Largest |their weight - ours| over every packed layer, in units of that weight's quantization step.
    Their kernels round in half precision (up to about an eighth of a step here); a misread zero point is a
    whole step."""
    worst = 0.0
    for name, module in theirs.named_modules():
        if not hasattr(module, "qweight"):
            continue
        mine = ours.get_submodule(name)
        qw = mine.quantized_weight()
        eye = torch.eye(mine.in_features, dtype=module.scales.dtype)
        bias = module.bias.float()[:, None] if getattr(module, "bias", None) is not None else 0
        their_weight = module(eye).float().t() - bias
        step = qw.scale.t()[:, qw.g_idx.long()]
        worst = max(worst, float(((their_weight - mine.dequantized_weight()).abs() / step).max()))
    return worst


def assert_transformers_and_gptqmodel_agree(folder, ours, ids) -> None:
    """transformers and GPTQModel read ``folder``: every weight within half a quantization step of ours (their
    kernels round in half precision), and the logits within 1%."""
    from gptqmodel import BACKEND, GPTQModel
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        expected = ours(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        assert worst_weight_gap_in_steps(theirs, ours) < 0.5
        assert relative_gap(theirs(ids).logits, expected) < 1e-2
        del theirs
        peer = GPTQModel.load(str(folder), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
        assert worst_weight_gap_in_steps(peer.model, ours) < 0.5
        assert relative_gap(peer.model(ids).logits, expected) < 1e-2


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_asymmetric_checkpoints_load_in_transformers_and_gptqmodel(bits, method, tmp_path, calib_file):

    source = one_signed_rows_model(tmp_path)
    folder = quantized(str(source), tmp_path, calib_file, method=method, bits=bits, sym=False,
                       scale_search="mse", out=str(tmp_path / "q"))
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qcfg["sym"] is False and qcfg["checkpoint_format"] == "gptq_v2"
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(1))
    ours, _ = load_quantized(folder)
    zeros = [m.quantized_weight().zero for m in ours.modules() if hasattr(m, "qzeros")]
    assert min(float(z.min()) for z in zeros) == 0 and max(float(z.max()) for z in zeros) == 2**bits - 1
    assert_transformers_and_gptqmodel_agree(folder, ours, ids)


def test_mixed_precision_checkpoint_loads_in_gptqmodel(tmp_path, calib_file):
    from gptqmodel import BACKEND, GPTQModel

    folder = quantized("llama", tmp_path, calib_file, avg_bits=4.9)
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qcfg.get("dynamic"), "the budget should have given some layers other bits"
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(1))
    ours, _ = load_quantized(folder)
    peer = GPTQModel.load(str(folder), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
    bits = {name: m.bits for name, m in peer.model.named_modules() if hasattr(m, "qweight")}
    assert len(set(bits.values())) > 1
    assert bits == {name: m.bits for name, m in ours.named_modules() if hasattr(m, "qweight")}
    with torch.no_grad():
        assert worst_weight_gap_in_steps(peer.model, ours) < 0.5
        assert relative_gap(peer.model(ids).logits, ours(ids).logits) < 1e-2


@pytest.mark.parametrize("method", ["awq", "gptq-after-awq"])
def test_awq_checkpoints_load_in_transformers_and_gptqmodel(method, tmp_path, calib_file):
    """AWQ folds its scales into the producers and writes the same GPTQ layout: transformers and GPTQModel read
    it and agree with our loader, weight by weight and on the logits."""
    kw = dict(method="awq") if method == "awq" else dict(method="gptq", awq=True)
    folder = quantized("llama", tmp_path, calib_file, bits=4, sym=False, **kw)
    manifest = json.loads((folder / "compress_manifest.json").read_text())
    assert [s for s in manifest["awq_scales"] if s["ratio"] is not None], "nothing was scaled: not an AWQ test"
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(1))
    ours, _ = load_quantized(folder)
    assert_transformers_and_gptqmodel_agree(folder, ours, ids)
