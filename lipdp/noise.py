"""Noise allocation across parameter groups, all accounted as ONE Gaussian mechanism (docs/design.md §1).

If group d has sensitivity Delta_d and gets independent noise of std s_d, the step is a Gaussian mechanism
with effective noise multiplier sigma_eff = (sum_d (Delta_d / s_d)^2)^(-1/2). Each strategy reaches
sigma_eff = sigma exactly; they differ in utility only:

* ``global``: s_d = sigma * sqrt(sum_k Delta_k^2) for all d (what clipping DP-SGD does).
* ``per_layer``: s_d = sigma * sqrt(D) * Delta_d (each of the D groups gets an equal share).
* ``min_energy``: minimises the total noise energy sum_d n_d s_d^2 (n_d = coordinates of group d) at
  sigma_eff = sigma. Lagrange: s_d^2 = sigma^2 Delta_d (sum_k Delta_k sqrt(n_k)) / sqrt(n_d); total energy
  sigma^2 (sum_d Delta_d sqrt(n_d))^2 <= sigma^2 (sum_d n_d)(sum_d Delta_d^2), the global strategy's
  (Cauchy-Schwarz; equal only when Delta_d is proportional to sqrt(n_d)).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

NOISE_STRATEGIES = ("global", "per_layer", "min_energy")


def noise_stds(
    sensitivities: dict[str, float], sizes: dict[str, int], noise_multiplier: float, strategy: str
) -> dict[str, float]:
    """Std of the Gaussian noise added to the summed gradient of each group."""
    if strategy not in NOISE_STRATEGIES:
        raise ValueError(f"noise_strategy must be one of {NOISE_STRATEGIES}, got {strategy!r}")
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    sigma = float(noise_multiplier)
    if strategy == "global":
        total = math.sqrt(sum(delta**2 for delta in sensitivities.values()))
        return {name: sigma * total for name in sensitivities}
    if strategy == "per_layer":
        groups = sum(1 for delta in sensitivities.values() if delta > 0)
        return {name: sigma * math.sqrt(groups) * delta for name, delta in sensitivities.items()}
    weighted = sum(delta * math.sqrt(sizes[name]) for name, delta in sensitivities.items())
    return {
        name: sigma * math.sqrt(delta * weighted / math.sqrt(sizes[name]))
        for name, delta in sensitivities.items()
    }


def effective_noise_multiplier(sensitivities: dict[str, float], stds: dict[str, float]) -> float:
    """sigma_eff = (sum_d (Delta_d / s_d)^2)^(-1/2); groups with Delta_d = 0 release nothing private."""
    total = 0.0
    for name, delta in sensitivities.items():
        if delta > 0:
            if not stds[name] > 0:
                return 0.0
            total += (delta / stds[name]) ** 2
    return math.inf if total == 0 else 1.0 / math.sqrt(total)


def noise_energy(stds: dict[str, float], sizes: dict[str, int]) -> float:
    """Total expected squared norm of the noise, sum_d n_d s_d^2."""
    return sum(sizes[name] * std**2 for name, std in stds.items())


class GaussianNoise:
    """The mechanism's noise source: ``sample(grads, stds)`` draws N(0, s_d^2 I) shaped like each gradient, from
    ``generator`` (which must live on the gradients' device: a CPU generator cannot draw CUDA noise).

    Injected into ``GradientMechanism`` (its ``noise`` attribute); ``lipdp.audit`` swaps in a deliberately scaled
    source to show that its audit detects an under-noised engine, without a switch on this production path.
    """

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def sample(self, grads: Mapping[str, torch.Tensor], stds: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """One independent N(0, s_d^2 I) draw shaped like each gradient d.

        Gradients of one (dtype, device) share ONE ``randn`` call of their total size, split into views, scaled
        with one call per run of equal stds: as many calls as groups, not as parameters. The views are independent standard normal
        coordinates either way, so the mechanism (and its privacy) is the same as one draw per gradient.
        """
        groups: dict[tuple[torch.dtype, torch.device], list[str]] = {}
        for name, grad in grads.items():
            groups.setdefault((grad.dtype, grad.device), []).append(name)
        draws: dict[str, torch.Tensor] = {}
        for (dtype, device), names in groups.items():
            sizes = [grads[name].numel() for name in names]
            flat = torch.randn(sum(sizes), generator=self.generator, dtype=dtype, device=device)
            chunks = flat.split(sizes)
            start = 0  # scale each run of equal stds with one call (the whole group for the global strategy)
            for index in range(1, len(names) + 1):
                if index == len(names) or stds[names[index]] != stds[names[start]]:
                    flat[sum(sizes[:start]):sum(sizes[:index])].mul_(float(stds[names[start]]))
                    start = index
            draws.update((name, chunk.view(grads[name].shape)) for name, chunk in zip(names, chunks))
        return draws
