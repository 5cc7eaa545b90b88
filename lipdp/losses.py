"""Losses that are Lipschitz in the logits, with their constants derived, and the lookup the engine uses.

The engine needs L = sup over (z, y) of ||d loss(z, y) / dz||_2 for ONE sample (docs/design.md §2). Every loss here
computes per-sample values and reduces them with ``reduction`` ("mean" over the batch, or "sum").
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

SQRT2 = math.sqrt(2.0)


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


class LipschitzCrossEntropy(nn.Module):
    """Cross-entropy at temperature tau, CE(tau (z + m (1 - e_y)), y) / tau, with optional label smoothing and a
    margin m >= 0 added to every logit but the true one (Lipschitz-margin training, Tsuzuku, Sato & Sugiyama 2018:
    the loss keeps pushing until z_y leads the others by about m, the logit margin a certificate needs).

    Gradient in z: softmax(tau (z + m (1 - e_y))) - q, with q the (smoothed) one-hot target; the margin is a constant
    shift of the logits, so it changes where the gradient is taken, not its form. Both are probability vectors, so
    ||p - q||^2 = ||p||^2 + ||q||^2 - 2 p.q <= 1 + 1 = 2 (p.q >= 0, ||p||^2 <= (sum p)^2 = 1): L = sqrt(2),
    whatever tau, the smoothing and the margin. A larger tau approaches the multiclass hinge (Bethune et al. 2023).
    """

    def __init__(self, temperature: float = 1.0, label_smoothing: float = 0.0, reduction: str = "mean",
                 margin: float = 0.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if not (math.isfinite(margin) and margin >= 0):
            raise ValueError(f"margin must be a finite number >= 0, got {margin}")
        self.temperature = float(temperature)
        self.label_smoothing = float(label_smoothing)
        self.margin = float(margin)
        self.reduction = reduction
        self.lipschitz_constant = SQRT2

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """CE(tau (z + m (1 - e_y)), y) / tau per sample, reduced."""
        if self.margin:
            logits = logits + self.margin * (1.0 - F.one_hot(target, logits.shape[-1]).to(logits.dtype))
        values = F.cross_entropy(
            self.temperature * logits, target, reduction="none", label_smoothing=self.label_smoothing
        )
        return _reduce(values / self.temperature, self.reduction)


class MulticlassHinge(nn.Module):
    """Crammer-Singer hinge: relu(margin - (z_y - max_{j != y} z_j)).

    Its gradient is 0 or e_j - e_y (j the best other class): norm sqrt(2), so L = sqrt(2).
    """

    def __init__(self, margin: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        if not margin > 0:
            raise ValueError(f"margin must be > 0, got {margin}")
        self.margin = float(margin)
        self.reduction = reduction
        self.lipschitz_constant = SQRT2

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """relu(margin - (z_y - max_{j != y} z_j)) per sample, reduced."""
        true = logits.gather(1, target[:, None]).squeeze(1)
        others = logits.scatter(1, target[:, None], float("-inf")).amax(dim=1)
        return _reduce(F.relu(self.margin - (true - others)), self.reduction)


def _kr_values(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample Kantorovich-Rubinstein term -(z_y - mean_{j != y} z_j) (minimised to separate classes)."""
    k = logits.shape[1]
    true = logits.gather(1, target[:, None]).squeeze(1)
    return -(true - (logits.sum(dim=1) - true) / (k - 1))


class KRLoss(nn.Module):
    """Per-sample multiclass Kantorovich-Rubinstein loss -(z_y - mean_{j != y} z_j).

    Gradient: -e_y + 1/(K-1) on every other class, norm^2 = 1 + 1/(K-1) = K/(K-1) <= 2 (K >= 2), so
    L = sqrt(K/(K-1)) for a known K and sqrt(2) otherwise. (A batch-level KR with class-frequency weights is
    not a sum of per-sample terms with fixed weights, so it is not offered.)
    """

    def __init__(self, num_classes: int | None = None, reduction: str = "mean") -> None:
        super().__init__()
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.reduction = reduction
        self.num_classes = num_classes
        self.lipschitz_constant = SQRT2 if num_classes is None else math.sqrt(num_classes / (num_classes - 1))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The KR term per sample (see the class docstring), reduced."""
        # The constant sqrt(K/(K-1)) decreases in K: logits with fewer classes than declared would exceed it.
        if self.num_classes is not None and logits.shape[1] != self.num_classes:
            raise ValueError(
                f"KRLoss(num_classes={self.num_classes}) got logits with {logits.shape[1]} classes; its Lipschitz "
                "constant is only valid for the declared number of classes."
            )
        return _reduce(_kr_values(logits, target), self.reduction)


class HKRLoss(nn.Module):
    """Hinge-KR (Serrurier et al. 2021): KR + alpha * multiclass hinge, per sample.

    Triangle inequality on the gradients: L <= L_KR + alpha * sqrt(2).
    """

    def __init__(self, alpha: float = 10.0, margin: float = 1.0, num_classes: int | None = None,
                 reduction: str = "mean") -> None:
        super().__init__()
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)
        self.kr = KRLoss(num_classes, reduction="none")
        self.hinge = MulticlassHinge(margin, reduction="none")
        self.reduction = reduction
        self.lipschitz_constant = self.kr.lipschitz_constant + self.alpha * SQRT2

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """KR + alpha * hinge per sample, reduced."""
        values = self.kr(logits, target) + self.alpha * self.hinge(logits, target)
        return _reduce(values, self.reduction)


class NonLipschitzLossError(ValueError):
    """The loss has no known Lipschitz constant in the logits."""


def loss_lipschitz(criterion: nn.Module) -> float:
    """Lipschitz constant of ``criterion`` in the logits, for one sample.

    lipdp losses (and any loss object with a float ``lipschitz_constant`` attribute) carry theirs.
    ``nn.CrossEntropyLoss``: sqrt(2) as above, times max|weight| with class weights (sum reduction only:
    the weighted mean divides by the batch's weights, which is data dependent). With weights w and smoothed
    target q the logit gradient is a p - w*q, a = sum_c w_c q_c; it is convex in the probability vector p, so
    its norm is largest at a vertex p = e_j, where it is (sum_{c!=j} w_c q_c)^2 + sum_{c!=j} w_c^2 q_c^2
    <= max|w|^2 ((1 - q_j)^2 + (1 - q_j)^2) <= 2 max|w|^2, whatever the signs of the weights. MSE and unknown losses are
    refused (use ``loss_grad_clip`` in the engine to make any loss's gradient bounded).
    """
    constant = getattr(criterion, "lipschitz_constant", None)
    if constant is not None:
        return float(constant)
    if isinstance(criterion, nn.CrossEntropyLoss):
        if criterion.weight is None:
            return SQRT2
        if criterion.reduction == "mean":
            raise NonLipschitzLossError(
                "nn.CrossEntropyLoss(weight=..., reduction='mean') divides by the batch's total weight, which "
                "depends on the data. Fix: use reduction='sum', or drop the class weights."
            )
        return SQRT2 * criterion.weight.abs().max().item()
    if isinstance(criterion, (nn.MSELoss, nn.GaussianNLLLoss, nn.PoissonNLLLoss, nn.KLDivLoss)):
        raise NonLipschitzLossError(
            f"{type(criterion).__name__} is not Lipschitz in the logits (its gradient grows without bound), so "
            "no per-sample gradient bound exists. Fix: use lipdp.losses.LipschitzCrossEntropy (classification), "
            "nn.L1Loss/nn.HuberLoss-like losses with a declared constant, or pass loss_grad_clip=C."
        )
    raise NonLipschitzLossError(
        f"lipdp does not know the Lipschitz constant of {type(criterion).__name__}. Fix: use a loss from "
        "lipdp.losses, give your loss a float attribute `lipschitz_constant` (derived, not guessed), or pass "
        "loss_grad_clip=C to clip each sample's logit gradient."
    )
