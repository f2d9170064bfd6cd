"""GPTQ on grids fixed beforehand: with uncorrelated inputs (a diagonal Hessian) it is plain rounding on the grids;
with correlated ones its codes cost less output error than rounding on the very same grids."""

import torch

from compress.quant.fixed_grid import gptq_fixed_grid, round_on_grid


def grids(weight: torch.Tensor, group: int, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = weight.shape
    w = weight.reshape(rows, cols // group, group)
    low = w.amin(-1).clamp(max=0)
    step = (w.amax(-1) - low) / levels
    return step, -low


def expanded(values: torch.Tensor, group: int) -> torch.Tensor:
    return values.repeat_interleave(group, dim=1)


def test_a_diagonal_hessian_gives_plain_rounding_on_the_grids():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 64, generator=g)
    step, offset = grids(weight, 16, 15)
    hessian = torch.diag(torch.rand(64, generator=g) + 0.5)
    codes = gptq_fixed_grid(weight, hessian, step, offset, 16, 15)
    assert torch.equal(codes, round_on_grid(weight, expanded(step, 16), expanded(offset, 16), 15).to(torch.int32))


def test_correlated_inputs_cost_less_output_error_than_rounding_on_the_same_grids():
    g = torch.Generator().manual_seed(0)
    cols = 128
    inputs = torch.randn(2048, cols, generator=g) @ (torch.eye(cols) + torch.randn(cols, cols, generator=g) / 8)
    hessian = inputs.t() @ inputs / inputs.shape[0]
    weight = torch.randn(32, cols, generator=g)
    step, offset = grids(weight, 32, 15)
    s, o = expanded(step, 32), expanded(offset, 32)

    def output_error(codes: torch.Tensor) -> float:
        delta = s * codes.float() - o - weight
        return float(torch.trace(delta @ hessian @ delta.t()))

    gptq = output_error(gptq_fixed_grid(weight, hessian, step, offset, 32, 15))
    rounded = output_error(round_on_grid(weight, s, o, 15))
    assert gptq < 0.9 * rounded
    # A negative step (a symmetric format's signed scale) runs the codes the other way, and still rounds to nearest.
    assert torch.equal(round_on_grid(torch.tensor([0.26]), torch.tensor([-0.1]), torch.tensor([-0.4]), 7),
                       torch.tensor([1.0]))
