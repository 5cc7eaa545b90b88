"""Certified upper bounds on operator norms (Lipschitz constants) of linear layers.

* Dense: the largest singular value of W, certified in float64: from the symmetric eigensolver, or, warm-started
  from the previous top singular vector, a power-iteration estimate certified by a Cholesky factorisation
  (``dense_certified_norm``).
* Convolution: the norm of the real operator, padding and stride included, from the FFT of the kernel (Sedghi,
  Gupta & Long 2019, "The singular values of convolutional layers"), certified like a batch of dense matrices (one
  per frequency). A strided convolution is rewritten as a stride-1 convolution over the s*s polyphase components of its input, which turns it into
  a block-circulant operator whose norm is max over frequencies of the largest singular value of the kernel's
  transfer matrix. Zero padding is certified by embedding the padded input in a torus large enough that no
  output wraps around (the real operator is then a compression of that circulant: norm <= the circulant's).
* Every bound gets a relative slack of 1e-6 for floating point error.

``CertifiedNormCache`` keeps a bound valid cheaply while weights move (docs/design.md §2): after an exact
computation at weights W0, ``||op(W)|| <= ||op(W0)|| + c * ||W - W0||_F`` (Weyl's inequality), where
``c * ||.||_F`` bounds the operator norm of any kernel (c = 1 for dense layers, c = sqrt(max patch count) for
convolutions). The expensive computation is redone every K optimizer steps, or sooner when the drift term
exceeds a tolerance.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

FLOAT_SLACK = 1e-6


#: Relative margin above the warm-started estimate theta of lambda_max(G) at which the Cholesky certificate is tried:
#: a warm-certified norm is at most sqrt(1 + WARM_MARGIN) (0.05%) above the exact one.
WARM_MARGIN = 1e-3
#: Power steps from the warm start before the Rayleigh quotient (more certify more often after large moves).
POWER_STEPS = 2
#: Below this many flops of eigensolver work (batch * n^3) the eigensolver alone is used, without vectors: it is then
#: cheaper than the certificate's dozen tensor operations (``python -m benchmarks.norm_certificate``).
WARM_MIN_WORK = 64**3
#: Below this lambda the warm certificate is not used (Rump's bound has an underflow term): the eigensolver is.
MIN_CERTIFIED = 1e-200


@dataclass(frozen=True)
class CertifiedNorm:
    """A certified operator-norm bound ``value``, the top singular vectors it was found with (``vectors``, the warm
    start of the next computation at nearby weights) and whether the warm certificate gave it (``warm``; False: the
    eigensolver did)."""

    value: float
    vectors: torch.Tensor | None = None
    warm: bool = False


def _gamma(k: int) -> float:
    """gamma_k = k u / (1 - k u), u the float64 unit roundoff: the relative error of a k-term sum (Higham, §3.1)."""
    unit = torch.finfo(torch.float64).eps / 2
    return k * unit / (1 - k * unit)


def _real_embedding(matrices: torch.Tensor) -> torch.Tensor:
    """M = A + iB (..., r, c) -> [[A, -B], [B, A]] (..., 2r, 2c): a real matrix with the same singular values
    (each twice), so that the real-arithmetic certificate below applies verbatim."""
    real, imaginary = matrices.real, matrices.imag
    return torch.cat([torch.cat([real, -imaginary], -1), torch.cat([imaginary, real], -1)], -2)


def certified_largest_singular_value(matrices: torch.Tensor, start: torch.Tensor | None = None) -> CertifiedNorm:
    """max over a real float64 (batch, r, c) batch of sigma_max, certified, from each smaller Gram matrix G_b.

    Without ``start``, or for small work (WARM_MIN_WORK): the symmetric eigensolver (backward stable: error <= c n
    eps ||G||, inside FLOAT_SLACK).
    With ``start`` (batch, n), the top singular vectors at nearby weights (e.g. the previous step's): POWER_STEPS
    power steps give theta_b = v_b^T G_b v_b <= lambda_max(G_b), and lambda = max_b theta_b (1 + WARM_MARGIN) is
    certified >= every lambda_max(G_b) when the Cholesky factorisation of (lambda - alpha) I - G_b completes for
    every b: a float Cholesky that completes on A - alpha I with alpha >= gamma_{n+1} / (1 - 2 gamma_{n+1}) tr(A)
    proves A positive definite (Rump 2006, "Verification of positive definiteness", BIT 46), here A = lambda I - G_b,
    tr(A) <= n lambda; alpha = 2 n gamma_{n+1} lambda also covers the rounding of the shift and of the diagonal. The
    certificate is 1.8-3.3x faster than the eigensolver (``benchmarks.norm_certificate``); when one fails, the eigensolver answers (a poor start
    costs time, never soundness). Either way the rounding of G itself, ||fl(G) - G||_2 <= gamma_m ||M||_F^2 (m the
    inner dimension), is added, then FLOAT_SLACK.
    """
    rows, cols = matrices.shape[-2:]
    gram = matrices.mT @ matrices if rows >= cols else matrices @ matrices.mT
    n, inner = gram.shape[-1], max(rows, cols)
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1).max()

    def bound(largest: float, trace_value: float) -> float:  # sigma from lambda, with G's rounding and the slack
        return math.sqrt(max(largest, 0.0) + _gamma(inner) * trace_value) * (1 + FLOAT_SLACK)

    if gram.shape[:-2].numel() * n**3 < WARM_MIN_WORK:  # the eigensolver is cheaper than the certificate's overhead
        return CertifiedNorm(bound(*torch.stack([torch.linalg.eigvalsh(gram)[..., -1].max(), trace]).tolist()))
    if start is not None and start.shape == gram.shape[:-1] and start.device == gram.device:
        vectors = start.to(torch.float64).unsqueeze(-1)
        for _ in range(POWER_STEPS):
            vectors = gram @ vectors
            vectors = vectors / vectors.norm(dim=-2, keepdim=True).clamp_min(1e-300)
        images = gram @ vectors
        claimed = (vectors * images).sum((-2, -1)).max() * (1 + WARM_MARGIN)
        shifted = -gram
        shifted.diagonal(dim1=-2, dim2=-1).add_(claimed * (1 - 2 * n * _gamma(n + 1)))
        failures = torch.linalg.cholesky_ex(shifted).info.count_nonzero()
        claimed_value, failed, trace_value = torch.stack([claimed, failures.to(torch.float64), trace]).tolist()
        if not failed and MIN_CERTIFIED < claimed_value < math.inf:  # the next start: images (scale irrelevant)
            return CertifiedNorm(bound(claimed_value, trace_value), images.squeeze(-1), warm=True)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    return CertifiedNorm(bound(*torch.stack([eigenvalues[..., -1].max(), trace]).tolist()),
                         eigenvectors[..., -1].clone())


def dense_certified_norm(weight: torch.Tensor, start: torch.Tensor | None = None) -> CertifiedNorm:
    """Certified sigma_max of a (out, in) matrix in float64 (``certified_largest_singular_value``; ``start``: the
    previous computation's ``vectors``)."""
    return certified_largest_singular_value(weight.detach().to(torch.float64).unsqueeze(0), start)


def dense_operator_norm(weight: torch.Tensor) -> float:
    """Certified largest singular value of a (out, in) matrix (float64, by the eigensolver), with floating point
    slack."""
    return dense_certified_norm(weight).value


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
        """The geometry of ``module`` on inputs of spatial size ``input_hw``; ValueError for reflect/replicate
        padding."""
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
        """Output spatial size for ``kernel_hw``: (n + pad - d (k - 1) - 1) // s + 1 per axis."""
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


def _circulant_norm(kernel: torch.Tensor, torus_hw: tuple[int, int], groups: int,
                    start: torch.Tensor | None) -> CertifiedNorm:
    """Certified norm of the stride-1 circular correlation with ``kernel`` on a torus of size ``torus_hw``: the
    largest singular value over frequencies of the kernel's transfer matrices (exact up to the certificate's
    margin, ``certified_largest_singular_value``)."""
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
    return certified_largest_singular_value(_real_embedding(transfer.reshape(-1, co // groups, cig)), start)


def conv2d_certified_norm(kernel: torch.Tensor, geometry: ConvGeometry,
                          start: torch.Tensor | None = None) -> CertifiedNorm:
    """Certified upper bound of the norm of the real conv2d operator (padding and stride included); ``start``:
    the previous computation's ``vectors`` (one per frequency), to warm-start the certificate."""
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
    if multiplicity > 1 or any(n % s for n, s in zip(torus, stride)):  # only circular padding gets here
        # Stride-1 circulant, subsampled (with repeats) at the output positions: ||S|| = sqrt(mult).
        norm = _circulant_norm(kernel, torus, geometry.groups, start)
    else:
        norm = _circulant_norm(
            _polyphase(kernel, stride), (torus[0] // stride[0], torus[1] // stride[1]), geometry.groups, start
        )
    return CertifiedNorm(norm.value * math.sqrt(multiplicity), norm.vectors, norm.warm)


def conv2d_operator_norm(kernel: torch.Tensor, geometry: ConvGeometry) -> float:
    """Certified upper bound of the norm of the real conv2d operator (padding and stride included), by the
    eigensolver."""
    return conv2d_certified_norm(kernel, geometry).value


def _matches(reference: torch.Tensor, weight: torch.Tensor) -> bool:
    return reference.shape == weight.shape and reference.dtype == weight.dtype and reference.device == weight.device


def _drift_slack(dtype: torch.dtype) -> float:
    """Factor that makes the measured ||fl(W - W0)||_F an upper bound of the exact ||W - W0||_F: the difference
    is rounded once in ``dtype`` (|fl(a - b) - (a - b)| <= u |a - b|, u = eps / 2, exact when subnormal), so
    ||W - W0|| <= ||fl(W - W0)|| / (1 - u) <= (1 + eps) ||fl(W - W0)||; the float64 norm adds a relative error
    far below ``FLOAT_SLACK``."""
    return (1 + torch.finfo(dtype).eps) * (1 + FLOAT_SLACK)


@dataclass(eq=False)
class _Reference:
    """One exact computation: the weight W0 it was made at (a copy), its certified norm, when, the warm start it
    was made from (``start``, kept so that a resumed run repeats it exactly) and the vectors it found
    (``vectors``, the warm start of the next one)."""

    weight: torch.Tensor
    norm: float
    refreshed_at: int
    start: torch.Tensor | None = None
    vectors: torch.Tensor | None = None


@dataclass(eq=False)
class PendingDrift:
    """``||W - W0||_F`` measured on the device (``tensor``, float64, no host sync yet) against ``reference``, for
    the tensor ``weight``; ``CertifiedNormCache.bound`` uses ``value`` (the host copy) only for that same pair."""

    reference: _Reference
    weight: torch.Tensor
    tensor: torch.Tensor
    value: float | None = None


class CertifiedNormCache:
    """Keeps a certified operator-norm bound per (module, key) valid as the weights move (docs/design.md §2).

    After an exact computation at weights W0: ``||op(W)|| <= ||op(W0)|| + c ||W - W0||_F`` (Weyl's inequality for
    singular values; c = ``frobenius_factor`` bounds ||op(K)|| / ||K||_F for every kernel K: 1 for dense layers,
    sqrt(max patch count) for convolutions). The drift term is measured with its rounding covered
    (``_drift_slack``: one rounding of the difference in the weight's dtype, a float64 norm) and never skipped,
    so the bound is sound at every call and only ever >= the exact one.

    The exact computation (``exact(W, start) -> CertifiedNorm``: the dense certificate warm-started from the previous
    reference's vector, or the FFT) is redone when ``refresh_every`` optimizer steps (``advance``) have passed
    since the last one, or when the drift term exceeds ``refresh_tolerance * ||op(W0)||``; in between a step costs
    O(#parameters). ``state_dict`` keeps the references so that a resumed run takes the same decisions (its exact
    norms are recomputed from the saved W0 at load, never trusted from the file).
    """

    def __init__(self, refresh_tolerance: float = 0.01, refresh_every: int = 20) -> None:
        if not refresh_tolerance >= 0:
            raise ValueError(f"refresh_tolerance must be >= 0, got {refresh_tolerance}")
        if not (isinstance(refresh_every, int) and refresh_every >= 1):
            raise ValueError(f"refresh_every must be an integer >= 1, got {refresh_every!r}")
        self.refresh_tolerance = float(refresh_tolerance)
        self.refresh_every = refresh_every
        self.steps = 0
        self.exact_computations = 0
        self.warm_computations = 0  # of which the warm-started certificate gave the norm (no eigensolver)
        self._entries: "weakref.WeakKeyDictionary[torch.nn.Module, dict[object, _Reference]]" = (
            weakref.WeakKeyDictionary())
        self._paths: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()
        self._loaded: dict[tuple[str, str], tuple[torch.Tensor, int]] = {}

    def advance(self) -> None:
        """One optimizer step was taken (the clock of ``refresh_every``)."""
        self.steps += 1

    def pending_drifts(
        self, requests: list[tuple[torch.nn.Module, object, torch.Tensor]]
    ) -> list[PendingDrift | None]:
        """Per (module, key, W): ``||W - W0||_F`` against its reference as a 0-dim float64 tensor on W's device
        (None where there is no reference of W's shape and dtype), from batched calls: no host synchronisation
        (the caller fetches all values at once). Rounding is covered by ``_DRIFT_SLACK`` in ``bound``."""
        found = {}
        for index, (module, key, weight) in enumerate(requests):
            reference = self._entries.get(module, {}).get(key)
            if reference is not None and _matches(reference.weight, weight):
                found[index] = (reference, weight)
        result: list[PendingDrift | None] = [None] * len(requests)
        if found:
            differences = torch._foreach_sub([w.detach() for _, w in found.values()],
                                             [r.weight for r, _ in found.values()])
            for index, norm in zip(found, torch._foreach_norm(differences, 2, dtype=torch.float64)):
                result[index] = PendingDrift(*found[index], norm)
        return result

    def bound(
        self,
        module: torch.nn.Module,
        key: object,
        weight: torch.Tensor,
        exact: Callable[[torch.Tensor, torch.Tensor | None], CertifiedNorm],
        frobenius_factor: float,
        drift: PendingDrift | None = None,
        path: str = "",
    ) -> float:
        """Certified bound of ``||op(weight)||``: exact(W0) + c ||W - W0||_F, or a fresh exact computation.

        ``drift``: a measurement from ``pending_drifts`` (used only if it is for this reference and this very
        tensor); without one the drift is measured here. ``path``: the module's name, for ``state_dict``.
        """
        given, weight = weight, weight.detach()
        per_module = self._entries.setdefault(module, {})
        reference = per_module.get(key)
        if reference is None:
            reference = self._adopt_loaded(path, key, weight, exact)
            if reference is not None:
                per_module[key] = reference
                self._paths.setdefault(module, path)
        if reference is not None and _matches(reference.weight, weight):
            if drift is not None and drift.reference is reference and drift.weight is given and drift.value is not None:
                measured = drift.value
            else:
                measured = torch.linalg.vector_norm(weight - reference.weight, dtype=torch.float64).item()
            term = frobenius_factor * measured * _drift_slack(weight.dtype)
            if self.steps - reference.refreshed_at < self.refresh_every and term <= self.refresh_tolerance * reference.norm:
                return reference.norm + term
        start = reference.vectors if reference is not None and _matches(reference.weight, weight) else None
        per_module[key] = reference = self._compute(weight.clone(), exact, start, self.steps)
        self._paths.setdefault(module, path)
        return reference.norm

    def _compute(self, weight: torch.Tensor, exact, start: torch.Tensor | None, refreshed_at: int) -> _Reference:
        certified = exact(weight, start)
        self.exact_computations += 1
        self.warm_computations += int(certified.warm)
        return _Reference(weight, certified.value, refreshed_at, start, certified.vectors)

    def _adopt_loaded(self, path, key, weight, exact) -> _Reference | None:
        """A reference restored by ``load_state_dict`` for (path, key): its norm recomputed exactly from W0."""
        saved = self._loaded.pop((path, repr(key)), None)
        if saved is None:
            return None
        reference_weight, refreshed_at, start = saved
        reference_weight = reference_weight.to(device=weight.device, dtype=weight.dtype)
        if not _matches(reference_weight, weight):
            return None
        start = None if start is None else start.to(device=weight.device)
        return self._compute(reference_weight, exact, start, refreshed_at)

    def state_dict(self) -> dict:
        """The step clock and every reference (W0 and the warm start it was computed from, on the CPU), keyed by
        (module path, repr(key))."""
        references = {}
        for module, per_module in self._entries.items():
            path = self._paths.get(module, "")
            for key, reference in per_module.items():
                start = None if reference.start is None else reference.start.cpu()
                references[(path, repr(key))] = (reference.weight.cpu(), reference.refreshed_at, start)
        references.update({k: v for k, v in self._loaded.items() if k not in references})
        return {"steps": self.steps, "references": references}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``'s clock and references; each is adopted (norm recomputed from W0 and its warm
        start, never read from the file) at its next use. References saved without a warm start load too."""
        self._entries = weakref.WeakKeyDictionary()
        self._paths = weakref.WeakKeyDictionary()
        self.steps = int(state["steps"])
        self._loaded = {}
        for k, saved in state["references"].items():
            weight, at, start = (*saved, None) if len(saved) == 2 else saved
            self._loaded[tuple(k)] = (weight, int(at), start)


DEFAULT_CACHE = CertifiedNormCache()
