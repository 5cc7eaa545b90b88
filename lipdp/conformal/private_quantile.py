"""A differentially private split-conformal threshold: the exponential mechanism over a grid, with a corrected
rank so that coverage >= 1 - alpha holds despite the privacy noise.

The approach is that of Angelopoulos, Bates, Zrnic & Jordan, "Private Prediction Sets" (HDSR 2022,
arXiv:2102.06202): privatise only the calibration quantile, with an exponential mechanism over a fixed grid of
thresholds, and raise the target quantile level (splitting alpha with a parameter gamma) to compensate for the
mechanism's error. The utility and the correction below are derived here, so that ties and empty grid cells are
handled and the proof is self-contained.

**Mechanism.** Public grid t_1 < ... < t_m (m >= 2) with t_m >= every possible score (scores lie in [0, 1] and
t_m = 1 by default), so every score rounds up to a grid point. Counts N_j = #{i : s_i <= t_j}, N_0 = 0, N_m = n.
Grid point t_j "holds" the ranks in [N_{j-1}, N_j]. For a target rank k in [0, n] the utility is

    u_j = -dist(k, [N_{j-1}, N_j]) = -max(N_{j-1} - k, k - N_j, 0),

and the mechanism releases t_J with P(J = j) proportional to exp(eps u_j / 2).

**Privacy (eps-DP, add/remove one calibration record).** Adding a score changes each N_j by 0 or 1, and the
target k(n) below by a value in [0, 1] (it is ceil((n+1)c) + const with c in (0, 1)). So N_{j-1} - k and k - N_j
each change by at most 1, and so does their max with 0: the utility has sensitivity 1 and the exponential
mechanism with exp(eps u / 2) is eps-DP (McSherry & Talwar 2007), with delta = 0. This holds for a fixed gamma
(below); the grid, alpha and eps are public. Optimising gamma for the actual n treats n as public, as Angelopoulos
et al. do (the analyst fixes the calibration split's size); ``private_conformal_quantile`` accepts a fixed gamma
for strict add/remove adjacency.

**Coverage.** Let alpha = alpha_1 + beta with alpha_1 = (1 - gamma) alpha, beta = gamma alpha, r =
ceil((n+1)(1 - alpha_1)) <= n, and call j bad if N_j < r (t_j below the r-th smallest score s_(r)). Some j has
u_j = 0 (the intervals [N_{j-1}, N_j] tile [0, n] and 0 <= k <= n), so the normaliser is >= 1; a bad j has
u_j = -(k - N_j) <= -(k - r + 1) and t_m is never bad, so

    P(J bad) <= (m - 1) exp(-eps (k - r + 1) / 2) = beta   for   k = r - 1 + (2 / eps) log((m - 1) / beta).

If J is not bad, t_J >= s_(r), and split conformal gives P(s_{n+1} <= s_(r)) >= r/(n+1) >= 1 - alpha_1, so
P(s_{n+1} <= t_J) >= 1 - alpha_1 - beta = 1 - alpha. gamma is chosen to minimise k (a function of public
quantities only, so the choice costs no privacy). As eps -> infinity, gamma -> 0, k -> r - 1 + 0+ and t_J ->
the grid round-up of the non-private q_hat = s_(r).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from lipdp.conformal.calibration import check_alpha, check_scores_1d

DEFAULT_GRID_SIZE = 1001
_GAMMAS = np.geomspace(1e-7, 1.0 - 1e-7, 4001)


def default_grid(size: int = DEFAULT_GRID_SIZE, upper: float = 1.0) -> np.ndarray:
    """``size`` evenly spaced thresholds on [0, upper] (upper = the score's maximum, 1 for lipdp scores)."""
    if size < 2:
        raise ValueError(f"the grid needs at least 2 points, got {size}")
    return np.linspace(0.0, upper, size)


def _check_epsilon(epsilon: float) -> float:
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a finite number > 0 (calibration privacy budget), got {epsilon!r}")
    return float(epsilon)


def _ceil_rank(n: int, level: float) -> int:
    """ceil((n + 1) * level) in exact rational arithmetic on the float ``level``."""
    return math.ceil((n + 1) * Fraction(level))


@dataclass(frozen=True)
class PrivateTarget:
    """The data-independent part of the mechanism: the split of alpha and the corrected target rank."""

    n: int
    alpha: float
    epsilon: float
    grid_size: int
    gamma: float  # beta = gamma * alpha is the mechanism's failure probability, alpha_1 = alpha - beta
    rank: int  # r = ceil((n + 1)(1 - alpha_1)), the order statistic the release must not fall below
    target: float  # k = r - 1 + (2 / eps) log((m - 1) / beta), the rank the utility aims at

    @property
    def feasible(self) -> bool:
        """Whether the coverage proof applies: r <= n and k <= n."""
        return self.rank <= self.n and self.target <= self.n


def corrected_target(n: int, alpha: float, epsilon: float, grid_size: int, gamma: float) -> PrivateTarget:
    """r and k of the module docstring for a given split gamma in (0, 1) of alpha."""
    alpha = check_alpha(alpha)
    epsilon = _check_epsilon(epsilon)
    if n < 1:
        raise ValueError("the private quantile needs at least one calibration sample, got an empty calibration set.")
    if grid_size < 2:
        raise ValueError(f"the grid needs at least 2 points, got {grid_size}")
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma must be in (0, 1) (the share of alpha given to the privacy noise), got {gamma}")
    rank = _ceil_rank(n, 1.0 - (1.0 - gamma) * alpha)
    target = rank - 1 + (2.0 / epsilon) * math.log((grid_size - 1) / (gamma * alpha))
    return PrivateTarget(n, alpha, epsilon, grid_size, float(gamma), rank, target)


@functools.lru_cache(maxsize=256)
def private_target(n: int, alpha: float, epsilon: float, grid_size: int) -> PrivateTarget:
    """The gamma (on a fine public grid) minimising the corrected target rank k; raises if none is feasible.

    Uses only public quantities (n, alpha, eps, m): it costs no privacy. The search runs in floats; the chosen
    plan is then recomputed exactly by ``corrected_target``.
    """
    plan = corrected_target(n, alpha, epsilon, grid_size, 0.5)  # validates the arguments
    ranks = np.ceil((n + 1) * (1.0 - (1.0 - _GAMMAS) * plan.alpha))
    targets = ranks - 1 + (2.0 / plan.epsilon) * np.log((grid_size - 1) / (_GAMMAS * plan.alpha))
    targets[(ranks > n) | (targets > n)] = np.inf
    plan = corrected_target(n, alpha, epsilon, grid_size, float(_GAMMAS[np.argmin(targets)]))
    if not plan.feasible:
        raise ValueError(
            f"a private threshold with coverage >= 1 - {alpha} is impossible with n={n} calibration samples, "
            f"eps={epsilon} and a grid of {grid_size} points: the corrected rank exceeds n. Fix: more calibration "
            "samples, a larger calibration epsilon, a larger alpha, or a coarser grid."
        )
    return plan


def _check_grid(grid: np.ndarray, scores: np.ndarray) -> np.ndarray:
    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim != 1 or grid.size < 2 or not np.all(np.isfinite(grid)) or not np.all(np.diff(grid) > 0):
        raise ValueError("grid must be a 1-D, strictly increasing, finite array of at least 2 thresholds")
    if scores.max() > grid[-1]:
        raise ValueError(
            f"a score ({scores.max()}) exceeds the grid's last threshold {grid[-1]}: the grid must end at the "
            "score's upper bound (a public constant, 1 for lipdp scores), never at a data-dependent value."
        )
    return grid


def exponential_mechanism_probabilities(scores: np.ndarray, grid: np.ndarray, target: float,
                                        epsilon: float) -> np.ndarray:
    """P(J = j) for the mechanism of the module docstring (exposed for tests of its privacy)."""
    counts = np.searchsorted(np.sort(scores), grid, side="right").astype(np.float64)  # N_1..N_m
    previous = np.concatenate(([0.0], counts[:-1]))  # N_0..N_{m-1}
    utility = -np.maximum(np.maximum(previous - target, target - counts), 0.0)
    logits = 0.5 * epsilon * utility
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


@dataclass(frozen=True)
class PrivateQuantile:
    """A released private threshold and what was spent to get it."""

    threshold: float
    epsilon: float  # pure eps-DP (delta = 0) with respect to the calibration set
    plan: PrivateTarget


def private_conformal_quantile(
    calibration_scores: torch.Tensor | np.ndarray,
    alpha: float,
    epsilon: float,
    grid: np.ndarray | None = None,
    gamma: float | None = None,
    generator: np.random.Generator | None = None,
) -> PrivateQuantile:
    """eps-DP split conformal threshold with coverage >= 1 - alpha (module docstring).

    ``grid`` defaults to ``default_grid()`` (1001 points on [0, 1]). ``gamma`` defaults to the optimum of
    ``private_target`` for n = len(calibration_scores): this treats the calibration size n as public (the analyst
    fixes it, as in Angelopoulos et al.), and so does the error raised when n is too small. Under strict
    add/remove adjacency, fix gamma in advance from a planned size (``private_target(planned_n, ...).gamma``);
    with a fixed gamma the mechanism is eps-DP whatever n. ``generator`` defaults to a fresh
    ``np.random.default_rng()`` seeded from OS entropy; pass a seeded one only for reproducible experiments.
    """
    scores = check_scores_1d(torch.as_tensor(calibration_scores)).double().cpu().numpy()
    grid = _check_grid(default_grid() if grid is None else grid, scores)
    if gamma is None:
        plan = private_target(scores.size, alpha, epsilon, grid.size)
    else:
        plan = corrected_target(scores.size, alpha, epsilon, grid.size, gamma)
        if not plan.feasible:
            raise ValueError(
                f"with gamma={gamma}, n={scores.size}, eps={epsilon} and {grid.size} grid points the corrected rank "
                f"{plan.target:.1f} exceeds n: coverage would not be guaranteed. Fix: gamma=None (optimised), more "
                "calibration samples, a larger epsilon or alpha, or a coarser grid."
            )
    probabilities = exponential_mechanism_probabilities(scores, grid, plan.target, plan.epsilon)
    rng = np.random.default_rng() if generator is None else generator
    return PrivateQuantile(float(grid[rng.choice(grid.size, p=probabilities)]), plan.epsilon, plan)
