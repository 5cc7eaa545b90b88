"""AUROC of a one-class score, its certified lower bound under L2 perturbations, and an empirical attack.

Convention: the score f is higher on normal samples (OCSDF's f > 0 inside the normal class), and AUROC is
P(f(normal) > f(anomaly)) + 1/2 P(tie), i.e. scikit-learn's ``roc_auc_score`` with normal = 1. (Taking the
anomaly as the positive class with score -f gives the same number.)

Certified AUROC at radius r (Bethune et al. 2023, §5): if f is L-Lipschitz in the L2 norm of its input, any
perturbation with ||delta|| <= r moves a score by at most L r. The worst case for the ranking lowers every
normal score by L r and raises every anomaly score by L r; each pairwise term of the AUROC is non-decreasing in
f(normal) - f(anomaly), so

    AUROC(attacked) >= AUROC(f(normal) - L r, f(anomaly) + L r) = certified AUROC(r),

with equality at r = 0, and the bound is non-increasing in r. ``attacked_auroc`` runs the matching L2 PGD
attack (normals pushed down, anomalies pushed up) to check the bound empirically.
"""

from __future__ import annotations

import math

import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn.utils import parametrize

from lipdp.attacks import l2_pgd
from lipdp.evaluation import predict

__all__ = ["attack_scores", "attacked_auroc", "auroc", "certified_auroc", "scores"]


def _as_scores(values: torch.Tensor, name: str) -> torch.Tensor:
    values = torch.as_tensor(values).detach().double().cpu()
    if values.dim() == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.dim() != 1 or len(values) == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor of scores (or (N, 1)), got shape {tuple(values.shape)}")
    if not torch.isfinite(values).all():
        raise ValueError(f"{name} contains non-finite values")
    return values


def _check_radius(radius: float) -> None:
    if not (math.isfinite(radius) and radius >= 0):
        raise ValueError(f"radius must be finite and >= 0, got {radius}")


def auroc(normal_scores: torch.Tensor, anomaly_scores: torch.Tensor) -> float:
    """P(f(normal) > f(anomaly)) + 1/2 P(tie), by ``sklearn.metrics.roc_auc_score`` (normal = positive)."""
    normal = _as_scores(normal_scores, "normal_scores")
    anomaly = _as_scores(anomaly_scores, "anomaly_scores")
    labels = torch.cat([torch.ones(len(normal)), torch.zeros(len(anomaly))])
    return float(roc_auc_score(labels.numpy(), torch.cat([normal, anomaly]).numpy()))


def certified_auroc(
    normal_scores: torch.Tensor, anomaly_scores: torch.Tensor, radius: float, lipschitz: float = 1.0
) -> float:
    """AUROC guaranteed under any L2 perturbation of norm <= ``radius`` of every sample (module doc).

    ``lipschitz`` is a certified upper bound of f's Lipschitz constant (e.g. ``lipdp.lipschitz_constant``).
    """
    _check_radius(radius)
    if not (math.isfinite(lipschitz) and lipschitz > 0):
        raise ValueError(f"lipschitz must be finite and > 0, got {lipschitz}")
    shift = lipschitz * radius
    return auroc(_as_scores(normal_scores, "normal_scores") - shift, _as_scores(anomaly_scores, "anomaly_scores") + shift)


def scores(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Model scores f(x), shape (N,), computed in batches without gradients (``lipdp.evaluation.predict``)."""
    if len(x) == 0:
        raise ValueError("x is empty")
    return predict(model, x, batch_size).reshape(-1)


def attack_scores(
    model: nn.Module,
    x: torch.Tensor,
    normal: bool,
    radius: float,
    steps: int = 20,
    generator: torch.Generator | None = None,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Scores after an L2 PGD attack of radius ``radius`` (``lipdp.attacks.l2_pgd``) that lowers the score
    of normal samples (``normal=True``) or raises the score of anomalies (``normal=False``)."""
    _check_radius(radius)
    sign = -1.0 if normal else 1.0
    objective = lambda z: sign * model(z).reshape(-1)  # noqa: E731
    out = []
    with parametrize.cached():  # the weights do not change during the attack: materialise them once
        for i in range(0, len(x), batch_size):
            adversarial = l2_pgd(objective, x[i : i + batch_size], radius, steps=steps, generator=generator)
            out.append(scores(model, adversarial, batch_size))
    return torch.cat(out)


def attacked_auroc(
    model: nn.Module,
    x_normal: torch.Tensor,
    x_anomaly: torch.Tensor,
    radius: float,
    steps: int = 20,
    generator: torch.Generator | None = None,
) -> float:
    """Empirical AUROC when every sample is attacked within the L2 ball of radius ``radius``: an upper bound
    of the worst case that, for a certified ``lipschitz``, is never below ``certified_auroc``."""
    normal = attack_scores(model, x_normal, True, radius, steps, generator)
    anomaly = attack_scores(model, x_anomaly, False, radius, steps, generator)
    return auroc(normal, anomaly)
