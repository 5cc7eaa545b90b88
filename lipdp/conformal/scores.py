"""Non-conformity scores on logits, their Lipschitz constants, and their bounds inside a logit ball.

A score s(z, y) in [0, 1] measures how badly label y fits logits z (small = conforming); the prediction set at
threshold q is {y : s(z, y) <= q}. Under an input perturbation of L2 norm <= r, a model with certified Lipschitz
constant Lip(f) moves its logit vector by at most rho = Lip(f) * r (``logit_radius``). Robust conformal
prediction (lip-rcp, Massena et al. 2025, "Efficient Robust Conformal Prediction via Lipschitz-Bounded
Networks", ICML) therefore needs, for every label, the range of s over the logit ball B(z, rho):
``bounds(z, rho) = (lower, upper)`` with lower <= s(z', y) <= upper for every ||z' - z||_2 <= rho.

Both scores here have the form s(z, y) = 1 - sigmoid(h_y(z)) with h_y a Lipschitz "log-odds" of label y. Since
sigmoid is increasing, a bound h_y(z) +- c on the ball gives the score bound [1 - sigmoid(h + c), 1 - sigmoid(h - c)],
never looser than the Lipschitz bound s +- Lip(s) rho (sigmoid rises by at most c / 4 over an interval of length c)
and always inside [0, 1]. Lip(s) = Lip(h) * max sigmoid' = Lip(h) / 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SQRT2 = math.sqrt(2.0)


def logit_radius(lipschitz_constant: float, radius: float) -> float:
    """rho = Lip(f) * r: how far (L2) the logits can move when the input moves by at most ``radius`` (L2).

    ``lipschitz_constant`` must be a certified upper bound of the model's L2 Lipschitz constant
    (``LipDPEngine.lipschitz_constant()`` or ``lipdp.lipschitz_constant(model, input_shape)``), never a nominal 1.
    """
    if not (math.isfinite(lipschitz_constant) and lipschitz_constant >= 0):
        raise ValueError(
            f"lipschitz_constant must be a finite number >= 0, got {lipschitz_constant}. Fix: pass the certified "
            "constant from lipdp.lipschitz_constant(model, input_shape)."
        )
    if not (math.isfinite(radius) and radius >= 0):
        raise ValueError(f"radius must be a finite number >= 0 (an L2 norm), got {radius}")
    return float(lipschitz_constant) * float(radius)


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(
            f"logits must have shape (N, K) with K >= 2 classes, got {tuple(logits.shape)}. Fix: pass model(x) for "
            "a batch x (flatten extra dimensions first)."
        )


def _check_rho(rho: float) -> None:
    if not (math.isfinite(rho) and rho >= 0):
        raise ValueError(f"logit radius rho must be a finite number >= 0, got {rho}. Fix: use logit_radius(lip, r).")


@dataclass(frozen=True)
class ScoreBounds:
    """Element-wise bounds (shape (N, K)) of a score over a logit ball: lower <= s(z', y) <= upper."""

    lower: torch.Tensor
    upper: torch.Tensor


class SoftmaxScore:
    """LAC score with temperature (Sadinle et al. 2019, "Least Ambiguous Set-Valued Classifiers"):
    s(z, y) = 1 - softmax(tau z)_y.

    **Log-odds form.** p_y = e^{tau z_y} / (e^{tau z_y} + sum_{j != y} e^{tau z_j}) = sigmoid(h_y(z)) with
    h_y(z) = tau z_y - LSE_{j != y}(tau z_j), LSE the log-sum-exp.

    **Lipschitz constant of h_y.** grad h_y = tau (e_y - q), with q = softmax of (tau z_j)_{j != y} placed on the
    coordinates j != y (zero at y). Hence ||grad h_y||^2 = tau^2 (1 + ||q||^2) <= 2 tau^2 (||q||_2 <= ||q||_1 = 1),
    approached as q becomes one-hot (attained for K = 2, where q is one-hot): Lip(h_y) = sqrt(2) tau.

    **Lipschitz constant of the score.** grad s = -sigmoid'(h) grad h with sigmoid' <= 1/4, so
    Lip(s) = sqrt(2) tau / 4 = tau / (2 sqrt(2)) ~= 0.354 tau. It is tight: for K = 2 and z = 0,
    grad p_1 = (1/4) tau (1, -1), of norm sqrt(2) tau / 4. (Equivalently, directly: grad p_y = tau p_y (e_y - p),
    ||e_y - p||^2 = (1 - p_y)^2 + sum_{j != y} p_j^2 <= 2 (1 - p_y)^2, so ||grad p_y|| <= sqrt(2) tau p_y (1 - p_y)
    <= sqrt(2) tau / 4. The often quoted tau / 2 is a valid but loose constant.)

    **Bounds over the ball ||z' - z|| <= rho.**
    * upper score (lowest h): h_y(z') >= h_y(z) - sqrt(2) tau rho (Lipschitz).
    * lower score (highest h): h_y is concave (linear minus the convex LSE), so it lies below its tangent plane:
      h_y(z') <= h_y(z) + grad h_y(z) . (z' - z) <= h_y(z) + tau sqrt(1 + ||q||^2) rho. This local constant is at
      most the global sqrt(2) tau and much smaller when the other classes are spread out. The robust sets use this
      side (see ``lipdp.conformal.calibration``).
    """

    def __init__(self, temperature: float = 1.0) -> None:
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        self.temperature = float(temperature)
        self.lipschitz = SQRT2 * self.temperature / 4.0

    def log_odds(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, ||grad h||): h[i, y] = tau z_y - LSE_{j != y} tau z_j and its exact gradient norm, both (N, K)."""
        _check_logits(logits)
        scaled = self.temperature * logits
        k = scaled.shape[1]
        eye = torch.eye(k, dtype=torch.bool, device=scaled.device)
        others = scaled[:, None, :].masked_fill(eye, float("-inf"))  # (N, K_y, K_j), j = y removed
        lse = torch.logsumexp(others, dim=2)
        q = torch.softmax(others, dim=2)
        grad_norm = self.temperature * torch.sqrt(1.0 + (q * q).sum(dim=2))
        return scaled - lse, grad_norm

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Scores s[i, y] = 1 - softmax(tau z_i)_y, shape (N, K)."""
        _check_logits(logits)
        return 1.0 - torch.softmax(self.temperature * logits, dim=1)

    def bounds(self, logits: torch.Tensor, rho: float) -> ScoreBounds:
        """Range of every score over the logit ball of radius ``rho`` around each row of ``logits``."""
        _check_rho(rho)
        h, grad_norm = self.log_odds(logits)
        return ScoreBounds(
            lower=1.0 - torch.sigmoid(h + grad_norm * rho),
            upper=1.0 - torch.sigmoid(h - SQRT2 * self.temperature * rho),
        )

    def __repr__(self) -> str:
        return f"SoftmaxScore(temperature={self.temperature})"


class SigmoidScore:
    """Sigmoid LAC score, one independent sigmoid per class, as in lip-rcp (Massena et al. 2025):
    s(z, y) = 1 - sigmoid(tau z_y - b).

    h_y(z) = tau z_y - b depends on coordinate y only: grad h_y = tau e_y, Lip(h_y) = tau, and
    Lip(s) = tau / 4. The bounds over ||z' - z|| <= rho are exact: h_y ranges over [h - tau rho, h + tau rho],
    both ends attained at z' = z -+ rho e_y. (Sets may be empty: nothing ties the classes' sigmoids together.)
    """

    def __init__(self, temperature: float = 1.0, bias: float = 0.0) -> None:
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        if not math.isfinite(bias):
            raise ValueError(f"bias must be finite, got {bias}")
        self.temperature = float(temperature)
        self.bias = float(bias)
        self.lipschitz = self.temperature / 4.0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Scores s[i, y] = 1 - sigmoid(tau z_iy - b), shape (N, K)."""
        _check_logits(logits)
        return 1.0 - torch.sigmoid(self.temperature * logits - self.bias)

    def bounds(self, logits: torch.Tensor, rho: float) -> ScoreBounds:
        """Exact range of every score over the logit ball of radius ``rho``."""
        _check_logits(logits)
        _check_rho(rho)
        h = self.temperature * logits - self.bias
        shift = self.temperature * rho
        return ScoreBounds(lower=1.0 - torch.sigmoid(h + shift), upper=1.0 - torch.sigmoid(h - shift))

    def __repr__(self) -> str:
        return f"SigmoidScore(temperature={self.temperature}, bias={self.bias})"


ConformityScore = SoftmaxScore | SigmoidScore


def make_score(name: str, temperature: float, bias: float = 0.0) -> ConformityScore:
    """Score by name: ``"softmax"`` (LAC on softmax(tau z)) or ``"sigmoid"`` (LAC on sigmoid(tau z_y - b))."""
    if name == "softmax":
        if bias != 0.0:
            raise ValueError("the softmax score has no bias (softmax is shift invariant). Fix: drop bias.")
        return SoftmaxScore(temperature)
    if name == "sigmoid":
        return SigmoidScore(temperature, bias)
    raise ValueError(f"unknown score {name!r}; choose 'softmax' or 'sigmoid'")
