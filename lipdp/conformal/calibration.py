"""Split conformal calibration, vanilla and robust prediction sets, and their metrics.

Split conformal prediction (Vovk et al. 2005; Lei et al. 2018; the form used here is in Angelopoulos & Bates
2021, "A Gentle Introduction to Conformal Prediction", §1): with calibration scores s_1..s_n of the true labels,
exchangeable with the test pair's score s_{n+1},

    q_hat = s_(r),   r = ceil((n + 1)(1 - alpha)),

the r-th smallest score, i.e. the ceil((n+1)(1-alpha))/n empirical quantile. Then
P(s_{n+1} <= q_hat) >= r / (n + 1) >= 1 - alpha (ties included), and the set C(x) = {y : s(x, y) <= q_hat} covers
the true label with probability >= 1 - alpha. If r > n (n < (1 - alpha) / alpha) no finite quantile exists.

Robust sets (lip-rcp, Massena et al. 2025): the test input x~ may be x + delta with ||delta|| <= r_in, so its
logits z~ are within rho = Lip(f) r_in of the clean logits z. Using the score's lower bound over the logit ball,

    C_rho(x~) = {y : lower_rho(z~, y) <= q_hat},

if the clean score s(z, y) <= q_hat then lower_rho(z~, y) <= s(z, y) <= q_hat (z lies in the ball around z~), so
y is in C_rho(x~): coverage >= 1 - alpha holds under any attack of norm <= r_in, calibration done on clean data.
Pointwise: every label in the clean vanilla set is in the attacked robust set.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch


def check_alpha(alpha: float) -> float:
    """Validate a miscoverage level alpha in (0, 1) and return it as a float."""
    if not (isinstance(alpha, (int, float)) and 0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in (0, 1) (target coverage 1 - alpha), got {alpha!r}. Fix: e.g. alpha=0.1.")
    return float(alpha)


def check_scores_1d(scores: torch.Tensor, what: str = "calibration scores") -> torch.Tensor:
    """Validate a non-empty 1-D tensor of finite scores."""
    scores = torch.as_tensor(scores)
    if scores.dim() != 1:
        raise ValueError(
            f"{what} must be 1-D (one score per calibration sample, the true label's), got shape "
            f"{tuple(scores.shape)}. Fix: use true_label_scores(scores, labels)."
        )
    if scores.numel() == 0:
        raise ValueError(f"{what} are empty: split conformal needs at least one calibration sample.")
    if not torch.isfinite(scores).all():
        raise ValueError(f"{what} contain NaN or infinite values.")
    return scores


def true_label_scores(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """s_i = scores[i, labels[i]]: the score of each sample's true label, shape (N,)."""
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape (N, K), got {tuple(scores.shape)}")
    if labels.dim() != 1 or labels.shape[0] != scores.shape[0]:
        raise ValueError(
            f"labels must have shape (N,) matching scores (N, K) = {tuple(scores.shape)}, got {tuple(labels.shape)}"
        )
    if labels.dtype in (torch.float16, torch.float32, torch.float64, torch.bool):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= scores.shape[1]):
        raise ValueError(f"labels must lie in [0, {scores.shape[1] - 1}], got range "
                         f"[{labels.min().item()}, {labels.max().item()}]")
    return scores.gather(1, labels.long()[:, None]).squeeze(1)


def conformal_rank(n: int, alpha: float) -> int:
    """r = ceil((n + 1)(1 - alpha)), the order statistic split conformal uses; raises if r > n (no finite q_hat)."""
    alpha = check_alpha(alpha)
    if n < 1:
        raise ValueError("split conformal needs at least one calibration sample, got an empty calibration set.")
    # Exact rational arithmetic on the float alpha: (n + 1) * (1 - alpha) in floats can land a hair above an
    # integer (100 * (1 - 0.07) = 93.00000000000001) and add a spurious rank.
    rank = math.ceil((n + 1) * (1 - Fraction(alpha)))
    if rank > n:
        raise ValueError(
            f"{n} calibration samples are too few for alpha={alpha}: the conformal quantile would be the "
            f"{rank}-th smallest score (no finite threshold). Fix: use at least {math.ceil((1 - alpha) / alpha)} "
            "calibration samples, or a larger alpha."
        )
    return rank


def conformal_quantile(calibration_scores: torch.Tensor, alpha: float) -> float:
    """q_hat = s_(r), r = ceil((n + 1)(1 - alpha)): the split conformal threshold (module docstring)."""
    scores = check_scores_1d(calibration_scores)
    rank = conformal_rank(scores.numel(), alpha)
    return scores.double().kthvalue(rank).values.item()


def prediction_sets(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean (N, K) membership: y is in the set of sample i iff scores[i, y] <= threshold.

    Vanilla sets take the scores; robust sets take ``score.bounds(logits, rho).lower`` (module docstring).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape (N, K), got {tuple(scores.shape)}")
    if math.isnan(threshold):
        raise ValueError("threshold is NaN")
    return scores <= threshold


def _check_sets(sets: torch.Tensor) -> None:
    if sets.dim() != 2 or sets.dtype != torch.bool:
        raise ValueError(f"sets must be a boolean (N, K) tensor from prediction_sets, got {sets.dtype} "
                         f"{tuple(sets.shape)}")
    if sets.shape[0] == 0:
        raise ValueError("sets are empty (N = 0): nothing to evaluate")


def coverage(sets: torch.Tensor, labels: torch.Tensor) -> float:
    """Empirical coverage: fraction of samples whose true label is in their set."""
    _check_sets(sets)
    return true_label_scores(sets.float(), labels).mean().item()


def mean_set_size(sets: torch.Tensor) -> float:
    """Mean number of labels per set."""
    _check_sets(sets)
    return sets.float().sum(dim=1).mean().item()
