"""What happened: the history of noisy steps, as plain data.

A training run releases, at every optimizer step, one Poisson-subsampled Gaussian mechanism with
noise multiplier σ and sample rate q (docs/design.md §1). The history records these as
``(σ, q, steps)`` entries in chronological order, consecutive identical mechanisms merged into one
entry, so that a run of 10⁵ identical steps is a single entry.

How a history is *accounted* is the backends' business (``accounting.backends``): privacy loss
composes commutatively, so a backend only needs the multiset of mechanisms with their counts, the
:class:`Composition`. Keeping the two apart lets a saved history be re-accounted with any backend.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple


class Mechanism(NamedTuple):
    """One Poisson-subsampled Gaussian mechanism: noise multiplier σ and sample rate q."""

    noise_multiplier: float
    sample_rate: float


@dataclass(frozen=True)
class HistoryEntry:
    """``steps`` consecutive applications of the mechanism (σ = noise_multiplier, q = sample_rate)."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    @property
    def mechanism(self) -> Mechanism:
        """The entry's (σ, q) as a :class:`Mechanism`."""
        return Mechanism(self.noise_multiplier, self.sample_rate)

    def to_list(self) -> list:
        """``[σ, q, steps]``, the JSON form used by ``state_dict``."""
        return [self.noise_multiplier, self.sample_rate, self.steps]


def append(history: list[HistoryEntry], entry: HistoryEntry) -> None:
    """Append ``entry`` to ``history`` in place, merging it into the last entry if the mechanism is equal.

    Entries with ``steps == 0`` are dropped: they spend nothing.
    """
    if entry.steps == 0:
        return
    if history and history[-1].mechanism == entry.mechanism:
        last = history[-1]
        history[-1] = HistoryEntry(last.noise_multiplier, last.sample_rate, last.steps + entry.steps)
    else:
        history.append(entry)


def total_steps(history: Iterable[HistoryEntry]) -> int:
    """The number of steps in ``history`` (the sum of its entries' ``steps``)."""
    return sum(entry.steps for entry in history)


@dataclass(frozen=True)
class Composition:
    """A multiset of mechanisms: ``counts[i]`` applications of ``mechanisms[i]``.

    Composition of privacy losses is commutative, so this is all a backend needs to know about a
    history. Mechanisms are listed in order of first appearance.
    """

    mechanisms: tuple[Mechanism, ...]
    counts: tuple[int, ...]

    @classmethod
    def of(cls, history: Sequence[HistoryEntry]) -> Composition:
        """The composition of a whole history (identical mechanisms grouped, wherever they occur)."""
        totals: dict[Mechanism, int] = {}
        for entry in history:
            totals[entry.mechanism] = totals.get(entry.mechanism, 0) + entry.steps
        return cls(tuple(totals), tuple(totals.values()))

    @property
    def total_steps(self) -> int:
        """The number of mechanism applications, ``sum(counts)``."""
        return sum(self.counts)

    def prefix_counts(self, history: Sequence[HistoryEntry], steps: int) -> tuple[int, ...]:
        """Counts, aligned with ``self.mechanisms``, of the first ``steps`` steps of ``history``.

        ``self`` must be (a superset of) the composition of ``history``; used to account every
        prefix of a run (ε after each epoch) with one backend set up for the whole run.
        """
        index = {mechanism: i for i, mechanism in enumerate(self.mechanisms)}
        counts = [0] * len(self.mechanisms)
        remaining = steps
        for entry in history:
            if remaining <= 0:
                break
            taken = min(entry.steps, remaining)
            counts[index[entry.mechanism]] += taken
            remaining -= taken
        if remaining > 0:
            raise ValueError(f"steps must be <= {steps - remaining} (the history's length), got {steps}")
        return tuple(counts)
