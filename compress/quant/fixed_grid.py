"""GPTQ on grids fixed beforehand: every (row, group of columns) has its step and offset already, and a weight is
``step * code - offset``. The column-by-column error propagation of GPTQ (compress.quant.gptq) then chooses the
codes alone, so the codes GPTQ picks are the codes a format with its own grid rules stores (ggml's K-quants, whose
sub-block scales are small integers under a float16 super-block scale, chosen before any code).

Pure math: (weight, Hessian, grids) -> codes.
"""

from __future__ import annotations

import torch

from compress.quant.gptq import inverse_hessian_factor


def round_on_grid(w: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, levels: int) -> torch.Tensor:
    """Nearest code in 0..levels of ``w`` on ``step * code - offset`` (code 0 where the step is 0). A step may be
    negative (a symmetric format's signed sub-block scale), the codes then running the other way."""
    usable = step != 0
    codes = (w + offset) / torch.where(usable, step, torch.ones_like(step))
    return torch.where(usable, codes.round().clamp(0, levels), torch.zeros_like(codes))


def gptq_fixed_grid(weight: torch.Tensor, hessian: torch.Tensor, step: torch.Tensor, offset: torch.Tensor,
                    group: int, levels: int, damp_percent: float = 0.01, block_size: int = 128) -> torch.Tensor:
    """int32 codes [rows, cols] for ``weight`` [rows, cols], columns in order (no act-order: the groups are the
    format's contiguous columns), each rounded on its group's grid (``step``, ``offset``: [rows, cols / group])
    with the error of the columns before it pushed onto it through the inverse Hessian."""
    rows, cols = weight.shape
    wt = weight.detach().float().t().contiguous()  # [cols, rows]: one contiguous row per input column
    h = hessian.detach().float()
    dead = torch.diag(h) == 0
    wt[dead] = 0  # an input that was never active carries nothing
    h_inv = inverse_hessian_factor(h, damp_percent)
    steps, offsets = step.float().t().contiguous(), offset.float().t().contiguous()  # [groups, rows]
    codes = torch.empty(cols, rows, dtype=torch.int32)
    for b1 in range(0, cols, block_size):
        b2 = min(b1 + block_size, cols)
        w_blk = wt[b1:b2]
        err_blk = torch.empty_like(w_blk)
        h_inv_blk = h_inv[b1:b2, b1:b2]
        for i in range(b2 - b1):
            col = b1 + i
            s, o = steps[col // group], offsets[col // group]
            q = round_on_grid(w_blk[i], s, o, levels)
            codes[col] = q.to(torch.int32)
            err = (w_blk[i] - (s * q - o)) / h_inv_blk[i, i]
            w_blk[i:].addr_(h_inv_blk[i, i:], err, alpha=-1)
            err_blk[i] = err
        wt[b2:].addmm_(h_inv[b1:b2, b2:].t(), err_blk, alpha=-1)
    return codes.t().contiguous()
