"""PLD backend: privacy loss distributions, Google's ``dp_accounting`` (optional extra ``pld``).

Sources: Koskela, Jälkö, Honkela, "Computing Tight Differential Privacy Guarantees Using FFT"
(AISTATS 2020); Doroshenko, Ghazi, Kamath, Kumar, Manurangsi, "Connect the Dots: Tighter Discrete
Approximations of Privacy Loss Distributions" (PETS 2022), https://arxiv.org/abs/2207.04380.
Each mechanism's PLD (add-or-remove-one adjacency) is built with the pessimistic connect-the-dots
discretisation, self-composed by FFT and composed with the others; the result is an upper bound
on ε (up to the 1e-50-mass truncation of the noise distribution). No lower bound is given.

Used as an independent cross-check of the PRV backend. ``dp_accounting`` pins ``attrs<24``; it is
an optional dependency, imported only when this backend computes.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from importlib.metadata import version
from typing import ClassVar

from accounting.backends.base import AccountingResult, BackendUnavailable, EpsilonEvaluator
from accounting.history import Composition
from accounting.validation import check_positive

INSTALL_HINT = "install the optional extra: pip install 'lipdp[pld]' (or pip install dp-accounting)"


def available() -> bool:
    """Whether ``dp_accounting`` is installed (checked without importing it)."""
    return importlib.util.find_spec("dp_accounting") is not None


class _PLDs:
    """Per-mechanism PLDs and their composition for any counts."""

    def __init__(self, composition: Composition, value_discretization_interval: float):
        from dp_accounting.pld import privacy_loss_distribution as pld

        self.method = f"dp_accounting {version('dp-accounting')} PLD"
        self._plds = [pld.from_gaussian_mechanism(standard_deviation=m.noise_multiplier, sampling_prob=m.sample_rate,
                                                  pessimistic_estimate=True,
                                                  value_discretization_interval=value_discretization_interval)
                      for m in composition.mechanisms]

    def compose(self, counts: tuple[int, ...]):
        composed = None
        for pld, count in zip(self._plds, counts, strict=True):
            if count:
                part = pld.self_compose(count)
                composed = part if composed is None else composed.compose(part)
        return composed


class _PLDEvaluator(EpsilonEvaluator):
    def __init__(self, composition: Composition, delta: float, value_discretization_interval: float):
        self._plds = _PLDs(composition, value_discretization_interval)
        self._delta = delta
        self.method = self._plds.method

    def _epsilon(self, counts: tuple[int, ...]) -> AccountingResult:
        epsilon = float(self._plds.compose(counts).get_epsilon_for_delta(self._delta))
        return AccountingResult(None, epsilon, epsilon, self.method)


@dataclass(frozen=True)
class PLDBackend:
    """dp_accounting PLD. ``value_discretization_interval``: grid step of the privacy loss (its default)."""

    value_discretization_interval: float = 1e-4
    name: ClassVar[str] = "pld"

    def __post_init__(self) -> None:
        check_positive(self.value_discretization_interval, "value_discretization_interval")
        if not available():
            raise BackendUnavailable(f"backend 'pld' needs dp_accounting: {INSTALL_HINT}")

    def evaluator(self, composition: Composition, delta: float) -> EpsilonEvaluator:
        """ε at ``delta`` from the composed pessimistic PLDs (an upper bound; no lower bound)."""
        return _PLDEvaluator(composition, delta, self.value_discretization_interval)

    def delta(self, composition: Composition, epsilon: float) -> AccountingResult:
        """δ at ``epsilon`` of the whole composition, from its composed pessimistic PLD (upper bound only)."""
        plds = _PLDs(composition, self.value_discretization_interval)
        delta = float(plds.compose(composition.counts).get_delta_for_epsilon(epsilon))
        return AccountingResult(None, delta, delta, plds.method)
