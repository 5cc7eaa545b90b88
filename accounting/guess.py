"""Cheap RDP bounds: the initial brackets of calibration searches and the PRV grid's truncation bound.

The RDP bound of ``prv_accountant.other_accountants.RDP`` (TF-Privacy's subsampled-Gaussian RDP;
torch-free) upper-bounds the true ε at every order α, so the σ it calibrates is close above the PRV/PLD
answer and the step count it allows is close below. These guesses only decide where the real backend is
evaluated first, with one exception: when RDP already certifies the step cap of
``PrivacyAccountant.max_additional_steps``, the cap is returned as it is. The same bound sizes the PRV
backend's grid (:func:`safe_half_width`).

Orders (:data:`ORDERS`): the library's default set holds 99 fractional orders 1.1…10.9, whose series are the
slow part at high sample rates. Five fractional orders near 1 (large ε), the integers 2…64 and a few above
(small ε) give the truncation bound 2.8-4.3× faster (``python benchmarks/accounting_speed.py``: 0.86 s against
0.22 s at q = 512/1437, where a calibration evaluates it about nine times), within 1% of the library's on
the cases tested (tests/test_accounting.py). Any order gives a valid bound. Curves are cached per
composition.
"""

from __future__ import annotations

import functools
import math
import warnings

from accounting.history import Composition, Mechanism
from accounting.search import shrink_bracket


#: RDP orders α of the cheap bounds (module docstring). Not ``accounting.tuning.ORDERS``: that set holds nine
#: fractional orders (slower here) and none below 1.25 (the large-ε truncation bound needs 1.05 and 1.1).
ORDERS = (1.05, 1.1, 1.25, 1.5, 1.75, *range(2, 65), 80, 96, 128, 192, 256)


class _RDP:
    """RDP ε of any counts of ``mechanisms`` (curves computed once, at :data:`ORDERS`)."""

    def __init__(self, mechanisms: tuple[Mechanism, ...]):
        from prv_accountant import PoissonSubsampledGaussianMechanism
        from prv_accountant.other_accountants import RDP

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            self._rdp = RDP(prvs=[PoissonSubsampledGaussianMechanism(m.sample_rate, m.noise_multiplier)
                                  for m in mechanisms], orders=ORDERS)

    def epsilon(self, counts: tuple[int, ...], delta: float) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return float(self._rdp.compute_epsilon(delta=delta, num_self_compositions=list(counts))[2])


@functools.lru_cache(maxsize=256)
def _rdp(mechanisms: tuple[Mechanism, ...]) -> _RDP:
    return _RDP(mechanisms)


def safe_half_width(composition: Composition, eps_error: float, delta_error: float) -> float:
    """The PRV truncation bound L of Gopi, Lee & Wutschitz 2021, Remark 5.6 (as ``prv_accountant`` computes it,
    at :data:`ORDERS`): ``max(ε_RDP(δ_err / 4) of the composition, ε_RDP(δ_err / (8T)) of each mechanism once,
    eps_error) + 3``, T the total step count."""
    rdp, mechanisms = _rdp(composition.mechanisms), len(composition.mechanisms)
    once = [tuple(int(i == j) for j in range(mechanisms)) for i in range(mechanisms)]
    tails = [rdp.epsilon(counts, delta_error / 8 / composition.total_steps) for counts in once]
    return max(rdp.epsilon(composition.counts, delta_error / 4), *tails, eps_error) + 3


def rdp_sigma(target_epsilon: float, delta: float, sample_rate: float, steps: int,
              sigma_range: tuple[float, float]) -> float:
    """σ in ``sigma_range`` (to 1%) whose RDP ε for ``steps`` steps is about ``target_epsilon``."""

    def excess(log_sigma: float) -> float:
        epsilon = _rdp((Mechanism(math.exp(log_sigma), sample_rate),)).epsilon((steps,), delta)
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
    rdp = _rdp(composition.mechanisms + (mechanism,))

    def excess(k: float) -> float:
        return rdp.epsilon(composition.counts + (int(k),), delta) - epsilon

    f_zero, f_limit = excess(0), excess(limit)
    if f_zero > 0:
        return 0
    if f_limit <= 0:
        return limit
    _, feasible = shrink_bracket(excess, limit, 0, f_limit, f_zero, tol=1, integer=True)
    return int(feasible)
