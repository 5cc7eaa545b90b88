"""The one-class hinge-Kantorovich-Rubinstein loss of OCSDF, with its Lipschitz constant.

Bethune et al. 2023, "Robust One-Class Classification with Signed Distance Function using 1-Lipschitz Neural
Networks" (ICML), eq. (HKR): for a 1-Lipschitz score f, positive on the normal distribution P and negative on
the generated negatives Q,

    HKR(f) = E_{x~P}[ -f(x) + lambda * relu(m - f(x)) ]  +  E_{z~Q}[ f(z) + lambda * relu(m + f(z)) ].

The first (KR) part maximises the mean gap between P and Q (a Wasserstein-1 dual); the hinge part asks every
normal sample to score >= m and every negative <= -m. Its minimiser over 1-Lipschitz f approximates the signed
distance to the boundary of P's support (the paper's Proposition 2), which is what makes the scores robust.

Privacy (docs/design.md §6): only the P term touches private data; the Q term is a function of the model alone (the
negatives are generated from the current, public, parameters). The engine's sensitivity therefore counts P's
per-sample term only: ``lipschitz_constant`` is the Lipschitz constant in the score of ONE normal sample's loss.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["OneClassHKR"]


def _scores(output: torch.Tensor) -> torch.Tensor:
    """(N,) or (N, 1) model output -> (N,) scores; anything else is refused."""
    if output.dim() == 2 and output.shape[1] == 1:
        return output[:, 0]
    if output.dim() == 1:
        return output
    raise ValueError(f"one-class scores must have shape (N,) or (N, 1), got {tuple(output.shape)}")


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


class OneClassHKR(nn.Module):
    """OCSDF's HKR loss, split into the private (normal) term and the public (negatives) term.

    ``forward(scores, target=None)`` is the normal-sample term ``-f + lambda * relu(m - f)`` (``target`` is
    accepted for the ``criterion(model(x), y)`` convention and ignored: every private sample is normal).
    ``negative_loss(scores)`` is the negatives' term ``f + lambda * relu(m + f)``.

    Lipschitz constant of one normal sample's term in its score f: the derivative is -1 - lambda * 1[f < m],
    so |d loss / d f| <= 1 + lambda, reached whenever the hinge is active: ``lipschitz_constant = 1 + lambda``.
    The negatives' term has the same constant but adds no sensitivity (it depends on no private record).
    """

    def __init__(self, margin: float = 0.2, lam: float = 100.0, reduction: str = "mean") -> None:
        super().__init__()
        if not margin > 0:
            raise ValueError(f"margin must be > 0, got {margin}")
        if not lam >= 0:
            raise ValueError(f"lam (hinge weight lambda) must be >= 0, got {lam}")
        _reduce(torch.zeros(1), reduction)  # validates the name
        self.margin = float(margin)
        self.lam = float(lam)
        self.reduction = reduction
        self.lipschitz_constant = 1.0 + self.lam

    def forward(self, output: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """The normal-sample term -f + lambda * relu(m - f), reduced; ``target`` is ignored."""
        f = _scores(output)
        return _reduce(-f + self.lam * F.relu(self.margin - f), self.reduction)

    def negative_loss(self, output: torch.Tensor, reduction: str | None = None) -> torch.Tensor:
        """The negatives' term f + lambda * relu(m + f), reduced by ``reduction`` (default: the loss's own)."""
        f = _scores(output)
        return _reduce(f + self.lam * F.relu(self.margin + f), reduction or self.reduction)

    def extra_repr(self) -> str:
        """``margin``, ``lam`` and ``reduction``, for the module's repr."""
        return f"margin={self.margin}, lam={self.lam}, reduction={self.reduction!r}"
