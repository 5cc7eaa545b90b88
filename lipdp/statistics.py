"""Private statistics of a training set, released once before training (e.g. the feature mean used to centre inputs).

The mean is released by the Gaussian mechanism (Dwork & Roth 2014, Thm. A.1; DESIGN.md §1). Each row is first
clipped to norm X0; the query q(D) = (sum_i clip(x_i), |D|) then changes by at most sqrt(X0^2 + 1) in L2 norm
when one record is added or removed, so

    q(D) + N(0, (sigma * sqrt(X0^2 + 1))^2 I)

is one Gaussian mechanism with noise multiplier sigma: the accountant records it as one step at sample rate 1.
The mean is the noisy sum over the noisy count (post-processing, free). The count is noised too: under add/remove
adjacency the data set's size is private.
"""

from __future__ import annotations

import math

import torch

from accounting.validation import check_noise_multiplier, check_positive
from lipdp.layers import InputNormClip

_CHUNK_ROWS = 4096


def mean_query(x: torch.Tensor, norm_bound: float) -> tuple[torch.Tensor, int]:
    """(sum_i clip(x_i), N): what ``private_mean`` noises. L2 sensitivity ``mean_query_sensitivity(norm_bound)``."""
    if x.dim() < 2 or len(x) == 0:
        raise ValueError(f"the mean of a data set needs a non-empty (N, ...) tensor, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("the data contain NaN or infinite values")
    clip = InputNormClip(check_positive(norm_bound, "norm_bound"))  # the model's own input clip
    total = torch.zeros(x.shape[1:], dtype=torch.float64)
    for chunk in x.split(_CHUNK_ROWS):  # float64 sums without a float64 copy of the whole data set
        total += clip(chunk.double()).sum(dim=0)
    return total, len(x)


def mean_query_sensitivity(norm_bound: float) -> float:
    """sqrt(X0^2 + 1): adding or removing one record moves the sum by <= X0 and the count by 1."""
    return math.sqrt(norm_bound**2 + 1)


def private_mean(x: torch.Tensor, norm_bound: float, noise_multiplier: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """(sum_i clip(x_i) + N(0, s^2 I)) / max(1, N + N(0, s^2)), s = noise_multiplier * sqrt(norm_bound^2 + 1)."""
    total, count = mean_query(x, norm_bound)
    std = check_noise_multiplier(noise_multiplier) * mean_query_sensitivity(norm_bound)
    noisy_total = total + std * torch.randn(total.shape, generator=generator, dtype=torch.float64)
    noisy_count = count + std * torch.randn((), generator=generator, dtype=torch.float64)
    return (noisy_total / noisy_count.clamp_min(1.0)).to(x.dtype)
