"""``PrivacyAccountant``: a history of noisy steps plus the backend that accounts it.

Training calls :meth:`PrivacyAccountant.step` once per optimizer step; the history merges
consecutive identical steps, so its size is the number of changes of (σ, q), not of steps.
ε is computed on demand by the backend from the whole history (heterogeneous histories are
composed exactly, never approximated by their last entry) and cached per (history, δ).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any

from accounting import guess
from accounting.backends import AccountingResult, Backend, get_backend, options_of
from accounting.history import Composition, HistoryEntry, Mechanism, append, total_steps
from accounting.search import shrink_bracket
from accounting.validation import (
    check_delta,
    check_epsilon,
    check_noise_multiplier,
    check_sample_rate,
    check_steps,
)

#: Default cap of :meth:`PrivacyAccountant.max_additional_steps` (a larger answer is reported as the cap).
MAX_STEPS = 10**6
STATE_FORMAT = "lipdp.accounting/1"
_BRACKET_GROWTH = 2.0


@functools.lru_cache(maxsize=256)
def _epsilon(backend: Backend, history: tuple[HistoryEntry, ...], delta: float) -> AccountingResult:
    composition = Composition.of(history)
    if composition.total_steps == 0:
        return AccountingResult.zero(backend.name)
    return backend.evaluator(composition, delta)(composition.counts)


@functools.lru_cache(maxsize=256)
def _delta(backend: Backend, history: tuple[HistoryEntry, ...], epsilon: float) -> AccountingResult:
    composition = Composition.of(history)
    if composition.total_steps == 0:
        return AccountingResult.zero(backend.name)
    return backend.delta(composition, epsilon)


def _entry(noise_multiplier: Any, sample_rate: Any, steps: Any) -> HistoryEntry:
    return HistoryEntry(check_noise_multiplier(noise_multiplier), check_sample_rate(sample_rate), check_steps(steps))


class PrivacyAccountant:
    """Accounts DP-SGD-style training: T Poisson-subsampled Gaussian mechanisms (docs/design.md §1, §4).

    ``backend`` is "prv" (default; prv-accountant with Opacus's PRV as fallback), "rdp" (Opacus)
    or "pld" (dp_accounting, optional), or a backend object; ``options`` are the backend's
    numerical options (e.g. ``eps_error=0.01`` for PRV). ``history`` seeds the history with
    :class:`HistoryEntry` objects or ``(σ, q, steps)`` triples.
    """

    def __init__(self, backend: str | Backend = "prv", *,
                 history: Iterable[HistoryEntry | Sequence] = (), **options: Any):
        self._backend = get_backend(backend, **options)
        self._history: list[HistoryEntry] = []
        for entry in history:
            append(self._history, _entry(*(entry.to_list() if isinstance(entry, HistoryEntry) else entry)))

    # -- what happened ---------------------------------------------------------------------------

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` steps of the mechanism (σ = noise_multiplier, q = sample_rate)."""
        if self._history and type(steps) is int and steps >= 0:  # fast path: repeat of the (validated) last mechanism
            last = self._history[-1]
            if noise_multiplier == last.noise_multiplier and sample_rate == last.sample_rate:
                self._history[-1] = HistoryEntry(last.noise_multiplier, last.sample_rate, last.steps + steps)
                return
        append(self._history, _entry(noise_multiplier, sample_rate, steps))

    @property
    def history(self) -> list[HistoryEntry]:
        """The (σ, q, steps) entries in order, consecutive identical mechanisms merged (a copy)."""
        return list(self._history)

    @property
    def total_steps(self) -> int:
        """Steps recorded so far (sum of the history's step counts)."""
        return total_steps(self._history)

    @property
    def backend(self) -> Backend:
        """The backend object that turns the history into epsilon."""
        return self._backend

    @property
    def backend_name(self) -> str:
        """The backend's name: "prv", "rdp" or "pld"."""
        return self._backend.name

    # -- how it is accounted ---------------------------------------------------------------------

    def epsilon_result(self, delta: float) -> AccountingResult:
        """ε bounds spent so far at ``delta``, with the implementation used and any note (e.g. fallback)."""
        return _epsilon(self._backend, tuple(self._history), check_delta(delta))

    def epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta``: the backend's conservative (upper) value; 0.0 for an empty history."""
        return self.epsilon_result(delta).upper

    def get_epsilon(self, delta: float) -> float:
        """Opacus's name for :meth:`epsilon`: ``engine.accountant.get_epsilon(delta=1e-5)`` works as in Opacus."""
        return self.epsilon(delta)

    def epsilon_bounds(self, delta: float) -> tuple[float, float, float]:
        """(lower, estimate, upper) ε at ``delta``. Backends without a lower bound (RDP, PLD) report 0.0,
        the trivial one."""
        result = self.epsilon_result(delta)
        return (0.0 if result.lower is None else result.lower), result.estimate, result.upper

    def delta_result(self, epsilon: float) -> AccountingResult:
        """δ bounds spent so far at ``epsilon``."""
        return _delta(self._backend, tuple(self._history), check_epsilon(epsilon))

    def delta(self, epsilon: float) -> float:
        """δ spent so far at ``epsilon`` (conservative, upper value); 0.0 for an empty history."""
        return self.delta_result(epsilon).upper

    def epsilon_curve(self, delta: float, steps: Sequence[int]) -> list[AccountingResult]:
        """ε bounds after each of the given numbers of steps (prefixes of the history), with one backend set-up."""
        delta = check_delta(delta)
        total = self.total_steps
        points = [check_steps(t, "steps") for t in steps]
        if any(t > total for t in points):
            raise ValueError(f"steps must be <= {total} (the history's length), got {max(points)}")
        composition = Composition.of(self._history)
        if total == 0:
            return [AccountingResult.zero(self._backend.name) for _ in points]
        evaluator = self._backend.evaluator(composition, delta)
        return [evaluator(composition.prefix_counts(self._history, t)) for t in points]

    def max_additional_steps(self, noise_multiplier: float, sample_rate: float, epsilon: float, delta: float,
                             *, limit: int = MAX_STEPS) -> int:
        """Largest k <= ``limit`` such that this history plus k steps of (σ, q) keeps ε(δ) <= ``epsilon``.

        The backend is set up once for an upper bracket (placed with a cheap RDP guess) and k is found
        by a bracketed integer search on prefixes; the answer is then settled with exactly the computation
        :meth:`epsilon` would do for history + k (lowered or raised until k fits and k + 1 does not).
        Returns 0 if the budget is already exceeded, and ``limit`` if even that many steps fit; when
        the RDP bound (an upper bound on ε, looser than PRV and PLD) already certifies ``limit``
        steps, ``limit`` is returned without setting the backend up for that many (10⁶ steps would
        need a PRV grid of ~10⁷ points).
        """
        mechanism = Mechanism(check_noise_multiplier(noise_multiplier), check_sample_rate(sample_rate))
        epsilon, delta, limit = check_epsilon(epsilon), check_delta(delta), check_steps(limit, "limit")
        spent = self.epsilon(delta)
        if spent > epsilon or limit == 0:
            return 0
        start = guess.rdp_steps(Composition.of(self._history), mechanism, epsilon, delta, limit)
        if start == limit:
            return limit
        steps = self._search_additional_steps(mechanism, epsilon, delta, limit, start, spent - epsilon)

        def fits(k: int) -> bool:  # exactly what epsilon() reports after k more steps
            return k == 0 or _epsilon(self._backend, self._extended(mechanism, k), delta).upper <= epsilon

        # The search ran on a grid set up for its upper bracket; near the boundary that grid and the one
        # epsilon() sets up for history + k can disagree by a step either way: settle on epsilon()'s answer.
        while steps > 0 and not fits(steps):
            steps -= 1
        while steps < limit and fits(steps + 1):
            steps += 1
        return steps

    def _extended(self, mechanism: Mechanism, steps: int) -> tuple[HistoryEntry, ...]:
        """This history followed by ``steps`` steps of ``mechanism``."""
        history = list(self._history)
        append(history, HistoryEntry(*mechanism, steps))
        return tuple(history)

    def _search_additional_steps(self, mechanism: Mechanism, epsilon: float, delta: float, limit: int,
                                 start: int, f_zero: float) -> int:
        """Largest feasible k found on one backend set-up for an infeasible upper bracket (grown by
        ``_BRACKET_GROWTH`` from ``start``, the RDP guess, until infeasible or ``limit``; PRV allows 1.2-1.9
        times RDP's steps in tests). ``f_zero``: the excess ε of the history alone (<= 0)."""
        base = self.total_steps
        low, f_low, high = 0, f_zero, min(limit, max(1, math.ceil(_BRACKET_GROWTH * start)))
        while True:
            history = self._extended(mechanism, high)
            composition = Composition.of(history)
            evaluator = self._backend.evaluator(composition, delta)

            def excess(k: float, history=history, composition=composition, evaluator=evaluator) -> float:
                return evaluator(composition.prefix_counts(history, base + int(k))).upper - epsilon

            f_high = excess(high)
            if f_high > 0:
                break
            if high == limit:
                return limit
            low, f_low, high = high, f_high, min(limit, math.ceil(_BRACKET_GROWTH * high))
        if low < start < high:  # the RDP guess usually narrows the bracket from below
            f_start = excess(start)
            if f_start > 0:
                high, f_high = start, f_start
            else:
                low, f_low = start, f_start
        _, found = shrink_bracket(excess, high, low, f_high, f_low, tol=1, integer=True)
        return int(found)

    # -- persistence -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain JSON-able state: backend name and options, and the history as [σ, q, steps] lists."""
        return {
            "format": STATE_FORMAT,
            "backend": self._backend.name,
            "options": options_of(self._backend),
            "history": [entry.to_list() for entry in self._history],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore backend, options and history from :meth:`state_dict` output (replacing the current state).

        To re-account a saved history with another backend, use
        ``PrivacyAccountant(backend, history=state["history"])``.
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"state must be a dict from PrivacyAccountant.state_dict() with format "
                             f"{STATE_FORMAT!r}, got {state!r:.200}")
        backend = get_backend(state["backend"], **state["options"])
        history: list[HistoryEntry] = []
        for entry in state["history"]:
            append(history, _entry(*entry))
        self._backend, self._history = backend, history

    def __repr__(self) -> str:
        return (f"PrivacyAccountant(backend={self._backend!r}, total_steps={self.total_steps}, "
                f"history_entries={len(self._history)})")
