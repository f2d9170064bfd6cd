"""The written checkpoint loads in the ecosystem's loaders and agrees with ours."""

import json
import os

import pytest
import torch

from compress.api import QuantizeRequest, quantize
from compress.checkpoint import load_quantized
from tests.conftest import CAUSAL_ARCHS

pytest.importorskip("gptqmodel", reason="install the [gptqmodel] extra")
pytest.importorskip("optimum", reason="install the [gptqmodel] extra")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")

# transformers hands GPTQ loading to optimum, which replaces only exact nn.Linear modules; Falcon's
# layers are a subclass (FalconLinear), and transformers 5 fuses Mixtral's experts into 3-D tensors that
# no GPTQ layer replaces, so those checkpoints load through GPTQModel.load instead.
TRANSFORMERS_ARCHS = [a for a in CAUSAL_ARCHS if a not in ("falcon", "mixtral")]


def quantized(arch, tmp_path, calib_file, **kw):
    settings = dict(model=arch if "/" in arch else f"tiny-{arch}", method="gptq", bits=4, group_size=32, calib=str(calib_file), nsamples=8,
                    seqlen=64, out=str(tmp_path / arch), progress=False, device="cpu")
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
        # The automatic CPU kernel computes in bf16: agreement to ~1e-3 of the logit scale.
        assert relative_gap(theirs(ids).logits, ours(ids).logits) < 5e-3


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
