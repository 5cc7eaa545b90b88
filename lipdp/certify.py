"""Robustness certificates that every Lipschitz model carries for free.

If the logit map z(x) is Lip-Lipschitz in L2, each margin z_y - z_j is sqrt(2) Lip-Lipschitz (the vector
e_y - e_j has norm sqrt(2)), so the prediction y cannot change under any perturbation of norm <= r when
z_y - max_{j != y} z_j > sqrt(2) * Lip * r (Tsuzuku et al. 2018, "Lipschitz-Margin Training").
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import TensorDataset

from lipdp.evaluation import predict


def certified_radius(logits: torch.Tensor, lipschitz: float) -> torch.Tensor:
    """Largest certified L2 radius of each prediction: margin / (sqrt(2) * Lip)."""
    top2 = logits.topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]) / (math.sqrt(2) * lipschitz)


def certified_accuracy(model: nn.Module, dataset: TensorDataset, radius: float, lipschitz: float,
                       batch_size: int = 2048) -> float:
    """Fraction of samples correctly classified with a certified radius > ``radius`` (r=0: accuracy)."""
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    inputs, labels = dataset.tensors[:2]
    logits = predict(model, inputs, batch_size)
    correct = logits.argmax(dim=1) == labels
    if radius > 0:
        correct &= certified_radius(logits, lipschitz) > radius
    return correct.float().mean().item()
