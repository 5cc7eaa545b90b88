"""Empirical privacy audit: a statistical *lower* bound on epsilon from one private run with gradient canaries.

Method: one-run auditing (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS
2023). m canaries are each included in the training set independently with probability 1/2 (S_j). The run
releases its noisy gradients; the auditor scores every canary, guesses "included" for the r/2 highest scores
and "excluded" for the r/2 lowest, abstains on the rest, and counts v correct guesses. If the run is
(eps, delta)-DP then (their Corollary 5.4, code in their App. D)

    P[v' >= v] <= beta + 2 m delta alpha,   beta = P[Bin(r, p) >= v],   p = e^eps / (1 + e^eps),
    alpha = max_{i=1..v} P[v - i <= Bin(r, p) < v] / i,

so every eps whose p-value is below 1 - confidence is refuted: the largest refuted eps is the audited lower
bound. The guess count r is chosen after the fact among a fixed grid, with a Bonferroni correction.

Canaries (white-box, gradient space, the strongest adversary the DP claim covers): the model is one bias-free
linear layer; canary j owns one weight coordinate c_j and, when sampled, contributes the gradient Delta * e_{c_j}
at the certified sensitivity Delta (a worst-case record), written into the summed gradient before the engine's
``step()``. Everything else is the real engine: its Poisson loader samples the canaries (rate q = B / m; an
excluded canary's draw is ignored, which is Poisson sampling of the included set), its mechanism adds the noise
and normalises, its accountant gives the claimed epsilon. The canary coordinates are orthogonal, so each score
sees only its own canary and the noise. Score: the per-step likelihood ratio of "sampled w.p. q" against
"absent", summed over steps, sum_t log(1 - q + q exp((Delta x_t - Delta^2 / 2) / s^2)), x_t = released
coordinate (times B), s = the noise std the engine *claims* (its ``noise_stds()``).

``noise_scale`` < 1 under-noises the engine on purpose: the audit injects ``ScaledNoise`` as the mechanism's noise
source (the production mechanism has no such switch), to show that the audit has power: it must then report a lower
bound above the claimed epsilon.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import scipy.special
import scipy.stats
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lipdp.engine import LipDPEngine
from lipdp.layers import InputNormClip
from lipdp.losses import LipschitzCrossEntropy
from lipdp.noise import NOISE_STRATEGIES, GaussianNoise

logger = logging.getLogger(__name__)

__all__ = [
    "AuditResult", "ScaledNoise", "epsilon_from_scores", "gradient_canary_audit", "one_run_epsilon_lower_bound",
    "one_run_p_value",
]

GUESS_GRID = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
CLASSES = 10


def one_run_p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """P-value of ``correct`` right guesses out of ``guesses`` under (epsilon, delta)-DP (Corollary 5.4)."""
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got {correct}, {guesses}, {canaries}")
    if not (epsilon >= 0 and 0 <= delta <= 1):
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    p = scipy.special.expit(epsilon)  # accuracy of epsilon-DP randomised response
    beta = scipy.stats.binom.sf(correct - 1, guesses, p)
    if delta == 0 or correct == 0:
        return float(min(beta, 1.0))
    below = np.cumsum(scipy.stats.binom.pmf(np.arange(correct - 1, -1, -1), guesses, p))  # P[v-i <= Bin < v]
    alpha = float(np.max(below / np.arange(1, correct + 1)))
    return float(min(beta + alpha * delta * 2 * canaries, 1.0))


def one_run_epsilon_lower_bound(canaries: int, guesses: int, correct: int, delta: float,
                                significance: float) -> float:
    """Largest epsilon refuted at level ``significance`` (bisection to 1e-6; 0 if none is refuted)."""
    if not 0 < significance < 1:
        raise ValueError(f"significance must be in (0, 1), got {significance}")
    if one_run_p_value(canaries, guesses, correct, 0.0, delta) >= significance:
        return 0.0
    low, high = 0.0, 1.0
    while one_run_p_value(canaries, guesses, correct, high, delta) < significance:
        low, high = high, 2 * high
    while high - low > 1e-6:
        middle = (low + high) / 2
        if one_run_p_value(canaries, guesses, correct, middle, delta) < significance:
            low = middle
        else:
            high = middle
    return low


def epsilon_from_scores(scores: np.ndarray, included: np.ndarray, delta: float, confidence: float = 0.95,
                        grid: tuple[int, ...] = GUESS_GRID) -> tuple[float, int, int]:
    """(epsilon lower bound, guesses r, correct v): the best r of ``grid`` (Bonferroni-corrected), guessing
    "included" for the r - r//2 highest scores and "excluded" for the r//2 lowest."""
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    canaries = len(scores)
    if scores.shape != included.shape or canaries < 2:
        raise ValueError("scores and included must be two arrays of the same length >= 2")
    if not np.isfinite(scores).all():
        raise ValueError("canary scores must be finite")
    sizes = [r for r in grid if r <= canaries] or [canaries]
    significance = (1 - confidence) / len(sizes)
    order = np.argsort(scores, kind="stable")
    best = (0.0, sizes[0], 0)
    for guesses in sizes:
        low, high = order[:guesses // 2], order[canaries - (guesses - guesses // 2):]
        correct = int((~included[low]).sum() + included[high].sum())
        epsilon = one_run_epsilon_lower_bound(canaries, guesses, correct, delta, significance)
        if epsilon > best[0]:
            best = (epsilon, guesses, correct)
    return best


@dataclass(frozen=True)
class AuditResult:
    """One audit: the lower bound on epsilon at ``confidence``, the claim it tests, and how it was obtained."""

    epsilon_lower: float
    claimed_epsilon: float
    delta: float
    confidence: float
    canaries: int
    guesses: int
    correct: int
    steps: int
    noise_multiplier: float
    sample_rate: float
    noise_scale: float

    @property
    def violation(self) -> bool:
        """The audit refutes the claim: the run is not (claimed_epsilon, delta)-DP (at ``confidence``)."""
        return self.epsilon_lower > self.claimed_epsilon

    def to_dict(self) -> dict:
        """Every field and the verdict, as JSON-able values."""
        return {**asdict(self), "violation": self.violation}

    def to_text(self) -> str:
        """The audit in a few lines: lower bound, claim, verdict, counts."""
        verdict = ("VIOLATION: the run leaks more than it claims" if self.violation
                   else "consistent with the claim (a lower bound below the claim proves nothing more)")
        scale = "" if self.noise_scale == 1 else f"  [TEST ONLY: engine noise x {self.noise_scale}]"
        return (f"one-run gradient-canary audit, {self.canaries} canaries, {self.steps} steps, sigma = "
                f"{self.noise_multiplier:.4g}, q = {self.sample_rate:.4g}{scale}\n"
                f"  correct guesses {self.correct}/{self.guesses}\n"
                f"  audited epsilon >= {self.epsilon_lower:.3f} ({self.confidence:.0%} confidence), claimed epsilon "
                f"= {self.claimed_epsilon:.3f} at delta = {self.delta:g}\n  {verdict}")


class ScaledNoise(GaussianNoise):
    """A deliberately broken noise source: the wrapped source's draws times ``scale`` (below 1 the engine's privacy
    claim is false). For audits and tests only, injected as ``engine.mechanism.noise``; the engine never uses it."""

    def __init__(self, source: GaussianNoise, scale: float) -> None:
        super().__init__(source.generator)
        self.scale = float(scale)

    def sample(self, grads, stds):
        """The real draws, scaled."""
        return {name: noise.mul_(self.scale) for name, noise in super().sample(grads, stds).items()}


def gradient_canary_audit(*, canaries: int = 1000, batch_size: int = 100, steps: int = 50,
                          noise_multiplier: float = 1.5, delta: float = 1e-5, confidence: float = 0.95,
                          noise_strategy: str = "global", accountant: str = "prv", seed: int | None = 0,
                          noise_scale: float = 1.0) -> AuditResult:
    """Audit the engine with ``canaries`` gradient canaries over ``steps`` noisy steps (see module docstring).

    ``noise_scale`` is TEST-ONLY: values below 1 under-noise the engine to check that the audit detects it.
    """
    if not (isinstance(canaries, int) and canaries >= 2):
        raise ValueError(f"canaries must be an integer >= 2, got {canaries!r}")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not (isinstance(batch_size, int) and 1 <= batch_size <= canaries):
        raise ValueError(f"batch_size must be an integer in [1, canaries={canaries}], got {batch_size!r}")
    if not 0 < delta < 1 or not 0 < confidence < 1:
        raise ValueError(f"delta and confidence must be in (0, 1), got {delta}, {confidence}")
    if not (math.isfinite(noise_scale) and noise_scale >= 0):
        raise ValueError(f"noise_scale must be a finite number >= 0, got {noise_scale}")
    if noise_strategy not in NOISE_STRATEGIES:
        raise ValueError(f"noise_strategy must be one of {NOISE_STRATEGIES}, got {noise_strategy!r}")

    width = -(-canaries // CLASSES)
    model = nn.Sequential(InputNormClip(1.0), nn.Linear(width, CLASSES, bias=False))
    engine = LipDPEngine(accountant=accountant, seed=seed)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(TensorDataset(torch.arange(canaries)), batch_size=batch_size),
        criterion=LipschitzCrossEntropy(), noise_multiplier=noise_multiplier, input_norm_bound=1.0,
        input_shape=(width,), noise_strategy=noise_strategy)
    if noise_scale != 1:
        logger.warning("TEST ONLY: the engine's noise is multiplied by %g; its privacy claim is false", noise_scale)
        engine.mechanism.noise = ScaledNoise(engine.mechanism.noise, noise_scale)
    weight = model[1].weight

    audit_generator = torch.Generator().manual_seed(engine.seed + 2)  # independent of the engine's streams
    included = torch.rand(canaries, generator=audit_generator) < 0.5
    coordinates = torch.randperm(weight.numel(), generator=audit_generator)[:canaries]
    delta_w = engine.current_bounds().sensitivities["1.weight"]
    q, expected = loader.sample_rate, loader.expected_batch_size
    log_absent = math.log1p(-q) if q < 1 else -math.inf
    scores = torch.zeros(canaries, dtype=torch.float64)
    taken = 0
    while taken < steps:
        for (sampled,) in loader:
            optimizer.zero_grad()
            present = sampled[included[sampled]]
            gradient = torch.zeros(weight.numel())
            gradient[coordinates[present]] = delta_w  # each canary at the sensitivity bound, own coordinate
            weight.grad = gradient.view_as(weight)
            optimizer.step()
            std = engine.noise_stds()["1.weight"]  # the claimed std, not the (test-only) scaled one
            released = weight.grad.flatten()[coordinates].double() * expected
            log_ratio = (delta_w * released - delta_w**2 / 2) / std**2
            scores += torch.logaddexp(torch.full_like(log_ratio, log_absent), log_ratio + math.log(q))
            taken += 1
            if taken == steps:
                break

    epsilon_lower, guesses, correct = epsilon_from_scores(scores.numpy(), included.numpy(), delta, confidence)
    result = AuditResult(
        epsilon_lower=epsilon_lower, claimed_epsilon=engine.get_epsilon(delta), delta=delta, confidence=confidence,
        canaries=canaries, guesses=guesses, correct=correct, steps=steps, noise_multiplier=float(noise_multiplier),
        sample_rate=q, noise_scale=float(noise_scale))
    logger.info("audit: epsilon >= %.3f (claimed %.3f)", result.epsilon_lower, result.claimed_epsilon)
    return result
