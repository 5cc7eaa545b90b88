"""The classification recipe's fixed front end, and the private statistics that centre and whiten its features.

**Front end** (per sample, hence free in privacy, docs/design.md §2): a ``+``-joined list of parts, each of norm 1 per
sample, concatenated as ``[w_1 f_1, ..., w_k f_k] / sqrt(sum_j w_j^2)`` (so each row has norm 1):

* ``scattering``: the J = 2 wavelet scattering transform (81 channels at (H/4) x (W/4) positions), standardised per
  sample in ``groups`` channel groups (Tramèr & Boneh 2021);
* ``fine-scattering``: the J = 1 transform (9 channels at (H/2) x (W/2) positions), standardised the same way in
  groups of 3 channels: finer spatial detail than J = 2 (inside the seeds' spread on validation, README);
* ``pixels``: the image centred on its own mean (``unit_pixels``).

**Private preprocessing** (statistics across samples are not free: each is one Gaussian mechanism released through
the engine, ``LipDPEngine.private_mean`` / ``private_channel_moments``, and paid from the same (ε, δ)):

* centring: each row minus the private training mean, rescaled to norm 1 (``centre_and_rescale``);
* whitening: each scattering part's channels multiplied by ``M = (S + λ0 I)^(-1/2)`` (trace-preserving scale), with
  ``S`` the private channel second moments of the centred rows (tied over positions, ``lipdp.statistics``) and
  ``λ0`` the larger of ``floor * tr(S) / C`` and the noise's spectral norm (``channel_whitener``); then the row is
  rescaled to norm 1. A few channel directions carry most of the scattering part's energy after centring;
  damping them spends the norm budget on what tells classes apart.

**Normalisation.** ``standardise`` (the above): per-sample standardisation and division by each row's norm, not
Lipschitz near 0, so certificates hold in feature space only. ``lipschitz``: every stage has a certified constant
and Lip(pipeline) is their product (docs/design.md §6), so certificates hold for the image as loaded:

* each scattering path multiplied by a fixed weight per scattering order (``order_weights``) and the part divided by
  its certified constant (``lipdp.scattering.scattering_lipschitz``): Lipschitz 1; pixels centred on their own mean
  (a projection: 1); the weighted concatenation: sqrt(sum_j w_j^2) / sqrt(sum_j w_j^2) = 1;
* the rows divided by a fixed ``radius`` c (1 / c), so that typical rows have norm ~1 for the releases;
* centring on the private mean, without rescaling (a translation: 1); whitening by the released matrices
  (their spectral norm, exactly); projection onto the unit ball x min(1, 1 / ||x||) (1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from lipdp.engine import LipDPEngine
from lipdp.layers import InputNormClip, SampleCentring
from lipdp.scattering import (per_sample_group_standardize, scattering_features, scattering_lipschitz,
                              scattering_transform)
from lipdp.statistics import ChannelBlock, centre_and_rescale, channel_moments_sensitivity, rescale_rows

#: Weight of each part (all parts have norm 1 per sample before weighting).
PART_WEIGHTS = {"scattering": 1.0, "fine-scattering": 0.5, "pixels": 0.5}
#: Scattering scale J of each scattering part.
SCATTERING_SCALES = {"scattering": 2, "fine-scattering": 1}
#: Standardisation groups of the J = 1 part (9 channels: 3 per group, as 27 groups of the J = 2 part's 81).
FINE_SCATTERING_GROUPS = 3
_CHUNK_ROWS = 4096
NORMALISATIONS = ("standardise", "lipschitz")

#: (images, J) -> scattering coefficients (N, C, h, w): ``scattering_features`` (a whole split, computed once and
#: cached on disk), or the differentiable transform.
Scatter = Callable[[torch.Tensor, int], torch.Tensor]


def parse_front_end(front_end: str) -> tuple[str, ...]:
    """``"scattering+pixels"`` -> ("scattering", "pixels"), with a clear error for unknown or repeated parts."""
    parts = tuple(front_end.split("+"))
    unknown = [p for p in parts if p not in PART_WEIGHTS]
    if unknown or len(set(parts)) != len(parts):
        raise ValueError(f"front end {front_end!r}: use '+'-joined distinct parts among {', '.join(PART_WEIGHTS)} "
                         "(e.g. 'scattering+fine-scattering+pixels')")
    return parts


def unit_pixels(images: torch.Tensor) -> torch.Tensor:
    """Each image flattened, centred on its own mean and scaled to norm 1 (per-sample: free in privacy)."""
    flat = centred_pixels(images)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)


def centred_pixels(images: torch.Tensor) -> torch.Tensor:
    """Each image flattened and centred on its own mean: x - mean(x) 1, an orthogonal projection (1-Lipschitz,
    ``lipdp.layers.SampleCentring``)."""
    return SampleCentring()(images.flatten(1))


def differentiable_scatter(image_shape: tuple[int, int]) -> Scatter:
    """The scattering transforms as differentiable functions of the images (one transform per scale)."""
    transforms: dict[int, torch.nn.Module] = {}

    def scatter(images: torch.Tensor, J: int) -> torch.Tensor:
        if J not in transforms:
            transforms[J] = scattering_transform(image_shape, J=J)
        coefficients = transforms[J](images)
        return coefficients.reshape(len(images), -1, *coefficients.shape[-2:])

    return scatter


def path_weights(J: int, order_weights: tuple[float, ...], L: int = 8) -> torch.Tensor:
    """The weight of each scattering path, ``order_weights[m]`` for a path of order m, in kymatio's order (S0,
    the J L first-order, then the L^2 J (J - 1) / 2 second-order paths)."""
    orders = [0] + [1] * (J * L) + [2] * (L * L * J * (J - 1) // 2)
    return torch.tensor([float(order_weights[m]) for m in orders], dtype=torch.float64)


def lipschitz_scattering(coefficients: torch.Tensor, J: int, order_weights: tuple[float, ...],
                         image_shape: tuple[int, int]) -> torch.Tensor:
    """(N, C K, h, w) coefficients -> (N, C K h w) rows ``(w ⊙ S(x)) / Lip(w ⊙ S)``: a 1-Lipschitz map of the image
    (the certified constant, ``scattering_lipschitz``; each image channel has the same map, so the same constant)."""
    weights = path_weights(J, order_weights)
    scale = weights / scattering_lipschitz(image_shape, J, path_weights=weights)
    channels = coefficients.shape[1] // len(weights)
    return (coefficients * scale.repeat(channels).to(coefficients.dtype)[:, None, None]).flatten(1)


def front_end_features(front_end: str, images: torch.Tensor, groups: int,
                       scatter: Scatter = scattering_features, normalisation: str = "standardise",
                       order_weights: tuple[float, ...] = (1.0, 1.0, 1.0)) -> tuple[torch.Tensor, list[ChannelBlock]]:
    """(N, C, H, W) images -> (rows, where each scattering part's (channels, positions) block sits). ``standardise``:
    rows of norm 1; ``lipschitz``: rows that are a 1-Lipschitz function of the images (module docstring)."""
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation {normalisation!r}: use one of {', '.join(NORMALISATIONS)}")
    names = parse_front_end(front_end)
    total_weight = sum(PART_WEIGHTS[name] ** 2 for name in names) ** 0.5
    parts, blocks, start = [], [], 0
    for name in names:
        if name == "pixels":
            part = unit_pixels(images) if normalisation == "standardise" else centred_pixels(images)
        else:
            coefficients = scatter(images, SCATTERING_SCALES[name])
            if normalisation == "standardise":
                part_groups = groups if name == "scattering" else FINE_SCATTERING_GROUPS
                part = per_sample_group_standardize(coefficients, part_groups)
            else:
                part = lipschitz_scattering(coefficients, SCATTERING_SCALES[name], order_weights,
                                            tuple(images.shape[-2:]))
            blocks.append(ChannelBlock(start, coefficients.shape[1], coefficients[0, 0].numel()))
        parts.append(part * (PART_WEIGHTS[name] / total_weight))
        start += part.shape[1]
    return torch.cat(parts, dim=1), blocks


def channel_whitener(moment: torch.Tensor, floor: float, noise_std: float = 0.0) -> torch.Tensor:
    """``c * U diag((λ⁺ + λ0)^(-1/2)) U^T`` for the released moment ``S = U diag(λ) U^T`` (noise may make some λ < 0:
    λ⁺ = max(λ, 0)), and ``c`` such that the whitened part keeps its energy: ``c^2 sum λ⁺ / (λ⁺ + λ0) = sum λ⁺``
    (so the parts keep their relative weights). The floor ``λ0 = max(floor * sum(λ⁺) / C, 2 noise_std sqrt(C))``
    never goes below the noise's spectral norm (about 2 s sqrt(C) for symmetric Gaussian noise of std s per
    entry, Wigner's semicircle): directions the noise could have made are not amplified."""
    if not floor > 0:
        raise ValueError(f"the whitening floor must be > 0, got {floor}")
    eigenvalues, vectors = torch.linalg.eigh(moment.double())
    eigenvalues = eigenvalues.clamp_min(0)
    energy, channels = eigenvalues.sum(), len(eigenvalues)
    if not energy > 0:
        return torch.eye(channels)
    lowest = max(floor * energy / channels, 2 * noise_std * channels**0.5)
    scales = (eigenvalues + lowest).rsqrt()
    scales = scales * (energy / (eigenvalues * scales**2).sum()).sqrt()
    return ((vectors * scales) @ vectors.T).float()


def project_rows(rows: torch.Tensor) -> torch.Tensor:
    """Each row projected onto the unit ball, x min(1, 1 / ||x||) (1-Lipschitz; ``InputNormClip``): in place on
    whole data sets, out of place when differentiated."""
    if rows.requires_grad:
        return InputNormClip(1.0)(rows)
    norms = rows.flatten(1).norm(dim=1).view(-1, *[1] * (rows.dim() - 1))
    return rows.mul_((1 / norms.clamp_min(1e-12)).clamp(max=1.0))


@dataclass
class PrivatePreprocessing:
    """Centring and whitening with released statistics: ``preprocessing(rows)`` applies both. ``radius`` None: each
    step is followed by a rescaling to norm 1 (``standardise``); a radius c: the rows are divided by c, centred,
    whitened, then projected onto the unit ball (``lipschitz``, constant :meth:`lipschitz`)."""

    mean: torch.Tensor | None = None
    whiteners: list[tuple[ChannelBlock, torch.Tensor]] = field(default_factory=list)
    radius: float | None = None

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return self.whiten(self.centre(self.scale(rows)))

    def lipschitz(self) -> float:
        """Certified Lipschitz constant: (1 / c) max(1, max_b ||M_b||_2) (a block-diagonal map, identity outside the
        blocks; the translation and the projection are 1-Lipschitz); infinite when rows are rescaled."""
        if self.radius is None:
            return float("inf")
        gains = [torch.linalg.matrix_norm(matrix.double(), ord=2).item() * (1 + 1e-9) for _, matrix in self.whiteners]
        return max([1.0, *gains]) / self.radius

    def scale(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows / c`` (in place on whole data sets); unchanged when rows are rescaled (no radius)."""
        if self.radius is None:
            return rows
        return rows / self.radius if rows.requires_grad else rows.div_(self.radius)

    def centre(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` minus the released mean, then (no radius) rescaled to norm 1 (:func:`centre_and_rescale`);
        unchanged if no mean."""
        if self.mean is None:
            return rows
        if self.radius is None:
            return centre_and_rescale(rows, self.mean)
        return rows - self.mean if rows.requires_grad else rows.sub_(self.mean)

    def whiten(self, rows: torch.Tensor) -> torch.Tensor:
        """Each whitened block multiplied by its matrix (channels mixed at every position), then norm 1 (no radius)
        or projected onto the unit ball. In place, in chunks, on whole data sets; out of place when differentiated."""
        if not self.whiteners and self.radius is None:
            return rows
        if rows.requires_grad:
            return self._whitened(rows)
        for chunk in rows.split(_CHUNK_ROWS):
            chunk.copy_(self._whitened(chunk))
        return rows

    def _whitened(self, rows: torch.Tensor) -> torch.Tensor:
        pieces, done = [], 0
        for block, matrix in sorted(self.whiteners, key=lambda item: item[0].start):
            pieces.append(rows[:, done:block.start])
            pieces.append(torch.einsum("cd,ndp->ncp", matrix, block.view(rows)).flatten(1))
            done = block.stop
        pieces.append(rows[:, done:])
        whitened = torch.cat(pieces, dim=1)
        return rescale_rows(whitened) if self.radius is None else project_rows(whitened)


def release_preprocessing(engine: LipDPEngine, train_rows: torch.Tensor, blocks: list[ChannelBlock],
                          centring_noise: float | None, whitening_noise: float | None,
                          whitening_floor: float, radius: float | None = None
                          ) -> tuple[PrivatePreprocessing, torch.Tensor]:
    """Release the statistics through ``engine`` (each accounted there; a noise multiplier of 0/None skips it) and
    preprocess the training rows with them, in place. Returns (the preprocessing for other splits, the rows).
    Both releases clip rows to norm 1: the front end's rows have norm 1 (no radius), or rows divided by ``radius``."""
    preprocessing, norm_bound = PrivatePreprocessing(radius=radius), 1.0
    train_rows = preprocessing.scale(train_rows)
    if centring_noise:
        preprocessing.mean = engine.private_mean(train_rows, centring_noise, norm_bound)
        train_rows = preprocessing.centre(train_rows)
    if whitening_noise and blocks:
        moments = engine.private_channel_moments(train_rows, blocks, whitening_noise, norm_bound)
        noise_std = whitening_noise * channel_moments_sensitivity(norm_bound)
        preprocessing.whiteners = [(b, channel_whitener(m, whitening_floor, noise_std)) for b, m in zip(blocks, moments)]
    return preprocessing, preprocessing.whiten(train_rows)
