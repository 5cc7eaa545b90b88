"""Private hyper-parameter tuning: the RDP of running a random number of private trials and releasing the best.

Source: N. Papernot, T. Steinke, "Hyperparameter Tuning with Renyi Differential Privacy", ICLR 2022,
https://arxiv.org/abs/2110.03620 (v2). A trial Q is one whole private training run with settings drawn from a
declared search space (public randomness). The search A draws K from a declared distribution, runs Q K times
independently on the same data and releases only the best output (model, settings, score; nothing if K = 0).
If Q is (λ, ε(λ))-RDP at every order λ:

- K ~ truncated negative binomial D_{η,γ} (Theorem 2; η = 1 is the geometric, η = 0 the logarithmic case):
  ``ε'(λ) = ε(λ) + (1+η)·min_λ̂ [(1 − 1/λ̂)·ε(λ̂) + log(1/γ)/λ̂] + log(E[K])/(λ − 1)``.
- K ~ Poisson(μ) (Theorem 6): ``ε'(λ) = ε(λ) + μ·δ̂ + log(μ)/(λ − 1)``, where Q is (ε̂, δ̂)-DP with
  ``ε̂ = log(1 + 1/(λ − 1))`` (δ̂ from ε(·) by the conversion of Canonne, Kamath, Steinke 2020, Prop. 12).

RDP is non-decreasing in λ, so ``ε'(λ)`` is then lowered to ``min_{λ' ≥ λ} ε'(λ')``. The trials' settings may
change their (σ, q, T); a trial drawn at random among several schedules is a mixture with data-independent
weights, whose Rényi divergence is at most the largest one (joint quasi-convexity: T. van Erven, P. Harremoës,
"Rényi Divergence and Kullback-Leibler Divergence", 2014, Theorem 13), so ε(λ) is the pointwise maximum of the
schedules' curves. Per-schedule curves: Opacus's Poisson-subsampled Gaussian RDP (``compute_rdp``, Mironov, Talwar,
Zhang 2019), imported when first computed (Opacus imports torch). RDP → (ε, δ): Balle et al. 2020, Theorem 21.

What ε' covers: the selected trial's output only. The number of trials K and the scores of the other trials are
not part of the release; publishing them is covered only by the naive composition of the trials that ran.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from scipy.optimize import brentq

from accounting.history import HistoryEntry
from accounting.search import shrink_bracket
from accounting.validation import check_delta, check_positive, check_sample_rate, check_steps

#: RDP orders λ (also the candidates λ̂ of Theorem 2): fractional ones at low orders, then integers, then a few
#: large ones, since the tuning term log(E[K])/(λ − 1) pushes the best order up.
ORDERS: tuple[float, ...] = (
    1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 7.0, 8.0, 9.0, 10.0,
    *map(float, range(12, 65, 2)), 80.0, 96.0, 128.0, 192.0, 256.0)
#: Noise multipliers are searched in this range (as ``accounting.calibration.SIGMA_RANGE``).
SIGMA_RANGE = (0.1, 1000.0)
SIGMA_RTOL = 1e-3


def _monotone(rdp: np.ndarray) -> np.ndarray:
    """``min_{j >= i} rdp[j]`` for increasing orders: RDP at order λ is at most RDP at any λ' >= λ."""
    return np.minimum.accumulate(rdp[::-1])[::-1]


def delta_from_rdp(orders: Sequence[float], rdp: Sequence[float], epsilon: float) -> float:
    """The δ of an (ε, δ)-DP guarantee implied by the RDP curve (Canonne, Kamath, Steinke 2020, Prop. 12):
    ``δ = min_λ exp((λ − 1)·(ε(λ) − ε + log(1 − 1/λ)) − log λ)``, at most 1."""
    a, r = np.asarray(orders, dtype=float), np.asarray(rdp, dtype=float)
    log_delta = (a - 1) * (r - epsilon + np.log1p(-1 / a)) - np.log(a)
    return float(min(1.0, math.exp(min(0.0, float(np.min(log_delta))))))


def epsilon_from_rdp(orders: Sequence[float], rdp: Sequence[float], delta: float) -> float:
    """The ε of (ε, δ)-DP implied by the RDP curve (Balle et al. 2020, Theorem 21, as Opacus's conversion):
    ``ε = min_λ [ε(λ) + log((λ − 1)/λ) − (log δ + log λ)/(λ − 1)]``, at least 0."""
    a, r = np.asarray(orders, dtype=float), np.asarray(rdp, dtype=float)
    delta = check_delta(delta)
    epsilon = r + np.log1p(-1 / a) - (math.log(delta) + np.log(a)) / (a - 1)
    return max(0.0, float(np.min(epsilon)))


@dataclass(frozen=True)
class TruncatedNegativeBinomial:
    """K on {1, 2, …} with ``P[K = k] = (1 − γ)^k / (γ^(−η) − 1) · Π_{ℓ<k} (ℓ + η)/(ℓ + 1)`` (η > −1, γ ∈ (0, 1);
    η = 0: ``(1 − γ)^k / (k·log(1/γ))``, η = 1: geometric ``γ(1 − γ)^(k−1)``). Papernot & Steinke 2022, §2."""

    shape: float  # η
    gamma: float  # γ
    name: ClassVar[str] = "truncated_negative_binomial"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.shape) and self.shape > -1):
            raise ValueError(f"the negative binomial shape eta must be > -1, got {self.shape!r}. "
                             "Fix: use eta = 1 (geometric), 0 (logarithmic) or another value above -1")
        if not 0 < self.gamma < 1:
            raise ValueError(f"gamma must be in (0, 1), got {self.gamma!r}. Fix: give the mean number of trials "
                             "(> 1) with TruncatedNegativeBinomial.with_mean")

    @classmethod
    def with_mean(cls, mean: float, shape: float = 1.0) -> TruncatedNegativeBinomial:
        """The distribution with ``E[K] = mean`` (> 1) and shape η: γ solves ``mean(η, γ) = mean`` (the mean
        decreases from ∞ to 1 as γ goes from 0 to 1). Geometric (η = 1): γ = 1/mean exactly."""
        mean = check_positive(mean, "mean number of trials")
        if mean <= 1:
            raise ValueError(f"the mean number of trials must be > 1, got {mean:g}. Fix: ask for a mean above 1 "
                             "(a single run needs no tuning accountant)")
        if shape == 1:
            return cls(1.0, 1 / mean)
        cls(shape, 0.5)  # validates η
        gamma = brentq(lambda g: cls(shape, g).mean - mean, 1e-300, 1 - 1e-12, xtol=1e-300, rtol=1e-13)
        return cls(float(shape), float(gamma))

    @property
    def _first(self) -> float:
        """P[K = 1]."""
        eta, gamma = self.shape, self.gamma
        if eta == 0:
            return (1 - gamma) / math.log(1 / gamma)
        return eta * (1 - gamma) / math.expm1(-eta * math.log(gamma))

    @property
    def mean(self) -> float:
        """``E[K] = η(1 − γ) / (γ(1 − γ^η))``; η = 0: ``(1/γ − 1) / log(1/γ)``."""
        eta, gamma = self.shape, self.gamma
        if eta == 0:
            return (1 / gamma - 1) / math.log(1 / gamma)
        return eta * (1 - gamma) / (gamma * -math.expm1(eta * math.log(gamma)))

    @property
    def variance(self) -> float:
        """``E[K²] − E[K]²`` with ``E[K²] = η(1 − γ)(1 + η(1 − γ)) / (γ²(1 − γ^η))`` (the untruncated negative
        binomial's second moment over P[K ≥ 1]); η = 0: ``E[K²] = (1 − γ) / (γ²·log(1/γ))``."""
        eta, gamma = self.shape, self.gamma
        if eta == 0:
            second = (1 - gamma) / (gamma ** 2 * math.log(1 / gamma))
        else:
            second = eta * (1 - gamma) * (1 + eta * (1 - gamma)) / (gamma ** 2 * -math.expm1(eta * math.log(gamma)))
        return second - self.mean ** 2

    def pmf(self, k: int) -> float:
        """``P[K = k]`` by the recurrence ``P[k+1] = P[k]·(1 − γ)(k + η)/(k + 1)`` from ``P[1]``."""
        if k < 1:
            return 0.0
        p = self._first
        for j in range(1, k):
            p *= (1 - self.gamma) * (j + self.shape) / (j + 1)
        return p

    def sample(self, rng: np.random.Generator) -> int:
        """One draw of K by inversion of the CDF (one uniform from ``rng``)."""
        u, k, p = rng.random(), 1, self._first
        cumulative = p
        while cumulative < u and p > 0:
            p *= (1 - self.gamma) * (k + self.shape) / (k + 1)
            k += 1
            cumulative += p
        return k

    def selection_rdp(self, orders: Sequence[float], rdp: Sequence[float]) -> np.ndarray:
        """RDP of the best of K trials (Theorem 2), λ̂ ranging over ``orders``, then made monotone in λ."""
        a, r = np.asarray(orders, dtype=float), np.asarray(rdp, dtype=float)
        hat = (1 + self.shape) * float(np.min((1 - 1 / a) * r + math.log(1 / self.gamma) / a))
        return _monotone(r + hat + math.log(self.mean) / (a - 1))

    def to_dict(self) -> dict:
        """JSON form: name, η, γ, mean and variance."""
        return {"name": self.name, "shape": self.shape, "gamma": self.gamma, "mean": self.mean,
                "variance": self.variance}


@dataclass(frozen=True)
class PoissonTrials:
    """K ~ Poisson(μ) on {0, 1, …}: ``P[K = k] = e^(−μ) μ^k / k!``; K = 0 releases nothing (Theorem 6)."""

    mean: float  # μ
    name: ClassVar[str] = "poisson"

    def __post_init__(self) -> None:
        check_positive(self.mean, "mean number of trials")

    @property
    def variance(self) -> float:
        """``Var[K] = μ``."""
        return self.mean

    def pmf(self, k: int) -> float:
        """``e^(−μ) μ^k / k!``."""
        return math.exp(k * math.log(self.mean) - self.mean - math.lgamma(k + 1)) if k >= 0 else 0.0

    def sample(self, rng: np.random.Generator) -> int:
        """One draw of K (``rng.poisson``)."""
        return int(rng.poisson(self.mean))

    def selection_rdp(self, orders: Sequence[float], rdp: Sequence[float]) -> np.ndarray:
        """RDP of the best of K trials (Theorem 6): ``ε(λ) + μ·δ̂(λ) + log(μ)/(λ − 1)``, then monotone in λ."""
        a, r = np.asarray(orders, dtype=float), np.asarray(rdp, dtype=float)
        delta_hat = np.array([delta_from_rdp(a, r, math.log1p(1 / (order - 1))) for order in a])
        return _monotone(r + self.mean * delta_hat + math.log(self.mean) / (a - 1))

    def to_dict(self) -> dict:
        """JSON form: name, mean and variance."""
        return {"name": self.name, "mean": self.mean, "variance": self.variance}


TrialCount = TruncatedNegativeBinomial | PoissonTrials


def trial_count(distribution: str, mean: float, shape: float = 1.0) -> TrialCount:
    """The trial-count distribution by name: ``"negative_binomial"`` (shape η; 1 = geometric) or ``"poisson"``."""
    if distribution == "poisson":
        return PoissonTrials(check_positive(mean, "mean number of trials"))
    if distribution in ("negative_binomial", "geometric"):
        return TruncatedNegativeBinomial.with_mean(mean, 1.0 if distribution == "geometric" else shape)
    raise ValueError(f"unknown trial-count distribution {distribution!r}. "
                     "Fix: use 'negative_binomial', 'geometric' or 'poisson'")


def schedule_rdp(entry: HistoryEntry, orders: Sequence[float] = ORDERS) -> np.ndarray:
    """RDP curve of ``entry.steps`` Poisson-subsampled Gaussian steps at (σ, q): ``T·rdp_{q,σ}(λ)`` (Opacus)."""
    from opacus.accountants.analysis.rdp import compute_rdp  # imports torch

    return np.asarray(compute_rdp(q=entry.sample_rate, noise_multiplier=entry.noise_multiplier,
                                  steps=entry.steps, orders=list(orders)), dtype=float)


def trial_rdp(schedules: Sequence[HistoryEntry], orders: Sequence[float] = ORDERS) -> np.ndarray:
    """RDP of one trial whose schedule is drawn among ``schedules``: the pointwise maximum of their curves."""
    if not schedules:
        raise ValueError("no schedules: a trial needs at least one (sigma, q, steps). Fix: declare at least one "
                         "epochs and one batch-size choice")
    return np.max([schedule_rdp(entry, orders) for entry in schedules], axis=0)


def score_noise_multiplier(entry: HistoryEntry, orders: Sequence[float] = ORDERS) -> float:
    """σ_s of the Gaussian noise on a trial's count of correct validation predictions (sensitivity 1 under
    add/remove): the smallest whose RDP ``λ/(2σ_s²)`` (Mironov 2017, Prop. 7) is at most the trial's training RDP
    at every order, ``σ_s = max_λ sqrt(λ / (2·ε_T(λ)))``.

    Training and scoring read disjoint parts of the data, split by a coin per record independent of the data
    (``lipdp.datasets.independent_split``): a neighbouring data set's extra record lands in one part and nothing
    else moves, so the trial is ``max(ε_T, ε_score)``-RDP conditioned on the coins, and so is the mixture over them
    (joint quasi-convexity, van Erven & Harremoës 2014, Thm 13). With ``ε_score <= ε_T`` the score is free: the
    trial's curve, the search's and the naive composition's are the training curves."""
    a = np.asarray(orders, dtype=float)
    return float(np.sqrt(np.max(a / (2 * schedule_rdp(entry, orders)))))


def _composed_rdp(entries: Sequence[HistoryEntry], orders: Sequence[float]) -> np.ndarray:
    """The RDP curve of releasing all ``entries`` (curves add under composition); zero for none."""
    return np.sum([schedule_rdp(entry, orders) for entry in entries], axis=0) if entries else np.zeros(len(orders))


def tuned_epsilon(schedules: Sequence[HistoryEntry], count: TrialCount, delta: float,
                  spent: Sequence[HistoryEntry] = (), orders: Sequence[float] = ORDERS) -> float:
    """ε(δ) of the whole search: ``count``'s selection RDP of :func:`trial_rdp`, plus the RDP of ``spent``
    (mechanisms released once on the same data before the search, e.g. a private mean), converted to (ε, δ)."""
    selection = count.selection_rdp(orders, trial_rdp(schedules, orders))
    return epsilon_from_rdp(orders, selection + _composed_rdp(spent, orders), delta)


def single_trial_epsilon(schedules: Sequence[HistoryEntry], delta: float, spent: Sequence[HistoryEntry] = (),
                         orders: Sequence[float] = ORDERS) -> float:
    """ε(δ) of one trial alone (no search) and ``spent``, from the same curves: what a single run reports."""
    return epsilon_from_rdp(orders, trial_rdp(schedules, orders) + _composed_rdp(spent, orders), delta)


def naive_epsilon(trials: Sequence[HistoryEntry], delta: float, spent: Sequence[HistoryEntry] = (),
                  orders: Sequence[float] = ORDERS) -> float:
    """ε(δ) of releasing every trial that ran (and ``spent``): the RDP curves summed (composition), converted."""
    return epsilon_from_rdp(orders, _composed_rdp([*trials, *spent], orders), delta)


def scaled_schedules(sigma: float, schedules: Sequence[tuple[float, int]]) -> list[HistoryEntry]:
    """Each schedule (q, T) with noise ``σ_k = σ·q_k·√T_k / max_j q_j·√T_j``. In the small-q regime the
    subsampled Gaussian's RDP is about ``T·q²·λ/σ²`` (Mironov, Talwar, Zhang 2019), so this spends about the same
    per-trial budget on every schedule; :func:`trial_rdp` takes the exact maximum, so the approximation affects
    utility only, never the guarantee."""
    weights = [q * math.sqrt(steps) for q, steps in schedules]
    top = max(weights)
    return [HistoryEntry(sigma * w / top, q, steps) for w, (q, steps) in zip(weights, schedules, strict=True)]


def calibrate_trial_noise(target_epsilon: float, delta: float, schedules: Sequence[tuple[float, int]],
                          count: TrialCount, *, spent: Sequence[HistoryEntry] = (), rtol: float = SIGMA_RTOL,
                          orders: Sequence[float] = ORDERS) -> list[HistoryEntry]:
    """The schedules with the smallest σ (of :func:`scaled_schedules`) whose tuned ε(δ), ``spent`` included
    (:func:`tuned_epsilon`), is <= ``target_epsilon``.

    The returned entries were evaluated and meet the target; σ / (1 + rtol) was evaluated and does not. σ is the
    noise multiplier of the costliest schedule (largest q·√T); ``ValueError`` if even ``SIGMA_RANGE[1]`` misses.
    """
    target_epsilon, delta = check_positive(target_epsilon, "target_epsilon"), check_delta(delta)
    schedules = [(check_sample_rate(q), check_steps(steps, "steps", minimum=1)) for q, steps in schedules]

    def excess(log_sigma: float) -> float:
        entries = scaled_schedules(math.exp(log_sigma), schedules)
        return math.log(tuned_epsilon(entries, count, delta, spent, orders) / target_epsilon)

    low, high = (math.log(s) for s in SIGMA_RANGE)
    f_high = excess(high)
    if f_high > 0:
        raise ValueError(f"target_epsilon={target_epsilon:g} is not reachable by the search with noise multipliers "
                         f"<= {SIGMA_RANGE[1]:g} (the search alone costs about log(E[K])/(λ-1) and what was spent "
                         "before it). Fix: raise the target epsilon, or lower the mean number of trials")
    f_low = excess(low)
    if f_low <= 0:
        return scaled_schedules(SIGMA_RANGE[0], schedules)
    _, feasible = shrink_bracket(excess, low, high, f_low, f_high, tol=math.log1p(rtol))
    return scaled_schedules(math.exp(feasible), schedules)
