"""The backend interface: how a :class:`~accounting.history.Composition` is turned into (ε, δ).

A backend is a small frozen dataclass (its fields are its numerical options, e.g. PRV's
``eps_error``) with two operations:

- ``evaluator(composition, delta)``: set up the computation once for ``composition`` and return an
  :class:`EpsilonEvaluator`, which gives ε at δ for any sub-multiset ``counts <= composition.counts``.
  Setting up is the expensive part for PRV (discretising each PRV on a grid sized for the largest
  composition); evaluating a prefix is then one FFT. The accountant uses this to report ε after
  every epoch and to binary-search the number of steps a budget allows.
- ``delta(composition, epsilon)``: δ spent at ε for the whole composition.

Backends import their libraries lazily, inside these calls, so that ``import accounting`` stays
light and torch-free (Opacus imports torch as soon as any of its modules is imported).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar, Protocol

from accounting.history import Composition


class AccountingError(RuntimeError):
    """A backend could not compute a value (numerical failure of every implementation tried)."""


class BackendUnavailable(ImportError):
    """The backend's optional dependency is not installed."""


@dataclass(frozen=True)
class AccountingResult:
    """Bounds on ε (or δ) from one backend.

    ``upper`` is the conservative value to report as the guarantee. ``lower`` is ``None`` when the
    backend gives no lower bound (RDP and PLD give an upper bound only). ``method`` names the
    implementation that produced the numbers (with versions); ``note`` says anything the reader
    should know, e.g. that the PRV backend fell back to Opacus's implementation.
    """

    lower: float | None
    estimate: float
    upper: float
    method: str
    note: str = ""

    @classmethod
    def zero(cls, method: str) -> AccountingResult:
        """Nothing released: ε = 0 (and δ = 0)."""
        return cls(0.0, 0.0, 0.0, method, "empty history")

    def to_dict(self) -> dict:
        """The fields as a plain dict (JSON-able)."""
        return asdict(self)


class EpsilonEvaluator(abc.ABC):
    """ε at a fixed δ for sub-multisets of the composition the evaluator was set up for."""

    method: str

    def __call__(self, counts: Sequence[int]) -> AccountingResult:
        """ε bounds for ``counts[i]`` applications of mechanism ``i`` (``counts <= `` the set-up counts)."""
        if sum(counts) == 0:
            return AccountingResult.zero(self.method)
        return self._epsilon(tuple(int(c) for c in counts))

    @abc.abstractmethod
    def _epsilon(self, counts: tuple[int, ...]) -> AccountingResult:
        """ε bounds for a non-empty sub-multiset."""


class Backend(Protocol):
    """How to account a composition of Poisson-subsampled Gaussian mechanisms."""

    name: ClassVar[str]

    def evaluator(self, composition: Composition, delta: float) -> EpsilonEvaluator:
        """Set up once for ``composition``: an evaluator of ε at ``delta`` for any sub-multiset of it."""
        ...

    def delta(self, composition: Composition, epsilon: float) -> AccountingResult:
        """δ spent at ``epsilon`` by the whole ``composition``."""
        ...


def options_of(backend: Backend) -> dict:
    """The backend's numerical options (its dataclass fields), as plain JSON-able data."""
    return asdict(backend)  # type: ignore[call-overload]
