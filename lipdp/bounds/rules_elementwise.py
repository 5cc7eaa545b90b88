"""Bound rules for parameter-free maps: activations, reshapes, max pooling.

* ReLU, Tanh, Identity, Flatten, Unflatten, orthogonium ``Abs``: 1-Lipschitz and |h(t)| <= |t|, so
  ||h(a)|| <= ||a||.
* LeakyReLU(slope): Lip = max(1, |slope|), ||h(a)|| <= Lip ||a||.
* orthogonium ``MaxMin`` (GroupSort of size 2): per input a permutation, so Lip = 1 and ||h(a)|| = ||a||.
* Dropout in eval mode is the identity; in train mode it is refused (random rescaling by 1/(1-p)).
* MaxPool2d: each output is the max of one patch, |max(u) - max(v)| <= ||u - v||, and every input pixel is in
  at most m patches, so Lip <= sqrt(m) and ||h(a)|| <= sqrt(m) ||a|| (m = 1 when kernel == stride). The
  padding is -inf, so a window with at least one real pixel maps 0 to 0 and padded taps do not count; m is
  counted on the real output windows (ceil_mode=True included).
"""

from __future__ import annotations

import math

from orthogonium.layers import Abs, MaxMin
from torch import nn

from lipdp.bounds.registry import BoundRule, UnsupportedModuleError, register_bound_rule
from lipdp.bounds.spectral import ConvGeometry


@register_bound_rule(nn.ReLU, nn.Tanh, nn.Identity, nn.Flatten, nn.Unflatten, Abs, MaxMin)
class NonExpansiveRule(BoundRule):
    """1-Lipschitz maps with ||h(a)|| <= ||a||: the BoundRule defaults."""


@register_bound_rule(nn.LeakyReLU)
class LeakyReLURule(BoundRule):
    """``nn.LeakyReLU``: Lip = max(1, |slope|), ||h(a)|| <= Lip ||a||, no parameters."""

    def lipschitz(self, module: nn.LeakyReLU, ctx) -> float:
        """Lip = max(1, |negative_slope|)."""
        return max(1.0, abs(module.negative_slope))


@register_bound_rule(nn.Dropout)
class DropoutRule(BoundRule):
    """``nn.Dropout``: the identity in eval mode (or with p = 0); refused in training mode with p > 0."""

    def check(self, module: nn.Dropout, path: str) -> None:
        """Refuse training mode with p > 0 (random rescaling by 1/(1-p))."""
        if module.training and module.p > 0:
            raise UnsupportedModuleError(
                path, module, "dropout in training mode rescales activations at random by 1/(1-p).",
                "remove the Dropout layer (DP noise already regularises) or set p=0.",
            )


@register_bound_rule(nn.MaxPool2d)
class MaxPool2dRule(BoundRule):
    """``nn.MaxPool2d``: Lip = sqrt(m), m the most windows one input pixel is in; ||h(a)|| <= sqrt(m) ||a||."""

    def check(self, module: nn.MaxPool2d, path: str) -> None:
        """Refuse return_indices=True (the output is a tuple)."""
        if module.return_indices:
            raise UnsupportedModuleError(path, module, "return_indices=True returns a tuple.", "set return_indices=False.")

    def lipschitz(self, module: nn.MaxPool2d, ctx) -> float:
        """Lip = sqrt(m), m = max number of real output windows reading one input pixel (recorded output size,
        so ceil_mode counts; 1 when kernel == stride)."""
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
        padding = pair(module.padding)
        geometry = ConvGeometry(
            stride=pair(module.stride or module.kernel_size),
            dilation=pair(module.dilation),
            padding=(padding[0], padding[0], padding[1], padding[1]),
            padding_mode="zeros",
            groups=1,
            input_hw=tuple(ctx.input_shape_of(module)[-2:]),
        )
        # The recorded output size, not the floor formula: with ceil_mode=True torch adds a last window
        # that runs past the input, and it can make some pixel belong to one more window.
        return math.sqrt(geometry.patch_count(pair(module.kernel_size), ctx.output_shape_of(module)[-2:]))
