"""Bound rule for dense layers (``nn.Linear`` and subclasses such as orthogonium's ``OrthoLinear``).

h(a) = W a + b, applied by torch to the last axis of the input: one sample of shape (*S, n_in) is P = prod(S)
vectors a_p (P = 1 for a flat input), each mapped to W a_p + b.
Lip = ||W||_2 (block diagonal over the P positions): certified every K steps (``dense_certified_norm``), Weyl
drift in between
(``spectral.CertifiedNormCache``: ||W||_2 <= ||W0||_2 + ||W - W0||_F).
Output: ||h(a)|| <= ||W||_2 X + sqrt(P) ||b|| (the bias is added at P positions).
One sample's gradients, with g_p the gradient at output position p and ||g||^2 = sum_p ||g_p||^2 <= G^2:
dL/dW = sum_p g_p a_p^T, so ||dL/dW||_F <= sum_p ||g_p|| ||a_p|| <= ||g|| ||a|| <= G X (Cauchy-Schwarz);
dL/db = sum_p g_p, so ||dL/db|| <= sqrt(P) ||g|| <= sqrt(P) G (Cauchy-Schwarz; equality for equal g_p).
A biased layer therefore needs the input shape (``input_shape=`` of the analysis); an unbiased one does not.
For a reparametrised weight (W = f(raw)), the bound is on the gradient of the materialised W.
"""

from __future__ import annotations

import math

from torch import nn

from lipdp.bounds.registry import BoundRule, register_bound_rule
from lipdp.bounds.spectral import dense_certified_norm


def _bias_positions(module: nn.Linear, ctx) -> int:
    """Number P of vectors per sample the layer is applied to (the product of all but the last axis)."""
    return math.prod(ctx.input_shape_of(module)[:-1])


@register_bound_rule(nn.Linear)
class LinearRule(BoundRule):
    """``nn.Linear`` (and subclasses keeping its forward): Lip = ||W||_2; weight G X, bias sqrt(P) G."""

    def lipschitz(self, module: nn.Linear, ctx) -> float:
        """Lip = ||W||_2: certified in float64 (``dense_certified_norm``, warm-started from the previous
        computation's singular vector), Weyl drift (c = 1) in between."""
        return ctx.operator_norm(module, "dense", dense_certified_norm, frobenius_factor=1.0)

    def output_bound(self, module: nn.Linear, x_bound: float, ctx) -> float:
        """||W||_2 X + sqrt(P) ||b|| (the bias term only with a bias; added at P positions)."""
        bound = ctx.lipschitz(module) * x_bound
        if module.bias is not None:
            bound += math.sqrt(_bias_positions(module, ctx)) * ctx.parameter_norm(module, "bias")
        return bound

    def param_sensitivities(self, module: nn.Linear, x_bound: float, grad_bound: float, ctx) -> dict[str, float]:
        """weight: G * X_{in} (||sum_p g_p a_p^T||_F <= ||g|| ||a||); bias: sqrt(P) * G
        (P positions, 1 for a flat input)."""
        bounds = {"weight": grad_bound * x_bound}
        if module.bias is not None:
            bounds["bias"] = math.sqrt(_bias_positions(module, ctx)) * grad_bound
        return bounds
