"""Bracketed root search for monotone "does this setting exceed the budget?" questions.

Calibration (smallest σ), the budget's step count (largest T) and RDP's δ(ε) all look for the
boundary between settings that exceed a target (``excess(x) > 0``) and settings that meet it
(``excess(x) <= 0``). :func:`shrink_bracket` keeps one evaluated point on each side and shrinks the
bracket with the Illinois variant of regula falsi (M. Dowell, P. Jarratt, BIT 11, 1971): superlinear
on smooth excess functions, and never worse than bisection by much because each new point is kept a
fixed fraction away from the bracket ends. Because both returned points were *evaluated*, the
feasible one is guaranteed to meet the target even if the numerical excess is slightly
non-monotone (as PRV estimates are, by discretisation noise).
"""

from __future__ import annotations

import math
from collections.abc import Callable

#: New points stay at least this fraction of the bracket width away from its ends.
_MARGIN = 0.05
_MAX_ITERATIONS = 200


def shrink_bracket(excess: Callable[[float], float], infeasible: float, feasible: float,
                   f_infeasible: float, f_feasible: float, *, tol: float,
                   integer: bool = False) -> tuple[float, float]:
    """Shrink ``[infeasible, feasible]`` (in either order) until ``|feasible - infeasible| <= tol``.

    Requires ``f_infeasible = excess(infeasible) > 0 >= excess(feasible) = f_feasible``. With
    ``integer=True`` the points are integers (``tol`` should be 1), e.g. step counts. ``excess`` may
    return ``inf`` (the search then bisects). Returns the final ``(infeasible, feasible)`` points.
    """
    if not (f_infeasible > 0 >= f_feasible):
        raise ValueError(f"not a bracket: excess {f_infeasible} at {infeasible} and {f_feasible} at {feasible}")
    a, fa, b, fb = infeasible, f_infeasible, feasible, f_feasible
    last_moved = None
    for _ in range(_MAX_ITERATIONS):
        if abs(b - a) <= tol:
            return a, b
        x = _next_point(a, fa, b, fb, integer)
        fx = excess(x)
        if fx > 0 or math.isnan(fx):
            a, fa = x, fx
            if last_moved == "a":  # b kept twice: Illinois halves its value to pull the secant towards b
                fb /= 2
            last_moved = "a"
        else:
            b, fb = x, fx
            if last_moved == "b":
                fa /= 2
            last_moved = "b"
    raise RuntimeError(f"bracket search did not converge: [{a}, {b}] after {_MAX_ITERATIONS} evaluations")


def _next_point(a: float, fa: float, b: float, fb: float, integer: bool) -> float:
    lo, hi = min(a, b), max(a, b)
    if math.isfinite(fa) and math.isfinite(fb) and fa != fb:
        x = b - fb * (b - a) / (fb - fa)  # secant through the two bracket ends
    else:
        x = (a + b) / 2
    margin = _MARGIN * (hi - lo)
    x = min(max(x, lo + margin), hi - margin)
    if integer:
        x = float(min(max(round(x), lo + 1), hi - 1))
    return x
