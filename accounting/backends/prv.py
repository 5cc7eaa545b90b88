"""PRV backend: numerical composition of privacy loss random variables (Gopi, Lee & Wutschitz 2021).

Source: S. Gopi, Y. T. Lee, L. Wutschitz, "Numerical Composition of Differential Privacy",
NeurIPS 2021, https://arxiv.org/abs/2106.02848, implemented by the ``prv-accountant`` package
(Microsoft). Each mechanism's PRV is truncated to [-L, L] (L from an RDP bound, Remark 5.6),
discretised on a mesh of width ``eps_error / sqrt(N/2 · log(12/delta_error))`` (Theorem 5.5, N the
total number of compositions), self-composed by FFT and convolved with the others. The result
brackets the true ε: ``estimate ± eps_error`` at ``δ ∓ delta_error``; ``upper`` is the guarantee.

Cost: one discretisation per distinct (σ, q) on a grid of about ``2L / mesh`` points (2.7·10⁶ for
T = 10⁵ steps at σ=1.1, q=256/60000), so a history whose σ changes at every step is expensive (40
distinct mechanisms take tens of seconds); constant or piecewise-constant schedules are cheap.

Fallback: ``prv-accountant`` 0.2.0 raises on large ε (its discretised mean check fails, e.g. σ=0.3,
q=0.1, T=1000, where ε ≈ 506). The same algorithm bundled with Opacus
(``opacus.accountants.analysis.prv``) handles those cases; the backend then uses it and says so in
the result's ``note``. Opacus imports torch, so it is imported only when the fallback is needed.
"""

from __future__ import annotations

import abc
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from typing import ClassVar, TypeVar

from accounting import guess
from accounting.backends.base import AccountingError, AccountingResult, EpsilonEvaluator
from accounting.history import Composition
from accounting.validation import check_positive

T = TypeVar("T")

#: δ error used for δ(ε) queries, where δ is not known in advance (ε queries use ``delta_error_ratio·δ``).
DELTA_QUERY_ERROR = 1e-12
#: Refuse grids larger than this many points: peak memory is about 170 bytes a point (long-double arrays;
#: measured 2.2 GB for ε ≈ 506 at eps_error=0.01, σ=0.3, q=0.1, T=1000: 1.3·10⁷ points), so a tiny σ or
#: an absurd step count would otherwise exhaust memory. T = 10⁵ steps at σ=1.1, q=256/60000 take 2.7·10⁶.
MAX_GRID_POINTS = 2 * 10**7

# What the libraries raise when their numerics fail (not bad input: that is validated before).
_NUMERICAL_FAILURES = (RuntimeError, ValueError, ArithmeticError)


class _PRVImplementation(abc.ABC):
    """One PRV library set up for a composition, with the (ε, δ) bounds of any sub-multiset."""

    method: str

    @abc.abstractmethod
    def epsilon(self, counts: Sequence[int], delta: float) -> tuple[float, float, float]:
        """(lower, estimate, upper) ε at δ."""

    @abc.abstractmethod
    def delta(self, counts: Sequence[int], epsilon: float) -> tuple[float, float, float]:
        """(lower, estimate, upper) δ at ε."""


@dataclass(frozen=True)
class _Grid:
    """The discretisation grid: mesh ``eps_error / sqrt(T/2 · log(12/delta_error))`` (Theorem 5.5) on a
    domain covering [-L, L] (L: the safe truncation bound of Remark 5.6, ``accounting.guess.safe_half_width``).

    ``half_width`` widens L to the next half-mesh point at which the libraries' aligned domain
    (``Domain.create_aligned``: [-m·dt, (m+1)·dt], 2m+2 points, m = ceil(L/dt)) has an even FFT-friendly
    size (``scipy.fft.next_fast_len``): a larger truncation bound is still a safe one, and the FFTs of
    the composition run 2-3 times faster than on the sizes with large prime factors L gives otherwise.
    """

    mesh: float
    half_width: float
    points: int

    @classmethod
    def covering(cls, safe_half_width: float, eps_error: float, delta_error: float, total: int) -> _Grid:
        from scipy.fft import next_fast_len

        mesh = eps_error / math.sqrt(total / 2 * math.log(12 / delta_error))
        points = 2 * math.ceil(safe_half_width / mesh) + 2
        while (points := next_fast_len(points, real=True)) % 2:
            points += 1
        grid = cls(mesh, (points // 2 - 1.5) * mesh, points)
        if grid.points > MAX_GRID_POINTS:
            raise AccountingError(
                f"PRV accounting would need a grid of {grid.points:.3g} points (limit {MAX_GRID_POINTS:.3g}): "
                f"ε is very large (the truncation bound is {safe_half_width:.3g}) or eps_error={eps_error} is too "
                f"fine for {total} steps; raise eps_error or use backend 'pld' or 'rdp'")
        return grid


class _PrvAccountantImpl(_PRVImplementation):
    """``prv_accountant.PRVAccountant`` with ``max_self_compositions`` = the set-up counts."""

    def __init__(self, composition: Composition, eps_error: float, delta_error: float):
        from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant

        self.method = f"prv-accountant {version('prv-accountant')}"
        prvs = [PoissonSubsampledGaussianMechanism(sampling_probability=m.sample_rate,
                                                   noise_multiplier=m.noise_multiplier)
                for m in composition.mechanisms]
        grid = _Grid.covering(guess.safe_half_width(composition, eps_error, delta_error), eps_error, delta_error,
                              composition.total_steps)
        # eps_max sets the truncation bound L (instead of PRVAccountant computing a safe L itself, more slowly)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Assuming that true epsilon", category=UserWarning)
            self._accountant = PRVAccountant(prvs=prvs, max_self_compositions=list(composition.counts),
                                             eps_error=eps_error, delta_error=delta_error, eps_max=grid.half_width)

    def epsilon(self, counts: Sequence[int], delta: float) -> tuple[float, float, float]:
        return self._accountant.compute_epsilon(delta, list(counts))

    def delta(self, counts: Sequence[int], epsilon: float) -> tuple[float, float, float]:
        return self._accountant.compute_delta(epsilon, list(counts))


class _OpacusImpl(_PRVImplementation):
    """Opacus's PRV accountant (``opacus.accountants.analysis.prv``), set up as ``opacus.accountants.PRVAccountant``
    does, but for ``max_self_compositions`` = the set-up counts so that sub-multisets reuse the grid."""

    def __init__(self, composition: Composition, eps_error: float, delta_error: float):
        from opacus.accountants.analysis import prv as opacus_prv  # imports torch

        self.method = f"opacus {version('opacus')} PRV"
        self._eps_error, self._delta_error = eps_error, delta_error
        self._compose = opacus_prv.compose_heterogeneous
        prvs = [opacus_prv.PoissonSubsampledGaussianPRV(m.sample_rate, m.noise_multiplier)
                for m in composition.mechanisms]
        grid = _Grid.covering(guess.safe_half_width(composition, eps_error, delta_error), eps_error, delta_error,
                              composition.total_steps)
        domain = opacus_prv.Domain.create_aligned(-grid.half_width, grid.half_width, grid.mesh)
        self._dprvs = [opacus_prv.discretize(opacus_prv.TruncatedPrivacyRandomVariable(p, domain.t_min, domain.t_max),
                                             domain)
                       for p in prvs]

    def epsilon(self, counts: Sequence[int], delta: float) -> tuple[float, float, float]:
        composed = self._compose(dprvs=list(self._dprvs), num_self_compositions=list(counts))
        return composed.compute_epsilon(delta, self._delta_error, self._eps_error)

    def delta(self, counts: Sequence[int], epsilon: float) -> tuple[float, float, float]:
        # Same bounds as prv_accountant.PRVAccountant.compute_delta: the δ estimate at ε ± eps_error, ∓ delta_error.
        composed = self._compose(dprvs=list(self._dprvs), num_self_compositions=list(counts))
        return (float(composed.compute_delta_estimate(epsilon + self._eps_error)) - self._delta_error,
                float(composed.compute_delta_estimate(epsilon)),
                float(composed.compute_delta_estimate(epsilon - self._eps_error)) + self._delta_error)


class _WithFallback:
    """Runs operations on ``prv-accountant``; once its numerics fail, on Opacus's implementation instead."""

    def __init__(self, composition: Composition, eps_error: float, delta_error: float):
        self._args = (composition, eps_error, delta_error)
        self.note = ""
        try:
            self.impl: _PRVImplementation = _quietly(lambda: _PrvAccountantImpl(*self._args))
        except _NUMERICAL_FAILURES as error:
            self._fall_back(error)

    def _fall_back(self, error: Exception) -> None:
        if isinstance(error, AccountingError) or isinstance(getattr(self, "impl", None), _OpacusImpl):
            raise _failure(error, self.note)
        self.note = f"fallback: prv-accountant failed ({type(error).__name__}: {error}); used Opacus's PRV accountant"
        try:
            self.impl = _quietly(lambda: _OpacusImpl(*self._args))
        except _NUMERICAL_FAILURES as opacus_error:
            raise _failure(opacus_error, self.note) from opacus_error

    def run(self, operation: Callable[[_PRVImplementation], tuple[float, float, float]]) -> AccountingResult:
        try:
            return self._result(operation)
        except _NUMERICAL_FAILURES as error:
            self._fall_back(error)
        try:
            return self._result(operation)
        except _NUMERICAL_FAILURES as error:
            raise _failure(error, self.note) from error

    def _result(self, operation: Callable[[_PRVImplementation], tuple[float, float, float]]) -> AccountingResult:
        lower, estimate, upper = (float(v) for v in _quietly(lambda: operation(self.impl)))
        if any(math.isnan(v) for v in (lower, estimate, upper)):
            raise ArithmeticError(f"NaN in the bounds ({lower}, {estimate}, {upper})")
        return AccountingResult(lower, estimate, upper, self.impl.method, self.note)


def _quietly(call: Callable[[], T]) -> T:
    """Run a library call with its floating-point RuntimeWarnings silenced (results are checked instead), and
    Opacus's "optimal order is the smallest alpha" (from the RDP bound that only sizes the PRV grid)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        return call()


def _failure(error: Exception, note: str) -> AccountingError:
    if isinstance(error, AccountingError):
        return error
    return AccountingError(f"PRV accounting failed: {type(error).__name__}: {error}" + (f" ({note})" if note else ""))


class _PRVEvaluator(EpsilonEvaluator):
    def __init__(self, composition: Composition, delta: float, eps_error: float, delta_error: float):
        self._delta = delta
        self._prv = _WithFallback(composition, eps_error, delta_error)
        self.method = self._prv.impl.method

    def _epsilon(self, counts: tuple[int, ...]) -> AccountingResult:
        result = self._prv.run(lambda impl: impl.epsilon(counts, self._delta))
        self.method = result.method
        return result


@dataclass(frozen=True)
class PRVBackend:
    """PRV accountant. ``eps_error``: half-width of the ε bracket (``upper - estimate``, absolute);
    ``delta_error_ratio``: δ error as a fraction of the queried δ (both as recommended by Gopi et al.
    and Opacus's defaults). Cost grows like ``L·sqrt(T)/eps_error`` grid points."""

    eps_error: float = 0.01
    delta_error_ratio: float = 1e-3
    name: ClassVar[str] = "prv"

    def __post_init__(self) -> None:
        check_positive(self.eps_error, "eps_error")
        if not 0 < check_positive(self.delta_error_ratio, "delta_error_ratio") < 1:
            raise ValueError(f"delta_error_ratio must be in (0, 1), got {self.delta_error_ratio!r}")

    def evaluator(self, composition: Composition, delta: float) -> EpsilonEvaluator:
        """ε bracket at ``delta``, with δ error ``delta_error_ratio · delta`` (falling back to Opacus's PRV)."""
        return _PRVEvaluator(composition, delta, self.eps_error, self.delta_error_ratio * delta)

    def delta(self, composition: Composition, epsilon: float) -> AccountingResult:
        """δ bracket at ``epsilon`` for the whole composition (δ error ``DELTA_QUERY_ERROR``), clipped to [0, 1]."""
        prv = _WithFallback(composition, self.eps_error, DELTA_QUERY_ERROR)
        result = prv.run(lambda impl: impl.delta(composition.counts, epsilon))
        return AccountingResult(_probability(result.lower), _probability(result.estimate),
                                _probability(result.upper), result.method, result.note)


def _probability(value: float) -> float:
    """δ bounds clipped to [0, 1] (the lower bound subtracts delta_error and may go below 0)."""
    return min(1.0, max(0.0, value))

