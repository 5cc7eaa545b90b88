"""Negative samples for OCSDF: a public prior pushed toward the model's level set by Newton-style steps.

Bethune et al. 2023 (OCSDF, Algorithm 1) alternate between fitting f on P vs Q and regenerating Q. Q starts
from a prior Q_0 covering the domain (uniform in a box or a ball) and each point takes T steps

    z <- z + eta * u * relu(level - f(z)) * grad f(z) / ||grad f(z)||^2,      u ~ U[0, 1] per point,

a damped Newton-Raphson step on f(z) = level: for f locally affine, u = eta = 1 lands exactly on the level set,
and u spreads the negatives between the prior and the level set instead of piling them on it. Points already
above ``level`` do not move. With T = 0 (the warm start) the negatives are the prior samples.

Privacy: the prior uses public constants only (a box or radius fixed in advance, never the private data's
range), and the steps use the current parameters, which are public; so Q depends on the model alone.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Sequence

import torch
from torch import nn

from lipdp.hooks import public_data

__all__ = ["BallPrior", "BoxPrior", "NegativeSampler", "Prior"]


class Prior(ABC):
    """A public distribution Q_0 over inputs of shape ``shape``, with a projection back onto its support."""

    def __init__(self, shape: Sequence[int]) -> None:
        shape = tuple(int(s) for s in shape)
        if not shape or any(s <= 0 for s in shape):
            raise ValueError(f"shape must be a non-empty tuple of positive sizes, got {shape}")
        self.shape = shape

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` independent draws, shape (n, *shape)."""

    @abstractmethod
    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The nearest points of the support (a map applied after every Newton step)."""


class BoxPrior(Prior):
    """Uniform in the box [low, high]^d (e.g. [0, 1] for pixels); ``project`` clamps into it."""

    def __init__(self, shape: Sequence[int], low: float = 0.0, high: float = 1.0) -> None:
        super().__init__(shape)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"need finite low < high, got low={low}, high={high}")
        self.low, self.high = float(low), float(high)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` points uniform in [low, high]^d, shape (n, *shape)."""
        return self.low + (self.high - self.low) * torch.rand((n, *self.shape), generator=generator)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` clamped coordinate-wise into [low, high]."""
        return x.clamp(self.low, self.high)

    def __repr__(self) -> str:
        return f"BoxPrior(shape={self.shape}, low={self.low}, high={self.high})"


class BallPrior(Prior):
    """Uniform in the L2 ball of radius R (or on its sphere with ``surface=True``).

    ``fold=True`` takes absolute values coordinate-wise: uniform in the ball's non-negative orthant, for data
    known (publicly) to be non-negative, such as log1p of non-negative measurements. ``project`` maps back onto
    the ball (or the sphere), then folds.
    """

    def __init__(self, shape: Sequence[int], radius: float, surface: bool = False, fold: bool = False) -> None:
        super().__init__(shape)
        if not (math.isfinite(radius) and radius > 0):
            raise ValueError(f"radius must be finite and > 0, got {radius}")
        self.radius, self.surface, self.fold = float(radius), bool(surface), bool(fold)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` points uniform in the ball (radius R U^(1/d) along a uniform direction) or on its sphere, folded
        if ``fold``; shape (n, *shape)."""
        direction = torch.randn((n, *self.shape), generator=generator)
        direction = direction / _norms(direction).clamp_min(1e-12)
        if self.surface:
            length = torch.full((n,), self.radius)
        else:  # the radius of a uniform point in a d-ball has CDF (r/R)^d
            d = math.prod(self.shape)
            length = self.radius * torch.rand(n, generator=generator) ** (1.0 / d)
        x = direction * length.view(-1, *([1] * len(self.shape)))
        return x.abs() if self.fold else x

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Each sample scaled into the ball (or onto the sphere with ``surface``), then folded if ``fold``."""
        norms = _norms(x).clamp_min(1e-12)
        factor = self.radius / norms if self.surface else (self.radius / norms).clamp(max=1.0)
        x = x * factor
        return x.abs() if self.fold else x

    def __repr__(self) -> str:
        return f"BallPrior(shape={self.shape}, radius={self.radius}, surface={self.surface}, fold={self.fold})"


def _norms(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


class NegativeSampler:
    """Draws Q: ``prior`` samples moved by ``steps`` Newton-style steps toward ``{f = level}`` (module doc).

    ``step_size`` is eta; ``random_step`` draws u ~ U[0, 1] per point (u = 1 otherwise); ``min_grad_norm``
    guards the division where f is flat. After every step the points are projected back onto the prior's
    support. ``steps`` can be overridden per call (``steps=0`` for the warm start).
    """

    def __init__(
        self,
        prior: Prior,
        steps: int = 4,
        step_size: float = 1.0,
        level: float = 0.0,
        random_step: bool = True,
        min_grad_norm: float = 1e-3,
    ) -> None:
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if not step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        if not min_grad_norm > 0:
            raise ValueError(f"min_grad_norm must be > 0, got {min_grad_norm}")
        self.prior = prior
        self.steps = int(steps)
        self.step_size = float(step_size)
        self.level = float(level)
        self.random_step = bool(random_step)
        self.min_grad_norm = float(min_grad_norm)

    def sample(
        self,
        model: nn.Module,
        n: int,
        generator: torch.Generator | None = None,
        steps: int | None = None,
    ) -> torch.Tensor:
        """``n`` negatives for the current ``model`` (detached; no parameter gradient is touched)."""
        if n <= 0:
            raise ValueError(f"n must be > 0, got {n}")
        steps = self.steps if steps is None else int(steps)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        z = self.prior.sample(n, generator)
        for _ in range(steps):
            z = self._step(model, z, generator)
        return z.detach()

    def _step(self, model: nn.Module, z: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        z = z.detach().requires_grad_(True)
        with torch.enable_grad(), public_data():  # the negatives are public: not counted as training passes
            f = model(z).reshape(len(z))
            (grad,) = torch.autograd.grad(f.sum(), z)
        with torch.no_grad():
            gap = torch.relu(self.level - f.detach())
            if self.random_step:
                gap = gap * torch.rand(len(z), generator=generator)
            scale = self.step_size * gap / _norms(grad).flatten().clamp_min(self.min_grad_norm) ** 2
            return self.prior.project(z.detach() + scale.view(-1, *([1] * (z.dim() - 1))) * grad)
