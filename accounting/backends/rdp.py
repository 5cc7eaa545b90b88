"""RDP backend: Rényi DP of the subsampled Gaussian, via Opacus's ``opacus.accountants.analysis.rdp``.

Sources: I. Mironov, K. Talwar, L. Zhang, "Rényi Differential Privacy of the Sampled Gaussian
Mechanism" (2019), https://arxiv.org/abs/1908.10530 for the per-step RDP curve (``compute_rdp``);
RDP composes by addition, so a heterogeneous composition has curve ``Σ_i counts_i · rdp_i(α)``;
conversion to (ε, δ) by Balle et al. 2020, Theorem 21 (``get_privacy_spent``), minimised over
Opacus's default orders α ∈ {1.1, …, 10.9, 12, …, 63}. RDP gives an upper bound only.

Opacus imports torch with any of its modules, so it is imported when a value is first computed.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from importlib.metadata import version
from typing import ClassVar

import numpy as np

from accounting.backends.base import AccountingResult, EpsilonEvaluator
from accounting.history import Composition
from accounting.search import shrink_bracket


def _opacus_rdp():
    from opacus.accountants import RDPAccountant  # imports torch
    from opacus.accountants.analysis import rdp

    return rdp, tuple(RDPAccountant.DEFAULT_ALPHAS)


class _RDPCurves:
    """Per-step RDP curves of each mechanism, at Opacus's default orders."""

    def __init__(self, composition: Composition):
        self._rdp, self.orders = _opacus_rdp()
        self.method = f"opacus {version('opacus')} RDP"
        self._curves = [np.asarray(self._rdp.compute_rdp(q=m.sample_rate, noise_multiplier=m.noise_multiplier,
                                                          steps=1, orders=list(self.orders)))
                        for m in composition.mechanisms]

    def epsilon(self, counts: tuple[int, ...], delta: float) -> tuple[float, str]:
        """(ε, note): ε at δ for the composed curve, and a note if the best order is at the end of the range."""
        curve = sum(c * curve for c, curve in zip(counts, self._curves, strict=True))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            epsilon, order = self._rdp.get_privacy_spent(orders=list(self.orders), rdp=curve, delta=delta)
        note = "; ".join(str(w.message) for w in caught)
        if note:
            note = f"best RDP order α={order:g}: {note}"
        return float(epsilon), note


class _RDPEvaluator(EpsilonEvaluator):
    def __init__(self, composition: Composition, delta: float):
        self._curves = _RDPCurves(composition)
        self._delta = delta
        self.method = self._curves.method

    def _epsilon(self, counts: tuple[int, ...]) -> AccountingResult:
        epsilon, note = self._curves.epsilon(counts, self._delta)
        return AccountingResult(None, epsilon, epsilon, self.method, note)


#: δ(ε) is searched in [DELTA_FLOOR, 1]; a δ below the floor is reported as the floor.
DELTA_FLOOR = 1e-300


@dataclass(frozen=True)
class RDPBackend:
    """Opacus RDP accountant (no options)."""

    name: ClassVar[str] = "rdp"

    def evaluator(self, composition: Composition, delta: float) -> EpsilonEvaluator:
        """ε at ``delta`` from the summed RDP curves, minimised over Opacus's default orders (upper bound only)."""
        return _RDPEvaluator(composition, delta)

    def delta(self, composition: Composition, epsilon: float) -> AccountingResult:
        """The smallest δ whose RDP ε is <= ``epsilon``: ``get_privacy_spent`` inverted by a bracketed
        search on log δ (it is decreasing in δ), to a relative tolerance of 1e-9 on δ, rounded up."""
        curves = _RDPCurves(composition)

        def excess(log_delta: float) -> float:
            return curves.epsilon(composition.counts, math.exp(log_delta))[0] - epsilon

        high, low = 0.0, math.log(DELTA_FLOOR)  # δ = 1 and the floor
        f_high, f_low = excess(high), excess(low)
        if f_high > 0:
            return AccountingResult(None, 1.0, 1.0, curves.method, "no δ < 1 reaches this ε under RDP")
        if f_low <= 0:
            return AccountingResult(None, DELTA_FLOOR, DELTA_FLOOR, curves.method, f"δ <= {DELTA_FLOOR:g}")
        _, feasible = shrink_bracket(excess, low, high, f_low, f_high, tol=1e-9)
        delta = math.exp(feasible)
        return AccountingResult(None, delta, delta, curves.method)
