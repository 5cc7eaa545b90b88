"""Cheap RDP estimates that place the initial brackets of calibration searches.

The RDP bound of ``prv_accountant.other_accountants.RDP`` (TF-Privacy's subsampled-Gaussian RDP,
orders 1.1…63; torch-free) costs milliseconds and upper-bounds the true ε, so the σ it calibrates
is close above the PRV/PLD answer and the step count it allows is close below. These guesses only
decide where the real backend is evaluated first, with one exception: when RDP already certifies
the step cap of ``PrivacyAccountant.max_additional_steps``, the cap is returned as it is.
"""

from __future__ import annotations

import math
import warnings

from accounting.history import Composition, Mechanism
from accounting.search import shrink_bracket


class _RDP:
    """RDP ε of any counts of ``mechanisms`` (curves computed once)."""

    def __init__(self, mechanisms: tuple[Mechanism, ...]):
        from prv_accountant import PoissonSubsampledGaussianMechanism
        from prv_accountant.other_accountants import RDP

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            self._rdp = RDP(prvs=[PoissonSubsampledGaussianMechanism(m.sample_rate, m.noise_multiplier)
                                  for m in mechanisms])

    def epsilon(self, counts: tuple[int, ...], delta: float) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return float(self._rdp.compute_epsilon(delta=delta, num_self_compositions=list(counts))[2])


def rdp_sigma(target_epsilon: float, delta: float, sample_rate: float, steps: int,
              sigma_range: tuple[float, float]) -> float:
    """σ in ``sigma_range`` (to 1%) whose RDP ε for ``steps`` steps is about ``target_epsilon``."""

    def excess(log_sigma: float) -> float:
        epsilon = _RDP((Mechanism(math.exp(log_sigma), sample_rate),)).epsilon((steps,), delta)
        return math.log(epsilon / target_epsilon) if epsilon > 0 else -math.inf

    low, high = (math.log(s) for s in sigma_range)
    f_high = excess(high)
    if f_high > 0:
        return sigma_range[1]
    f_low = excess(low)
    if f_low <= 0:
        return sigma_range[0]
    _, feasible = shrink_bracket(excess, low, high, f_low, f_high, tol=0.01)
    return math.exp(feasible)


def rdp_steps(composition: Composition, mechanism: Mechanism, epsilon: float, delta: float, limit: int) -> int:
    """Largest k <= ``limit`` such that ``composition`` plus k steps of ``mechanism`` has RDP ε <= ``epsilon``."""
    rdp = _RDP(composition.mechanisms + (mechanism,))

    def excess(k: float) -> float:
        return rdp.epsilon(composition.counts + (int(k),), delta) - epsilon

    f_zero, f_limit = excess(0), excess(limit)
    if f_zero > 0:
        return 0
    if f_limit <= 0:
        return limit
    _, feasible = shrink_bracket(excess, limit, 0, f_limit, f_zero, tol=1, integer=True)
    return int(feasible)
