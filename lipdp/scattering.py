"""A fixed, per-sample front end: the 2-D wavelet scattering transform (Mallat 2012; Bruna & Mallat 2013).

Features of one image depend on that image alone, so computing them costs no privacy (docs/design.md §2): only the
trainable head needs sensitivity bounds. Scattering with J=2, L=8 on 28x28 images gives 81 channels of 7x7
(1 zeroth-order, J*L = 16 first-order, L^2 J(J-1)/2 = 64 second-order coefficients per position); with
a linear head on top it is the strongest DP-SGD baseline on Fashion-MNIST (Tramèr & Boneh 2021,
"Differentially Private Learning Needs Better Features").

``scattering_lipschitz`` certifies the transform's L2 Lipschitz constant from its filter bank (0.451 for J = 2 and
0.770 for J = 1 on 28x28 images), so that certificates can hold in pixel space (docs/design.md §6).

The transform comes from ``kymatio`` (its top-level import breaks on current scipy, so the torch frontend is
imported directly). Features are cached on disk (``$LIPDP_CACHE`` or ``~/.cache/lipdp``), never in the repo.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where scattering features are cached: ``$LIPDP_CACHE``, else ``~/.cache/lipdp``."""
    return Path(os.environ.get("LIPDP_CACHE", Path.home() / ".cache" / "lipdp"))


def scattering_transform(shape: tuple[int, int], J: int = 2, L: int = 8) -> torch.nn.Module:
    """kymatio's (differentiable) transform: (N, C, H, W) -> (N, C, K, H / 2^J, W / 2^J)."""
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    return ScatteringTorch2D(J=J, shape=tuple(shape), L=L)


def scattering_features(
    images: torch.Tensor, J: int = 2, L: int = 8, batch_size: int = 1000, cache: bool = True,
    progress: bool = True,
) -> torch.Tensor:
    """Scattering coefficients of (N, C, H, W) images -> (N, C * K, H / 2^J, W / 2^J) with K = 1 + JL + L^2 J(J-1)/2."""
    key = hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16]
    path = cache_dir() / f"scattering-J{J}-L{L}-{tuple(images.shape)}-{key}.pt".replace(" ", "")
    if cache and path.exists():
        return torch.load(path)
    transform = scattering_transform(tuple(images.shape[-2:]), J, L)
    chunks = []
    with torch.no_grad():
        for start in tqdm(range(0, len(images), batch_size), desc="scattering", disable=not progress, leave=False):
            out = transform(images[start:start + batch_size])  # (n, C, K, h, w)
            chunks.append(out.reshape(out.shape[0], -1, *out.shape[-2:]))
    features = torch.cat(chunks)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(features, path)
        logger.info("cached scattering features at %s", path)
    return features


def per_sample_group_standardize(features: torch.Tensor, groups: int, eps: float = 1e-6) -> torch.Tensor:
    """Standardise each sample's channels group-wise by its OWN mean and std (GroupNorm without parameters).

    Per-sample, hence free in privacy; replaces the dataset-level normalisation that would need budget.
    Output (N, F) flattened and divided by sqrt(F), so every sample has L2 norm ~1.
    """
    n, channels = features.shape[:2]
    if channels % groups:
        raise ValueError(f"{channels} channels are not divisible into {groups} groups")
    grouped = features.reshape(n, groups, -1)
    mean = grouped.mean(dim=2, keepdim=True)
    std = grouped.std(dim=2, keepdim=True, unbiased=False)
    standardized = ((grouped - mean) / (std + eps)).reshape(n, -1)
    return standardized / standardized.shape[1] ** 0.5


def _gram(outputs: torch.Tensor) -> torch.Tensor:
    """G = M^H M, real part, of the linear map M whose images of the basis vectors are ``outputs`` (d, ...):
    ||M x||^2 = x^T G x for real x (complex outputs carry a last axis of size 2: real, imaginary)."""
    rows = outputs.reshape(len(outputs), -1)
    return rows @ rows.T


def _largest_eigenvalue(gram: torch.Tensor) -> float:
    """lambda_max of a symmetric PSD float64 matrix, enlarged by 1e-9 relative (eigvalsh's rounding is ~d eps)."""
    return float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0)) * (1 + 1e-9)


def _basis(size: tuple[int, int]) -> torch.Tensor:
    """The d = H W standard basis images, (d, H, W) float64."""
    return torch.eye(size[0] * size[1], dtype=torch.float64).reshape(-1, *size)


def scattering_lipschitz(shape: tuple[int, int], J: int = 2, L: int = 8,
                         path_weights: torch.Tensor | None = None) -> float:
    """A certified upper bound on the L2 Lipschitz constant of x -> w ⊙ S_J(x) (``_scattering_lipschitz``),
    memoised per (shape, J, L, weights): w = ``path_weights`` per kymatio path, default 1."""
    weights = None if path_weights is None else tuple(float(w) for w in path_weights.flatten())
    return _scattering_lipschitz(tuple(shape), J, L, weights)


@functools.lru_cache(maxsize=64)
def _scattering_lipschitz(shape: tuple[int, int], J: int, L: int, path_weights: tuple[float, ...] | None) -> float:
    """A certified upper bound on the L2 Lipschitz constant of x -> w ⊙ S_J(x), kymatio's Scattering2D on
    (H, W) images with each of its K paths (channels: S0, the J L first-order, then the second-order paths in
    kymatio's order) multiplied by ``path_weights[k]`` (default 1).

    S_J = [A_J P x, A_{j1} |T_{λ1} P x|, A_{j2} |T_{λ2} |T_{λ1} P x||]: P the reflection padding, T_λ = D_{2^j} C_ψλ
    (wavelet convolution then subsampling), A_j = crop D_{2^(J-j)} C_φ (low pass, subsampling, unpadding), all
    linear, and |.| 1-Lipschitz pointwise. With the exact Gram matrices of these linear maps (built densely by
    kymatio's own filters and backend on a basis, float64, so padding, subsampling, aliasing and crop are exact):

        c_λ1  = lambda_max( w_λ1^2 A_j1^T A_j1 + sum_λ2 w_λ1λ2^2 ||A_j2||^2 T_λ2^H T_λ2 )   (second layer, per λ1)
        Lip^2 <= lambda_max( P^T [ w_0^2 A_J^T A_J + sum_λ1 c_λ1 T_λ1^H T_λ1 ] P )

    since ||ΔS||^2 = ||w_0 A_J P Δx||^2 + sum_λ1 (||w A_j1 ΔU_λ1||^2 + sum_λ2 ||w A_j2 ΔU_λ1λ2||^2) and
    |ΔU_λ| <= |T_λ ΔU_parent| pointwise (the Littlewood–Paley bound, Mallat 2012 Prop. 2.5, computed per layer
    on the subsampled filters instead of their sup over frequencies). Certified for exact arithmetic; kymatio
    computes in float32 (relative error ~1e-6).
    """
    transform = scattering_transform(shape, J, L).double()
    phi, psi = transform.load_filters()
    backend = transform.backend
    paths = 1 + len(psi) + sum(1 for a in psi for b in psi if b["j"] > a["j"])
    weights = torch.ones(paths, dtype=torch.float64) if path_weights is None else torch.tensor(path_weights,
                                                                                              dtype=torch.float64)
    if len(weights) != paths:
        raise ValueError(f"J={J}, L={L} has {paths} scattering paths, got {len(weights)} path weights")
    padded = (transform._M_padded, transform._N_padded)

    def level_fourier(j: int) -> torch.Tensor:  # the basis of the level-j grid (a real signal there), in Fourier
        basis = _basis((padded[0] // 2**j, padded[1] // 2**j))
        return backend.rfft(basis[..., None].contiguous())

    def low_pass(fourier: torch.Tensor, j: int) -> torch.Tensor:  # A_j
        return backend.unpad(backend.irfft(backend.subsample_fourier(backend.cdgmm(fourier, phi["levels"][j]),
                                                                     k=2 ** (J - j))))

    def wavelet(fourier: torch.Tensor, n: int, level: int) -> torch.Tensor:  # T_λ from the level-`level` grid
        filtered = backend.cdgmm(fourier, psi[n]["levels"][level])
        step = 2 ** (psi[n]["j"] - level)
        return backend.ifft(backend.subsample_fourier(filtered, k=step) if step > 1 else filtered)

    low_pass_norms = {j: _largest_eigenvalue(_gram(low_pass(level_fourier(j), j))) for j in range(J)}
    second_order = iter(range(1 + len(psi), paths))
    second_layer, gains = [], {}  # c_λ1 depends on λ1 through its scale and the weights only
    for n1, first in enumerate(psi):
        children = [(n2, weights[next(second_order)]) for n2, second in enumerate(psi) if second["j"] > first["j"]]
        key = (first["j"], float(weights[1 + n1]), tuple(float(w) for _, w in children))
        if key not in gains:
            fourier = level_fourier(first["j"])
            gram = weights[1 + n1] ** 2 * _gram(low_pass(fourier, first["j"]))
            for n2, weight in children:
                gram += weight**2 * low_pass_norms[psi[n2]["j"]] * _gram(wavelet(fourier, n2, first["j"]))
            gains[key] = _largest_eigenvalue(gram)
        second_layer.append(gains[key])
    images = backend.rfft(transform.pad(_basis(tuple(shape))).contiguous())  # the padding P, exactly
    gram = weights[0] ** 2 * _gram(low_pass(images, 0))
    for n1, gain in enumerate(second_layer):
        gram += gain * _gram(wavelet(images, n1, 0))
    return _largest_eigenvalue(gram) ** 0.5
