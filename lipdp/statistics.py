"""Private statistics of a training set, released once before training: the feature mean used to centre inputs,
and channel second moments used to whiten them.

**Mean.** The mean is released by the Gaussian mechanism (Dwork & Roth 2014, Thm. A.1; docs/design.md §1). Each row is first
clipped to norm X0; the query q(D) = (sum_i clip(x_i), |D|) then changes by at most sqrt(X0^2 + 1) in L2 norm
when one record is added or removed, so

    q(D) + N(0, (sigma * sqrt(X0^2 + 1))^2 I)

is one Gaussian mechanism with noise multiplier sigma: the accountant records it as one step at sample rate 1.
The mean is the noisy sum over the noisy count (post-processing, free). The count is noised too: under add/remove
adjacency the data set's size is private.

**Channel second moments.** For feature blocks laid out as (channels, positions) inside each row (e.g. scattering
coefficients: C channels at P spatial positions), the query is, per block b,

    S_b(D) = sum_i sum_p x_{i,b,:,p} x_{i,b,:,p}^T        (C_b x C_b, summed over the positions: "tied")

of the rows clipped to norm X0. Adding or removing one record x changes the blocks by M_b = sum_p x_{b,p} x_{b,p}^T,
and sum_b ||M_b||_F <= sum_b sum_p ||x_{b,p}||^2 <= ||x||^2 <= X0^2 (triangle inequality, disjoint blocks), so the
whole release has L2 sensitivity X0^2. Each S_b is symmetric: noise is drawn on its upper triangle (diagonal
included) and mirrored, so the released triangles form one Gaussian mechanism with noise multiplier sigma
(Dwork, Talwar, Thakurta & Zhang 2014, "Analyze Gauss"), recorded as one step at sample rate 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

from accounting import PrivacyAccountant
from accounting.validation import check_noise_multiplier, check_positive
from lipdp import distributed
from lipdp.layers import InputNormClip

T = TypeVar("T")

_CHUNK_ROWS = 4096


def _checked_rows(x: torch.Tensor) -> torch.Tensor:
    if x.dim() < 2 or len(x) == 0:
        raise ValueError(f"statistics of a data set need a non-empty (N, ...) tensor, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("the data contain NaN or infinite values")
    return x


def mean_query(x: torch.Tensor, norm_bound: float) -> tuple[torch.Tensor, int]:
    """(sum_i clip(x_i), N): what ``private_mean`` noises. L2 sensitivity ``mean_query_sensitivity(norm_bound)``."""
    _checked_rows(x)
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


@dataclass(frozen=True)
class ChannelBlock:
    """Where a (channels, positions) block sits in a flattened feature row: ``row[start : start + channels *
    positions]`` reshaped to (channels, positions), channel-major (as ``tensor.flatten`` lays out (C, H, W) maps)."""

    start: int
    channels: int
    positions: int

    @property
    def stop(self) -> int:
        """The index just past the block in a row: start + channels * positions."""
        return self.start + self.channels * self.positions

    def view(self, rows: torch.Tensor) -> torch.Tensor:
        """(N, F) rows -> (N, channels, positions) view of this block."""
        return rows[:, self.start:self.stop].unflatten(1, (self.channels, self.positions))


def channel_moments_query(x: torch.Tensor, blocks: list[ChannelBlock], norm_bound: float) -> list[torch.Tensor]:
    """[S_b] = [sum_i sum_p clip(x_i)_{b,:,p} clip(x_i)_{b,:,p}^T] over the (N, F) rows ``x`` (float64): what
    ``private_channel_moments`` noises. L2 sensitivity ``channel_moments_sensitivity(norm_bound)``."""
    rows = _checked_rows(x).flatten(1)
    if not blocks:
        raise ValueError("channel moments need at least one ChannelBlock")
    if any(b.start < 0 or b.channels < 1 or b.positions < 1 or b.stop > rows.shape[1] for b in blocks):
        raise ValueError(f"the blocks {blocks} do not fit in rows of {rows.shape[1]} features")
    ends = sorted((b.start, b.stop) for b in blocks)
    if any(stop > start for (_, stop), (start, _) in zip(ends, ends[1:])):
        raise ValueError(f"the blocks {blocks} overlap: the sensitivity X0^2 holds for disjoint blocks only")
    clip = InputNormClip(check_positive(norm_bound, "norm_bound"))
    totals = [torch.zeros(b.channels, b.channels, dtype=torch.float64) for b in blocks]
    for chunk in rows.split(_CHUNK_ROWS):
        chunk = clip(chunk.double())
        for total, block in zip(totals, blocks):
            view = block.view(chunk)
            total += torch.einsum("ncp,ndp->cd", view, view)
    return totals


def channel_moments_sensitivity(norm_bound: float) -> float:
    """X0^2: one record moves the blocks' moments by at most ||x||^2 in L2 (module docstring)."""
    return norm_bound**2


def private_channel_moments(x: torch.Tensor, blocks: list[ChannelBlock], norm_bound: float,
                            noise_multiplier: float, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """[S_b + Z_b]: each block's moment plus symmetric Gaussian noise of std noise_multiplier * X0^2 per entry of
    its upper triangle (mirrored below). Not normalised by the count: scale-free uses (whitening) need none."""
    totals = channel_moments_query(x, blocks, norm_bound)
    std = check_noise_multiplier(noise_multiplier) * channel_moments_sensitivity(norm_bound)
    released = []
    for total in totals:
        noise = torch.randn(total.shape, generator=generator, dtype=torch.float64).triu() * std
        released.append(total + noise + noise.triu(1).T)
    return released


def rescale_rows(rows: torch.Tensor) -> torch.Tensor:
    """Each row divided by its L2 norm (norm 1): in place on whole data sets, out of place when differentiated."""
    norms = rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return rows / norms if rows.requires_grad else rows.div_(norms)


def centre_and_rescale(features: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Each sample minus the (privately released) training mean, scaled back to norm 1: the norm budget goes to
    what distinguishes the samples, not to what they share (+0.4 points of validation accuracy in the classification
    recipe, README). In place on whole data sets (one copy of the features, not two); out of place when differentiated."""
    centred = features.flatten(1) - mean.flatten()
    return rescale_rows(centred).reshape(features.shape)


class StatisticsReleases:
    """Full-data Gaussian releases before training (``private_mean``, ``private_channel_moments``), each drawn from
    ``generator`` and recorded in ``accountant`` as one step at sample rate 1 (``LipDPEngine`` delegates here).

    Multi-process: the first release broadcasts rank 0's seed (``seed_generator(seed)`` re-seeds ``generator``), so
    every rank draws the same noise; later releases continue the stream (fresh noise, never a repeated draw).
    """

    def __init__(self, accountant: PrivacyAccountant, generator: torch.Generator) -> None:
        self.accountant, self.generator = accountant, generator
        self._synchronised = False

    def release(self, noise_multiplier: float, mechanism: Callable[[torch.Generator], T],
                seed: int, seed_offset: int) -> tuple[T, int]:
        """Run ``mechanism(generator)`` and account it (one step, q = 1). Returns (released value, the seed in use:
        rank 0's after the first multi-process release)."""
        if distributed.is_distributed() and not self._synchronised:
            seed = distributed.broadcast_seed(seed)
            self.generator.manual_seed(seed + seed_offset)
            self._synchronised = True
        released = mechanism(self.generator)
        self.accountant.step(noise_multiplier=noise_multiplier, sample_rate=1.0)
        return released, seed
