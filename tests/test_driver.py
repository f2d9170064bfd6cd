"""The shared layer-by-layer driver on every architecture."""

import pytest
import torch

from compress.errors import UserError
from compress.block_inputs import HessianAccumulator, capture_block_inputs, collect_hessian, linear_call_groups
from compress.models import load_model, resolve
from compress.quant.apply import output_error
from compress.quant.gptq import GPTQConfig, gptq_quantize
from compress.quant.rtn import RTNConfig, rtn_quantize
from compress.select import ModuleSelection, block_linears, find_blocks
from compress.tiny import tiny_config
from tests.conftest import ALL_ARCHS, calibration_ids

EXPECTED_BLOCKS = {"llama": "model.layers", "mistral": "model.layers", "mpt": "transformer.blocks",
                   "falcon": "transformer.h", "gptj": "transformer.h", "gpt_neox": "gpt_neox.layers",
                   "opt": "model.decoder.layers", "bloom": "transformer.h", "bert": "encoder.layer",
                   "mixtral": "model.layers", **dict.fromkeys(["llama3", "qwen2", "qwen3", "gemma2", "gemma3", "phi3",
                                                               "qwen2_moe"], "model.layers")}


@pytest.fixture(scope="module")
def tiny_models():
    return {arch: load_model(resolve(f"tiny-{arch}").path)[0] for arch in ALL_ARCHS}


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_find_blocks(tiny_models, arch):
    prefix, blocks = find_blocks(tiny_models[arch])
    assert prefix == EXPECTED_BLOCKS[arch]
    assert len(blocks) == tiny_config(arch).num_hidden_layers  # 2, and Gemma 3's 6 (its sixth layer is global)


EXPECTED_GROUPS = {
    "llama": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
    # fc1 and fc2 read different tensors that could share an address once the first is freed.
    "opt": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]],
    "falcon": [["self_attention.query_key_value"], ["self_attention.dense"], ["mlp.dense_h_to_4h"],
               ["mlp.dense_4h_to_h"]],
}


@pytest.mark.parametrize("arch", EXPECTED_GROUPS)
def test_groups_follow_call_order_and_shared_inputs(tiny_models, arch):
    model = tiny_models[arch]
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, calibration_ids(2, 16))
    groups = linear_call_groups(blocks[0], block_linears(blocks[0], ModuleSelection()), inputs)
    assert groups == EXPECTED_GROUPS[arch]


def test_selection_patterns(tiny_models):
    _, blocks = find_blocks(tiny_models["llama"])
    chosen = block_linears(blocks[0], ModuleSelection(include=["self_attn.*"], exclude=["*.o_proj"]))
    assert list(chosen) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_gptq_layer_error_below_rtn_on_same_inputs(tiny_models, arch):
    """On the real block-0 inputs of each architecture, every layer of the first group."""
    model = tiny_models[arch]
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, calibration_ids(8, 64))
    assert len(inputs.hidden) == 8
    linears = block_linears(blocks[0], ModuleSelection())
    groups = linear_call_groups(blocks[0], linears, inputs)
    assert sorted(sum(groups, [])) == sorted(linears)  # every layer is visited exactly once
    h = collect_hessian(blocks[0], linears, groups[0], inputs)
    for name in groups[0]:
        w = linears[name].weight.data
        assert torch.all(torch.diag(h) >= 0) and h.abs().sum() > 0
        gptq = output_error(w, gptq_quantize(w, h, GPTQConfig(bits=3, group_size=32)).dequantize(), h)
        rtn = output_error(w, rtn_quantize(w, RTNConfig(bits=3, group_size=32)).dequantize(), h)
        assert gptq < rtn, f"{arch} {name}: GPTQ {gptq:.3e} vs RTN {rtn:.3e}"


def test_hessian_accumulator_is_running_mean_of_2xxT():
    x = torch.randn(3, 10, 8)
    acc = HessianAccumulator(8, torch.device("cpu"))
    for part in x:
        acc.add(part)
    flat = x.reshape(-1, 8)
    assert torch.allclose(acc.h, 2 * flat.t() @ flat / flat.shape[0], atol=1e-5)


def test_expert_groups_follow_the_router_and_count_their_tokens():
    """Experts (one linear per expert after unfusing) are grouped by structure where the experts module is
    called: gate and up of each expert together, then its down; each sees only the tokens routed to it."""
    import torch

    from compress.block_inputs import accumulate_hessian
    from compress.lazy import LazyModel

    lazy = LazyModel(resolve("tiny-mixtral").path, torch.float32)
    lazy.materialize_all()
    model = lazy.model
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, calibration_ids(4, 32))
    linears = block_linears(blocks[0], ModuleSelection())
    groups = linear_call_groups(blocks[0], linears, inputs)
    experts = [[f"mlp.experts.{e}.gate_proj", f"mlp.experts.{e}.up_proj"] for e in range(4)]
    expected = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"]]
    for e in range(4):
        expected += [experts[e], [f"mlp.experts.{e}.down_proj"]]
    assert groups == expected
    assert "mlp.gate" not in str(groups)  # the router is no nn.Linear: it stays in float
    counts = [accumulate_hessian(blocks[0], linears, experts[e], inputs).n for e in range(4)]
    assert sum(counts) == 4 * 32 * 2  # every token goes to 2 of the 4 experts
    assert all(0 < c < 4 * 32 for c in counts)


class _FailingHidden(list):
    """Where the first block's hidden states go (an Activations spilling to disk, in a run): fails as told."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    def append(self, item) -> None:
        raise self.error


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), torch.OutOfMemoryError("CUDA out of memory"),
                                   RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory"),
                                   MemoryError(), UserError("a check of ours")])
def test_capture_lets_the_machines_limits_and_our_errors_through(tiny_models, error):
    """Only errors of the model call mean 'untraceable': a full disk while spilling, out of memory or a UserError
    of ours keeps its own type and message."""
    model = tiny_models["llama"]
    _, blocks = find_blocks(model)
    with pytest.raises(type(error)) as raised:
        capture_block_inputs(model, blocks, calibration_ids(2, 16), first_block_output=lambda c: blocks[0](
            c.hidden[0], *c.args[0], **c.kwargs[0]), hidden=_FailingHidden(error))
    assert raised.value is error


def test_capture_names_an_untraceable_model(tiny_models, monkeypatch):
    model = tiny_models["llama"]
    _, blocks = find_blocks(model)
    real, calls = model.model.rotary_emb.forward, []

    def rotary(*args, **kwargs):  # traced once for block 0's real run, then fails under the stand-ins
        calls.append(1)
        if len(calls) > 1:
            raise TypeError("odd call")
        return real(*args, **kwargs)

    monkeypatch.setattr(model.model.rotary_emb, "forward", rotary)
    with pytest.raises(UserError, match=r"could not be traced through the model's forward \(TypeError: odd call\)"):
        capture_block_inputs(model, blocks, calibration_ids(2, 16), first_block_output=lambda c: blocks[0](
            c.hidden[0], *c.args[0], **c.kwargs[0]))


def test_the_driver_knows_blocks_and_layers_not_methods():
    """Everything compress.driver imports, at any depth and inside functions too, stays clear of the methods,
    their registry and the run settings: no import circle runs through the driver."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def imports(module: str) -> set[str]:
        path = root / Path(*module.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            found.update(n for n in names if n.startswith("compress.") and (
                (root / Path(*n.split("."))).with_suffix(".py").is_file() or (root / Path(*n.split("."))).is_dir()))
        return found

    seen, todo = set(), ["compress.driver"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(imports(module))
    assert not {m for m in seen if m.startswith(("compress.quant", "compress.prune")) or m in (
        "compress.registry", "compress.settings", "compress.api")}, sorted(seen)
