"""Bound rule for dense layers (``nn.Linear`` and subclasses such as orthogonium's ``OrthoLinear``).

h(a) = W a + b.  Lip = ||W||_2 (exact SVD, cached with Weyl drift).  Output: ||h(a)|| <= ||W||_2 X + ||b||.
One sample's gradients: dL/dW = g a^T, so ||dL/dW||_F = ||g|| ||a|| <= G X;  dL/db = g, so <= G.
For a reparametrised weight (W = f(raw)), the bound is on the gradient of the materialised W.
"""

from __future__ import annotations

from torch import nn

from lipdp.bounds.registry import BoundRule, register_bound_rule
from lipdp.bounds.spectral import dense_operator_norm


@register_bound_rule(nn.Linear)
class LinearRule(BoundRule):
    def lipschitz(self, module: nn.Linear, ctx) -> float:
        return ctx.norm_cache.bound(module, "dense", ctx.weight(module), dense_operator_norm, frobenius_factor=1.0)

    def output_bound(self, module: nn.Linear, x_bound: float, ctx) -> float:
        bias = 0.0 if module.bias is None else module.bias.detach().norm().item()
        return ctx.lipschitz(module) * x_bound + bias

    def param_sensitivities(self, module: nn.Linear, x_bound: float, grad_bound: float, ctx) -> dict[str, float]:
        bounds = {"weight": grad_bound * x_bound}
        if module.bias is not None:
            bounds["bias"] = grad_bound
        return bounds
