"""Per-record gradients of dense and convolution layers from the rows the training pass already computed.

For a layer reached by record r's rows at positions p (the output positions of a convolution, each input row a_rp
its unfolded patch; K views add K x P rows), the gradient of the weight is W_r = sum_p g_rp a_rp^T and of the bias
b_r = sum_p g_rp, with g_rp the gradient of the layer's output row (Goodfellow 2015, "Efficient per-example gradient
computations"). With one row per record (a dense layer, one view) ||W_r|| = ||g_r|| ||a_r|| exactly (the norm
identity of ghost clipping, Li et al. 2022, "Large Language Models Can Be Strong Differentially Private Learners"),
so nothing per record is formed; otherwise W_r is formed by one einsum over the record's rows.
The clipped sum sum_r c_r W_r is then one einsum of the rows with the factors folded into g: no per-sample replay.

Float error: every norm is computed in float64 from the float32 rows (exact casts), so each is within a relative
n 2^-53 of the exact norm of the formed tensor; a formed W_r is itself within gamma_n ||G_r|| ||A_r|| of the exact
sum (Higham 2002, §3.1, n = K P products per entry, any summation order). ``record_norm_bounds`` adds both, with
``FLOAT64_MARGIN`` >= gamma_n for n <= ``MAX_ROWS``, so it returns upper bounds on the exact norms of the
records' gradients as functions of the captured rows.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

#: Rows one record may bring to one layer (K views x P positions) for the float64 margin below to hold.
MAX_ROWS = 2**20
#: >= gamma_n = n u / (1 - n u) for u = 2^-53 and n <= MAX_ROWS (4x over), and >= the relative error of a float64
#: norm of a float64 tensor of fewer than 2^22 entries.
FLOAT64_MARGIN = 2.0**-30
#: Formed per-record weight gradients are held at most this many float64 numbers at a time: memory, not results.
CHUNK_ELEMENTS = 2**25


def supported(module: nn.Module) -> bool:
    """A layer whose per-record gradients this module forms: ``nn.Linear``, or ``nn.Conv2d`` with one group."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def layer_rows(module: nn.Module, inputs: torch.Tensor, grad_outputs: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, G) of shapes (N, P, I) and (N, P, O): the input rows (unfolded patches for a convolution) and output
    gradient rows of a supported layer for the N rows of its batch; None if they do not match (then the caller
    falls back to torch.func)."""
    n = inputs.shape[0]
    if isinstance(module, nn.Linear):
        rows, grads = inputs.reshape(n, -1, module.in_features), grad_outputs.reshape(n, -1, module.out_features)
    else:
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        padded = F.pad(inputs, module._reversed_padding_repeated_twice, mode=mode)
        rows = F.unfold(padded, module.kernel_size, dilation=module.dilation, stride=module.stride).transpose(1, 2)
        grads = grad_outputs.reshape(n, module.out_channels, -1).transpose(1, 2)
    return (rows, grads) if rows.shape[1] == grads.shape[1] else None


def _per_record(rows: torch.Tensor, views: int) -> torch.Tensor:
    """(N, P, D) view-major rows (record j's views are rows k * R + j) -> (R, K P, D): each record's rows."""
    n, p, d = rows.shape
    return rows.reshape(views, n // views, p, d).transpose(0, 1).reshape(n // views, views * p, d)


def record_norm_bounds(rows: torch.Tensor, grads: torch.Tensor, views: int, bias: bool) -> torch.Tensor:
    """Upper bounds (float64, shape (R,)) on ||W_r||^2 + ||b_r||^2 (the bias term if ``bias``) for each record r
    of a layer's rows (module docstring)."""
    a, g = _per_record(rows, views).double(), _per_record(grads, views).double()
    if a.shape[1] > MAX_ROWS:
        raise ValueError(f"{a.shape[1]} rows per record exceed the float64 margin's {MAX_ROWS}")
    a_sq, g_sq = a.pow(2).sum(dim=(1, 2)), g.pow(2).sum(dim=(1, 2))
    if a.shape[1] == 1:  # ||g a^T|| = ||g|| ||a||, ||b|| = ||g||
        squares = g_sq * a_sq + (g_sq if bias else 0.0)
        return squares * (1.0 + FLOAT64_MARGIN) ** 2
    chunk = max(1, CHUNK_ELEMENTS // (g.shape[2] * a.shape[2]))
    weight = torch.cat([torch.einsum("rpo,rpi->roi", g[start:start + chunk], a[start:start + chunk])
                        .pow(2).sum(dim=(1, 2)) for start in range(0, len(a), chunk)]).sqrt()
    weight = weight * (1.0 + FLOAT64_MARGIN) + FLOAT64_MARGIN * (g_sq * a_sq).sqrt()
    squares = weight.pow(2)
    if bias:
        ones = a.shape[1] ** 0.5  # ||G_r|| ||1|| bounds the bias sum's rounding as ||G_r|| ||A_r|| does W_r's
        summed = g.sum(dim=1).pow(2).sum(dim=1).sqrt()
        squares = squares + (summed * (1.0 + FLOAT64_MARGIN) + FLOAT64_MARGIN * ones * g_sq.sqrt()).pow(2)
    return squares


def clipped_sums(module: nn.Module, rows: torch.Tensor, grads: torch.Tensor, factors: torch.Tensor, views: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum_r c_r W_r, sum_r c_r b_r) shaped like the layer's weight and bias (None without a bias), for the
    records' clipping factors c (shape (R,))."""
    weighted = grads * factors.to(grads.dtype).repeat(views)[:, None, None]
    weight = torch.einsum("npo,npi->oi", weighted, rows)
    if isinstance(module, nn.Conv2d):
        weight = weight.reshape(module.out_channels, module.in_channels, *module.kernel_size)
    bias = weighted.sum(dim=(0, 1)) if module.bias is not None else None
    return weight, bias
