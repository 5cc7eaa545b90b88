"""Private subspace detector: the distance of a sample to the normal class's principal subspace, 1-Lipschitz.

    f(x) = -||(I - P P^T)(x - mu)||

with ``mu`` the private mean of the normal rows and ``P`` (F, k) the top-k eigenvectors of their private centred
second moment (PCA residual; Hoffmann 2007 "Kernel PCA for novelty detection" uses its kernel form). Higher is more
normal, as OCSDF's f (``lipdp.one_class.metrics``).

**Privacy** (``fit_private_subspace``): two Gaussian releases on the whole normal training set, each accounted by
the engine as one step at sample rate 1 (``LipDPEngine.private_mean``, ``private_channel_moments``):

1. ``mu = (sum_i clip_R(x_i) + N(0, s1^2 I)) / (N + N(0, s1^2))``, s1 = sigma_1 sqrt(R^2 + 1);
2. ``S = sum_i c_i c_i^T + Z`` with ``c_i = clip_R(x_i - mu)`` (mu is public once released: each record's term
   depends on its own row only) and Z symmetric Gaussian of std sigma_2 R^2 per entry, the L2 sensitivity of the
   sum since ``||c c^T||_F = ||c||^2 <= R^2`` (Analyze Gauss, Dwork, Talwar, Thakurta & Zhang, STOC 2014).

``P`` is post-processing of ``S`` (``torch.linalg.eigh``); the detector is (mu, P) and nothing else about the data.

**Lipschitz constant** (``SubspaceResidual.lipschitz``): a translation (1), the projection ``I - P P^T`` (its
spectral norm is ``max(1, max_i |1 - s_i^2|)`` for the singular values s_i of P, so 1 for orthonormal columns, and
computed from P rather than assumed), the Euclidean norm (1). Composed with an L-Lipschitz per-sample feature map
(the certified scattering rows of ``recipes.front_end``) the score is L-Lipschitz in the images, so its certified
AUROC (``certified_auroc``) holds in pixel space.

**Coordinates for OCSDF** (``SubspaceCoordinates``): the same (mu, P) as a per-sample map to k + 1 features,
``z(x) = (P^T (x - mu), ||(I - P P^T)(x - mu)||)``, on which an OCSDF network learns a signed distance in a small
space instead of the rows' thousands of dimensions. It is the linear map ``M = [P^T; I - P P^T]`` followed by the
norm of its second block (1-Lipschitz), so its constant is ``||M||_2 = sqrt(max(1, max_i 1 - s_i^2 + s_i^4))``:
``M^T M = I - Q + Q^2`` with ``Q = P P^T``, whose eigenvalues are s_i^2 (and 0 when k < F). 1 for orthonormal P.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from accounting.validation import check_positive
from lipdp.statistics import ChannelBlock

if TYPE_CHECKING:
    from lipdp.engine import LipDPEngine

__all__ = ["SubspaceCoordinates", "SubspaceResidual", "fit_private_subspace", "fit_subspace", "top_eigenvectors"]


class SubspaceResidual(nn.Module):
    """Rows (N, F) -> scores (N, 1) = -||(I - P P^T)(x - mu)||, computed in float64 (module docstring)."""

    def __init__(self, mean: torch.Tensor, basis: torch.Tensor) -> None:
        super().__init__()
        if mean.dim() != 1 or basis.dim() != 2 or basis.shape[0] != mean.shape[0]:
            raise ValueError(f"need a (F,) mean and an (F, k) basis, got {tuple(mean.shape)} and {tuple(basis.shape)}")
        self.register_buffer("mean", mean.detach().double().clone())
        self.register_buffer("basis", basis.detach().double().clone())

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """-||(I - P P^T)(x - mu)|| of each row, shape (N, 1), in the rows' dtype."""
        _, distance = self.split(rows)
        return -distance.to(rows.dtype)

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P^T (x - mu), ||(I - P P^T)(x - mu)||)`` of each row, (N, k) and (N, 1), in float64."""
        centred = rows.flatten(1).double() - self.mean
        coordinates = centred @ self.basis
        return coordinates, (centred - coordinates @ self.basis.T).norm(dim=1, keepdim=True)

    def lipschitz(self) -> float:
        """Certified constant of the score in its rows: ``||I - P P^T||_2 = max(1, max_i |1 - s_i(P)^2|)`` (the
        eigenvalues of ``P P^T`` are s_i^2 and, when k < F, 0), with a relative float64 slack of 1e-9."""
        features, rank = self.basis.shape
        gain = (1 - torch.linalg.svdvals(self.basis).square()).abs().max().item() if rank else 0.0
        if rank < features:
            gain = max(gain, 1.0)
        return gain * (1 + 1e-9)


class SubspaceCoordinates(nn.Module):
    """Rows (N, F) -> (N, k + 1): the coordinates in the subspace and the residual's norm (module docstring)."""

    def __init__(self, mean: torch.Tensor, basis: torch.Tensor) -> None:
        super().__init__()
        self.residual = SubspaceResidual(mean, basis)  # validates the shapes; holds mu and P

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """``(P^T (x - mu), ||(I - P P^T)(x - mu)||)`` of each row, computed in float64, in the rows' dtype."""
        return torch.cat(self.residual.split(rows), dim=1).to(rows.dtype)

    def lipschitz(self) -> float:
        """Certified constant ``sqrt(max(1, max_i 1 - s_i^2 + s_i^4))`` over the singular values s_i of P (the
        module docstring), with a relative float64 slack of 1e-9."""
        s2 = torch.linalg.svdvals(self.residual.basis).square()
        gain = max(1.0, (1 - s2 + s2.square()).max().item()) if len(s2) else 1.0
        return gain ** 0.5 * (1 + 1e-9)


def _check_rank(rank: int, features: int) -> None:
    if not 0 <= rank <= features:
        raise ValueError(f"rank must be in [0, {features}] (the number of features), got {rank}")


def top_eigenvectors(moment: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` eigenvectors of the symmetric ``moment`` with the largest eigenvalues, as (F, rank) columns."""
    _check_rank(rank, moment.shape[0])
    _, vectors = torch.linalg.eigh(moment.double())  # ascending eigenvalues
    return vectors[:, moment.shape[0] - rank:].flip(1)


def fit_private_subspace(engine: LipDPEngine, rows: torch.Tensor, rank: int, norm_bound: float,
                         mean_noise: float, moment_noise: float) -> SubspaceResidual:
    """Release the normal rows' mean and centred second moment through ``engine`` (each release accounted
    there) and return the detector (module docstring). ``norm_bound`` R clips the rows, then the
    centred rows; ``mean_noise`` and ``moment_noise`` are the two releases' noise multipliers."""
    check_positive(norm_bound, "norm_bound")
    rows = rows.flatten(1)
    _check_rank(rank, rows.shape[1])  # before any release: a refused call spends nothing
    mean = engine.private_mean(rows, mean_noise, norm_bound).double()
    centred = rows.double() - mean
    (moment,) = engine.private_channel_moments(centred, [ChannelBlock(0, rows.shape[1], 1)], moment_noise, norm_bound)
    return SubspaceResidual(mean, top_eigenvectors(moment, rank))


def fit_subspace(rows: torch.Tensor, rank: int) -> SubspaceResidual:
    """The same detector from the exact mean and centred second moment (not private: a reference)."""
    rows = rows.flatten(1).double()
    _check_rank(rank, rows.shape[1])
    centred = rows - rows.mean(dim=0)
    return SubspaceResidual(rows.mean(dim=0), top_eigenvectors(centred.T @ centred, rank))
