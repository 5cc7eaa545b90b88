"""Calibration: the noise multiplier a budget needs, and the steps or epochs a noise multiplier allows.

Both invert the accountant by a bracketed search (:mod:`accounting.search`) on real backend
evaluations; the bracket is placed by a cheap RDP guess (:mod:`accounting.guess`). Every returned
value was evaluated by the backend and meets the target: ``calibrate_noise`` never returns a σ whose
ε exceeds ``target_epsilon``, ``max_steps`` never a step count whose ε does.

Epochs: with Poisson sampling at rate q an epoch is 1/q steps in expectation, so E epochs are
``ceil(E / q)`` steps (q = 256/60000, 15 epochs → 3516 steps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from accounting import guess
from accounting.accountant import MAX_STEPS, PrivacyAccountant
from accounting.backends import Backend, get_backend
from accounting.history import HistoryEntry
from accounting.search import shrink_bracket
from accounting.validation import check_delta, check_noise_multiplier, check_positive, check_sample_rate, check_steps

#: σ is searched in this range. A target met by the smallest σ returns it; one not met by the largest raises.
SIGMA_RANGE = (0.1, 1000.0)
#: Default relative tolerance on σ: the returned σ meets the target and σ / (1 + rtol) does not.
SIGMA_RTOL = 1e-3
_FIRST_STEP = math.log(1.25)  # first bracket step in log σ, doubled at each expansion


def steps_for_epochs(epochs: float, sample_rate: float) -> int:
    """Steps in ``epochs`` epochs at Poisson rate q: ``ceil(epochs / q)`` (rounded to 1e-6 first: float noise)."""
    epochs, sample_rate = check_positive(epochs, "epochs"), check_sample_rate(sample_rate)
    return math.ceil(round(epochs / sample_rate, 6))


def _steps(sample_rate: float, steps: int | None, epochs: float | None) -> int:
    if (steps is None) == (epochs is None):
        raise ValueError(f"give exactly one of steps or epochs, got steps={steps!r}, epochs={epochs!r}")
    return check_steps(steps, "steps", minimum=1) if steps is not None else steps_for_epochs(epochs, sample_rate)


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int | None = None,
                    epochs: float | None = None, backend: str | Backend = "prv", *,
                    rtol: float = SIGMA_RTOL, spent: Sequence[HistoryEntry | Sequence] = ()) -> float:
    """The smallest noise multiplier σ whose ε(δ) after ``steps`` (or ``epochs``) at rate q is <= ``target_epsilon``.

    ``spent``: mechanisms already released on the same data (a history, e.g. a private feature mean as one
    ``(σ, 1.0, 1)`` entry); σ is calibrated so that they and the new steps together meet the target.

    Tolerance: the returned σ has ε <= target (as :meth:`PrivacyAccountant.epsilon` reports it, the
    conservative value), and a σ' >= σ / (1 + rtol) was evaluated with ε > target. σ is searched in
    ``SIGMA_RANGE``; ``ValueError`` if even its upper end misses the target.
    """
    target_epsilon = check_positive(target_epsilon, "target_epsilon")
    delta, sample_rate = check_delta(delta), check_sample_rate(sample_rate)
    rtol = check_positive(rtol, "rtol")
    steps = _steps(sample_rate, steps, epochs)
    backend = get_backend(backend)

    spent = list(spent)
    if spent and (already := PrivacyAccountant(backend, history=spent).epsilon(delta)) >= target_epsilon:
        raise ValueError(f"the mechanisms already spent ε = {already:.4g} at δ = {delta:g}, not below "
                         f"target_epsilon={target_epsilon:g}: no noise multiplier leaves room for more steps")

    def epsilon(sigma: float) -> float:
        return PrivacyAccountant(backend, history=[*spent, (sigma, sample_rate, steps)]).epsilon(delta)

    def excess(log_sigma: float) -> float:
        return math.log(epsilon(math.exp(log_sigma)) / target_epsilon)

    low_end, high_end = (math.log(s) for s in SIGMA_RANGE)
    x = math.log(guess.rdp_sigma(target_epsilon, delta, sample_rate, steps, SIGMA_RANGE))
    fx = excess(x)
    step = _FIRST_STEP
    if fx <= 0:  # feasible: walk down to an infeasible σ
        feasible, f_feasible = x, fx
        while True:
            x = max(low_end, feasible - step)
            fx = excess(x)
            if fx > 0:
                infeasible, f_infeasible = x, fx
                break
            feasible, f_feasible = x, fx
            if x == low_end:
                return SIGMA_RANGE[0]
            step *= 2
    else:  # infeasible: walk up to a feasible σ
        infeasible, f_infeasible = x, fx
        while True:
            if infeasible == high_end:
                raise ValueError(
                    f"target_epsilon={target_epsilon:g} is not reachable with noise_multiplier <= {SIGMA_RANGE[1]:g}: "
                    f"ε = {epsilon(SIGMA_RANGE[1]):.4g} there (sample_rate={sample_rate:g}, steps={steps}, "
                    f"delta={delta:g}); lower the sample rate or the steps, or raise the target")
            x = min(high_end, infeasible + step)
            fx = excess(x)
            if fx <= 0:
                feasible, f_feasible = x, fx
                break
            infeasible, f_infeasible = x, fx
            step *= 2
    _, feasible = shrink_bracket(excess, infeasible, feasible, f_infeasible, f_feasible, tol=math.log1p(rtol))
    return math.exp(feasible)


def max_steps(noise_multiplier: float, sample_rate: float, target_epsilon: float, delta: float,
              backend: str | Backend = "prv", *, limit: int = MAX_STEPS) -> int:
    """The largest number of steps (<= ``limit``) at (σ, q) whose ε(δ) is <= ``target_epsilon``."""
    check_positive(target_epsilon, "target_epsilon")
    return PrivacyAccountant(backend).max_additional_steps(noise_multiplier, sample_rate, target_epsilon, delta,
                                                           limit=limit)


def max_epochs(noise_multiplier: float, sample_rate: float, target_epsilon: float, delta: float,
               backend: str | Backend = "prv", *, limit: int = MAX_STEPS) -> int:
    """The largest whole number of epochs E with ``steps_for_epochs(E, q)`` within :func:`max_steps`."""
    check_noise_multiplier(noise_multiplier)
    sample_rate = check_sample_rate(sample_rate)
    steps = max_steps(noise_multiplier, sample_rate, target_epsilon, delta, backend, limit=limit)
    epochs = math.floor(steps * sample_rate)
    while steps_for_epochs(epochs + 1, sample_rate) <= steps:
        epochs += 1
    while epochs > 0 and steps_for_epochs(epochs, sample_rate) > steps:
        epochs -= 1
    return epochs
