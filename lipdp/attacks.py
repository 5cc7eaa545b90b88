"""L2 projected gradient ascent (PGD) attacks, used to check certificates empirically.

A certificate derived from a Lipschitz constant says that no perturbation of L2 norm <= r can move a
score by more than Lip * r. PGD (Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial
Attacks") searches for the worst perturbation inside the ball; the tests assert that it never beats the
certificate.
"""

from __future__ import annotations

from typing import Callable

import torch


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each sample (first dimension), shaped to broadcast against ``t``."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def l2_pgd(
    objective: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    radius: float,
    steps: int = 20,
    step_size: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return ``x + delta`` with ``||delta_i||_2 <= radius`` for each sample, maximising ``objective``.

    ``objective(x)`` must return one value per sample (shape ``(N,)``); each sample is attacked
    independently (the per-sample objectives are summed, so their gradients do not interact).
    Steps move along the per-sample normalised gradient, ``delta <- P(delta + a * g / ||g||)``, where P
    projects onto the ball of radius ``radius``; ``a`` defaults to ``2.5 * radius / steps``.
    """
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    if radius == 0 or steps <= 0:
        return x.detach().clone()
    step = 2.5 * radius / steps if step_size is None else step_size
    x = x.detach()
    if random_start:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        delta = noise / _per_sample_norm(noise).clamp_min(1e-12) * radius * 0.5
    else:
        delta = torch.zeros_like(x)
    best = x + delta
    with torch.no_grad():
        best_value = objective(best)
    for _ in range(steps):
        delta.requires_grad_(True)
        value = objective(x + delta)
        (grad,) = torch.autograd.grad(value.sum(), delta)
        with torch.no_grad():
            delta = delta + step * grad / _per_sample_norm(grad).clamp_min(1e-12)
            delta = delta * (radius / _per_sample_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
            candidate = x + delta
            candidate_value = objective(candidate)
            improved = candidate_value > best_value
            best = torch.where(improved.view(-1, *([1] * (x.dim() - 1))), candidate, best)
            best_value = torch.maximum(candidate_value, best_value)
    return best.detach()
