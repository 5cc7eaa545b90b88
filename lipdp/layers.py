"""lipdp's own Lipschitz layers. Each implements the bound protocol of ``lipdp.bounds.registry``.

All are ``torch.nn.Module``s built from plain tensor ops (``torch.compile`` friendly).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from lipdp.bounds.registry import UnsupportedModuleError


def _per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


class NonExpansive(nn.Module):
    """Base of parameter-free lipdp layers that are 1-Lipschitz with ||h(a)|| <= ||a|| (the bound protocol's
    answers for such a map: Lip = 1, output bound = input bound, no parameters)."""

    def lipschitz(self, ctx=None) -> float:
        """Lipschitz constant: 1."""
        return 1.0

    def output_bound(self, x_bound: float, ctx=None) -> float:
        """Output-norm bound: the input bound ``x_bound`` (non-expansive, maps 0 to 0)."""
        return x_bound

    def param_sensitivities(self, x_bound: float, grad_bound: float, ctx=None) -> dict[str, float]:
        """No parameters, so no sensitivities: ``{}``."""
        return {}


class InputNormClip(NonExpansive):
    """Bounds each sample's L2 norm by ``bound``: the input layer that makes X_0 hold for any data.

    * ``mode="clip"``: x * min(1, bound / ||x||), the projection onto the ball (1-Lipschitz).
    * ``mode="scale"``: x * bound / ||x|| (every non-zero sample on the sphere). Not Lipschitz near 0, so it
      must come before every trainable layer (its Lipschitz constant is reported as infinite).
    A per-sample map: it costs no privacy (docs/design.md §2).
    """

    def __init__(self, bound: float, mode: Literal["clip", "scale"] = "clip") -> None:
        super().__init__()
        if not bound > 0:
            raise ValueError(f"InputNormClip bound must be > 0, got {bound}")
        if mode not in ("clip", "scale"):
            raise ValueError(f"InputNormClip mode must be 'clip' or 'scale', got {mode!r}")
        self.bound = float(bound)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each sample projected onto the ``bound``-ball ("clip") or, if non-zero, rescaled onto its sphere ("scale")."""
        norms = _per_sample_norm(x)
        if self.mode == "clip":
            factor = (self.bound / norms.clamp_min(1e-12)).clamp(max=1.0)
        else:
            factor = torch.where(norms > 0, self.bound / norms.clamp_min(1e-12), torch.zeros_like(norms))
        return x * factor

    def lipschitz(self, ctx=None) -> float:
        """1 for "clip" (a projection onto a convex set); infinite for "scale" (not Lipschitz near 0)."""
        return 1.0 if self.mode == "clip" else math.inf

    def output_bound(self, x_bound: float, ctx=None) -> float:
        """min(x_bound, bound) for "clip"; ``bound`` for "scale", whatever the input."""
        return min(x_bound, self.bound) if self.mode == "clip" else self.bound

    def extra_repr(self) -> str:
        """``bound`` and ``mode``, for the module's repr."""
        return f"bound={self.bound}, mode={self.mode!r}"


class SampleCentring(NonExpansive):
    """Each sample minus its own mean over all its coordinates: h(x) = x - mean(x) 1 = (I - 1 1^T / d) x.

    An orthogonal projection (onto the sum-zero hyperplane), so Lip = 1 and ||h(a)|| <= ||a||; it uses no data
    but the sample itself, so it costs no privacy. It removes the image's brightness, which the bias-free layers
    after it would otherwise have to spend their norm budget on.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x - mean(x), the mean over every dimension but the batch's."""
        return x - x.mean(dim=tuple(range(1, x.dim())), keepdim=True)


class GroupSort(NonExpansive):
    """Sorts channels (dim 1) within groups of ``group_size`` (Anil et al. 2019, "Sorting out Lipschitz
    function approximation"). Per input a permutation: Lip = 1 and ||h(a)|| = ||a||; gradient-norm preserving.
    ``group_size=2`` is MaxMin on adjacent pairs.
    """

    def __init__(self, group_size: int = 2) -> None:
        super().__init__()
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2, got {group_size}")
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Channels sorted in descending order within each group; raises if C is not a multiple of ``group_size``."""
        channels = x.shape[1]
        if channels % self.group_size:
            raise ValueError(f"GroupSort: {channels} channels are not divisible by group_size={self.group_size}")
        grouped = x.reshape(x.shape[0], channels // self.group_size, self.group_size, *x.shape[2:])
        return grouped.sort(dim=2, descending=True).values.reshape(x.shape)


class L2NormPool2d(NonExpansive):
    """Non-overlapping L2-norm pooling: each output is the L2 norm of one k x k patch of one channel.

    Computed as sqrt(sum of squares + eps) - sqrt(eps), which is smooth at 0, never above the patch norm and
    1-Lipschitz in the patch (its gradient v / sqrt(||v||^2 + eps) has norm < 1). Patches are disjoint
    (stride = kernel), so the whole map is 1-Lipschitz with ||h(a)|| <= ||a||.
    """

    def __init__(self, kernel_size: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.kernel_size = int(kernel_size)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H // k, W // k): sqrt(sum of squares over each k x k patch + eps) - sqrt(eps)."""
        k = self.kernel_size
        sum_sq = F.avg_pool2d(x * x, k, stride=k) * (k * k)
        return torch.sqrt(sum_sq + self.eps) - math.sqrt(self.eps)

    def extra_repr(self) -> str:
        """``kernel_size``, for the module's repr."""
        return f"kernel_size={self.kernel_size}"


class GlobalL2Pool2d(NonExpansive):
    """(N, C, H, W) -> (N, C): the L2 norm of each channel map. 1-Lipschitz, ||h(a)|| <= ||a|| (as above)."""

    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """sqrt(sum over H, W of x^2 + eps) - sqrt(eps), per sample and channel."""
        return torch.sqrt((x * x).sum(dim=(2, 3)) + self.eps) - math.sqrt(self.eps)


class ConvexResidual(nn.Module):
    """y = (1 - alpha) x + alpha f(x), a convex mix of the identity and a block f (same shapes).

    Rule: Lip <= (1 - alpha) + alpha Lip(f); ||y|| <= (1 - alpha) X + alpha out_f(X); the gradient reaching
    f's output is alpha times the one at y, so f's parameters get bounds from (X, alpha G).
    With a 1-Lipschitz f the block is 1-Lipschitz for any alpha in [0, 1].
    """

    def __init__(self, block: nn.Module, alpha: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.block = block
        self.alpha = float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(1 - alpha) x + alpha f(x)."""
        return (1 - self.alpha) * x + self.alpha * self.block(x)

    def lipschitz(self, ctx) -> float:
        """(1 - alpha) + alpha Lip(f), with Lip(f) from ``ctx``."""
        return (1 - self.alpha) + self.alpha * ctx.lipschitz(self.block)

    def output_bound(self, x_bound: float, ctx) -> float:
        """(1 - alpha) X + alpha out_f(X), with out_f from ``ctx``."""
        return (1 - self.alpha) * x_bound + self.alpha * ctx.output_bound(self.block, x_bound)

    def param_sensitivities(self, x_bound: float, grad_bound: float, ctx) -> dict[str, float]:
        """f's parameter bounds at (X, alpha G), under the names ``block.<name>``."""
        inner = ctx.param_sensitivities(self.block, x_bound, self.alpha * grad_bound)
        return {f"block.{name}": value for name, value in inner.items()}

    def bound_children(self) -> list[nn.Module]:
        """Submodules this layer delegates to (validated in turn): the block f."""
        return [self.block]

    def extra_repr(self) -> str:
        """``alpha``, for the module's repr."""
        return f"alpha={self.alpha}"


__all__ = ["NonExpansive", "InputNormClip", "SampleCentring", "GroupSort", "L2NormPool2d", "GlobalL2Pool2d", "ConvexResidual", "UnsupportedModuleError"]
