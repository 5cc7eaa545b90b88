"""A fixed, per-sample front end: the 2-D wavelet scattering transform (Mallat 2012; Bruna & Mallat 2013).

Features of one image depend on that image alone, so computing them costs no privacy (docs/design.md §2): only the
trainable head needs sensitivity bounds. Scattering with J=2, L=8 on 28x28 images gives 81 channels of 7x7
(1 zeroth-order, J*L = 16 first-order, L^2 J(J-1)/2 = 64 second-order coefficients per position); with
a linear head on top it is the strongest DP-SGD baseline on Fashion-MNIST (Tramèr & Boneh 2021,
"Differentially Private Learning Needs Better Features").

The transform comes from ``kymatio`` (its top-level import breaks on current scipy, so the torch frontend is
imported directly). Features are cached on disk (``$LIPDP_CACHE`` or ``~/.cache/lipdp``), never in the repo.
"""

from __future__ import annotations

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
