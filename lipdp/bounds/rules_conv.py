"""Bound rule for 2-D convolutions (``nn.Conv2d`` and orthogonium's ``AdaptiveOrthoConv2d`` family).

Lip: the certified norm of the real operator on this input size (``spectral.conv2d_certified_norm``).
One sample's gradients, with g the gradient at the output and x the input (docs/design.md §2):
dL/dW[:, :, a, b] = sum_i g_i x_{s i + d (a,b) - p}^T, hence ||dL/dW||_F <= sqrt(m) ||g|| ||x|| <= sqrt(m) G X,
where m = max number of (tap, output position) pairs reading one input pixel (``patch_count``:
ceil(kh/s) ceil(kw/s) for stride s without dilation or wrap-around).
dL/db[o] = sum_i g[o, i], hence ||dL/db|| <= sqrt(P_out) G (Cauchy-Schwarz over the P_out positions).
Output: ||conv(x) + b|| <= Lip X + sqrt(P_out) ||b||.
"""

from __future__ import annotations

import math

from torch import nn

from lipdp.bounds.registry import BoundRule, UnsupportedModuleError, register_bound_rule
from lipdp.bounds.spectral import ConvGeometry, conv2d_certified_norm


@register_bound_rule(nn.Conv2d)
class Conv2dRule(BoundRule):
    """``nn.Conv2d`` (and subclasses keeping its forward): Lip = certified operator norm;
    weight sqrt(m) G X, bias sqrt(P_out) G."""

    def check(self, module: nn.Conv2d, path: str) -> None:
        """Refuse reflect/replicate padding: only padding_mode 'zeros' or 'circular'."""
        if module.padding_mode not in ("zeros", "circular"):
            raise UnsupportedModuleError(
                path, module, f"padding_mode={module.padding_mode!r} copies pixels and raises the Lipschitz constant.",
                "use padding_mode='zeros' (or 'circular').",
            )

    @staticmethod
    def _geometry(module: nn.Conv2d, ctx) -> ConvGeometry:
        return ConvGeometry.of(module, ctx.input_shape_of(module)[-2:])

    def lipschitz(self, module: nn.Conv2d, ctx) -> float:
        """Lip = certified ||conv||_2 on this input size (FFT, ``conv2d_certified_norm``, warm-started), with Weyl drift
        c = sqrt(m) between exact computations."""
        geometry = self._geometry(module, ctx)
        count = geometry.patch_count(tuple(module.kernel_size))
        return ctx.operator_norm(module, geometry,
                                 lambda weight, start: conv2d_certified_norm(weight, geometry, start),
                                 frobenius_factor=math.sqrt(count))

    def output_bound(self, module: nn.Conv2d, x_bound: float, ctx) -> float:
        """Lip * X + sqrt(P_out) ||b|| (the bias term only with a bias; P_out output positions)."""
        bound = ctx.lipschitz(module) * x_bound
        if module.bias is not None:
            positions = math.prod(ctx.output_shape_of(module)[-2:])
            bound += math.sqrt(positions) * ctx.parameter_norm(module, "bias")
        return bound

    def param_sensitivities(self, module: nn.Conv2d, x_bound: float, grad_bound: float, ctx) -> dict[str, float]:
        """weight: sqrt(m) * G * X_{in} (||G^T U||_F <= ||G||_F ||U||_F, m = ``patch_count``);
        bias: sqrt(P_out) * G."""
        geometry = self._geometry(module, ctx)
        count = geometry.patch_count(tuple(module.kernel_size))
        bounds = {"weight": math.sqrt(count) * grad_bound * x_bound}
        if module.bias is not None:
            positions = math.prod(ctx.output_shape_of(module)[-2:])
            bounds["bias"] = math.sqrt(positions) * grad_bound
        return bounds
