"""Certified upper bounds on operator norms (Lipschitz constants) of linear layers.

* Dense: the exact largest singular value (SVD in float64).
* Convolution: the exact norm of the real operator, padding and stride included, from the FFT of the
  kernel (Sedghi, Gupta & Long 2019, "The singular values of convolutional layers"). A strided convolution
  is rewritten as a stride-1 convolution over the s*s polyphase components of its input, which turns it into
  a block-circulant operator whose norm is max over frequencies of the largest singular value of the kernel's
  transfer matrix. Zero padding is certified by embedding the padded input in a torus large enough that no
  output wraps around (the real operator is then a compression of that circulant: norm <= the circulant's).
* Every bound gets a relative slack of 1e-6 for floating point error.

``CertifiedNormCache`` keeps a bound valid cheaply while weights move (DESIGN.md §2): after an exact
computation at weights W0, ``||op(W)|| <= ||op(W0)|| + c * ||W - W0||_F`` (Weyl's inequality), where
``c * ||.||_F`` bounds the operator norm of any kernel (c = 1 for dense layers, c = sqrt(max patch count) for
convolutions). The expensive computation is redone only when the drift term exceeds a tolerance.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

FLOAT_SLACK = 1e-6


def dense_operator_norm(weight: torch.Tensor) -> float:
    """Largest singular value of a (out, in) matrix, with floating point slack."""
    sigma = torch.linalg.matrix_norm(weight.detach().to(torch.float64), ord=2).item()
    return sigma * (1 + FLOAT_SLACK)


@dataclass(frozen=True)
class ConvGeometry:
    """Everything besides the kernel that defines a 2-D convolution operator on one input size."""

    stride: tuple[int, int]
    dilation: tuple[int, int]
    padding: tuple[int, int, int, int]  # (top, bottom, left, right)
    padding_mode: str  # "zeros" or "circular"
    groups: int
    input_hw: tuple[int, int]

    @staticmethod
    def of(module: torch.nn.Conv2d, input_hw: tuple[int, int]) -> "ConvGeometry":
        left, right, top, bottom = module._reversed_padding_repeated_twice
        if module.padding_mode not in ("zeros", "circular"):
            raise ValueError(
                f"padding_mode={module.padding_mode!r} is not supported: reflect/replicate padding copies "
                "pixels, which raises the Lipschitz constant. Use padding_mode='zeros' or 'circular'."
            )
        return ConvGeometry(
            stride=tuple(module.stride),
            dilation=tuple(module.dilation),
            padding=(top, bottom, left, right),
            padding_mode=module.padding_mode,
            groups=module.groups,
            input_hw=tuple(input_hw),
        )

    def output_hw(self, kernel_hw: tuple[int, int]) -> tuple[int, int]:
        (top, bottom, left, right) = self.padding
        pads = (top + bottom, left + right)
        return tuple(
            (n + p - d * (k - 1) - 1) // s + 1
            for n, p, k, s, d in zip(self.input_hw, pads, kernel_hw, self.stride, self.dilation)
        )

    def patch_count(self, kernel_hw: tuple[int, int], output_hw: tuple[int, int] | None = None) -> int:
        """Max over input pixels of the number of (kernel tap, output position) pairs that read it.

        It is the factor in the conv weight-gradient bound and in the Frobenius bound of the operator
        norm. Counted exactly on this geometry (separable: product of the two 1-D counts). Without
        wrap-around it is at most ceil(k / (s / gcd(d, s))) per axis, never above k.
        ``output_hw``: the real output size when it is not ``output_hw()`` (max pooling with ceil_mode=True
        adds windows that run past the end; taps outside the input read padding and are not counted).
        """
        out_hw = self.output_hw(kernel_hw) if output_hw is None else tuple(output_hw)
        count = 1
        for axis in range(2):
            n, k, s, d = self.input_hw[axis], kernel_hw[axis], self.stride[axis], self.dilation[axis]
            before = self.padding[2 * axis]
            hits = [0] * n
            for i in range(out_hw[axis]):
                for a in range(k):
                    pos = s * i + d * a - before
                    if self.padding_mode == "circular":
                        hits[pos % n] += 1
                    elif 0 <= pos < n:
                        hits[pos] += 1
            count *= max(hits) if hits else 0
        return count


def _dilate(kernel: torch.Tensor, dilation: tuple[int, int]) -> torch.Tensor:
    if dilation == (1, 1):
        return kernel
    co, ci, kh, kw = kernel.shape
    out = kernel.new_zeros(co, ci, dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
    out[:, :, :: dilation[0], :: dilation[1]] = kernel
    return out


def _polyphase(kernel: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
    """Stride-s kernel (co, ci, kh, kw) -> stride-1 kernel (co, ci*sh*sw, ceil(kh/sh), ceil(kw/sw)).

    y[i] = sum_j w[j] x[s*i + j] = sum_b sum_a w[s*a + b] x_b[i + a] with x_b[m] = x[s*m + b].
    """
    sh, sw = stride
    co, ci, kh, kw = kernel.shape
    ah, aw = -(-kh // sh), -(-kw // sw)
    padded = kernel.new_zeros(co, ci, ah * sh, aw * sw)
    padded[:, :, :kh, :kw] = kernel
    phases = padded.reshape(co, ci, ah, sh, aw, sw).permute(0, 1, 3, 5, 2, 4)
    return phases.reshape(co, ci * sh * sw, ah, aw)


def _circulant_norm(kernel: torch.Tensor, torus_hw: tuple[int, int], groups: int) -> float:
    """Exact norm of the stride-1 circular correlation with ``kernel`` on a torus of size ``torus_hw``."""
    nh, nw = torus_hw
    co, cig, kh, kw = kernel.shape
    folded = kernel.new_zeros(co, cig, nh, nw)
    for a in range(kh):  # fold taps that wrap around a small torus
        for b in range(kw):
            folded[:, :, a % nh, b % nw] += kernel[:, :, a, b]
    # A real kernel's transfer matrices at -w are the conjugates of those at w (same singular values): the
    # half spectrum of rfft2 holds every distinct norm.
    transfer = torch.fft.rfft2(folded)  # (co, cig, nh, nw // 2 + 1)
    transfer = transfer.reshape(groups, co // groups, cig, nh, nw // 2 + 1).permute(0, 3, 4, 1, 2)
    return torch.linalg.matrix_norm(transfer, ord=2).max().item()


def conv2d_operator_norm(kernel: torch.Tensor, geometry: ConvGeometry) -> float:
    """Certified upper bound of the norm of the real conv2d operator (padding and stride included)."""
    kernel = _dilate(kernel.detach().to(torch.float64), geometry.dilation)
    top, bottom, left, right = geometry.padding
    stride = geometry.stride
    if geometry.padding_mode == "zeros":
        # Embed the zero-padded input in a torus (multiple of the stride) with no wrap-around.
        torus = tuple(
            -(-(n + p) // s) * s for n, p, s in zip(geometry.input_hw, (top + bottom, left + right), stride)
        )
        multiplicity = 1
    else:
        torus = geometry.input_hw
        out_hw = geometry.output_hw(tuple(kernel.shape[-2:]))
        multiplicity = 1
        for axis, before in ((0, top), (1, left)):
            positions = [(stride[axis] * i - before) % torus[axis] for i in range(out_hw[axis])]
            multiplicity *= max(positions.count(p) for p in set(positions)) if positions else 1
        if multiplicity > 1 or any(n % s for n, s in zip(torus, stride)):
            # Stride-1 circulant, subsampled (with repeats) at the output positions: ||S|| = sqrt(mult).
            norm = _circulant_norm(kernel, torus, geometry.groups) * math.sqrt(multiplicity)
            return norm * (1 + FLOAT_SLACK)
    norm = _circulant_norm(
        _polyphase(kernel, stride), (torus[0] // stride[0], torus[1] // stride[1]), geometry.groups
    )
    return norm * math.sqrt(multiplicity) * (1 + FLOAT_SLACK)


class CertifiedNormCache:
    """Keeps a certified operator-norm bound per (module, geometry) valid as weights move (Weyl).

    ``bound = exact(W0) + frobenius_factor * ||W - W0||_F``; recomputed exactly when the drift term exceeds
    ``refresh_tolerance * exact(W0)``. Sound at every call: the drift term is never skipped.
    """

    def __init__(self, refresh_tolerance: float = 0.01) -> None:
        self.refresh_tolerance = refresh_tolerance
        self._entries: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
        self.exact_computations = 0

    def bound(
        self,
        module: torch.nn.Module,
        key: object,
        weight: torch.Tensor,
        exact: Callable[[torch.Tensor], float],
        frobenius_factor: float,
    ) -> float:
        weight = weight.detach()
        per_module = self._entries.setdefault(module, {})
        entry = per_module.get(key)
        if entry is not None and entry[0].shape == weight.shape:
            reference, reference_norm = entry
            drift = frobenius_factor * (weight - reference).to(torch.float64).norm().item()
            if drift <= self.refresh_tolerance * reference_norm:
                return reference_norm + drift
        reference_norm = exact(weight)
        self.exact_computations += 1
        per_module[key] = (weight.clone(), reference_norm)
        return reference_norm


DEFAULT_CACHE = CertifiedNormCache()
