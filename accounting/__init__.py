"""Privacy accounting for lipdp (torch-free at import; see docs/design.md §4).

- :class:`PrivacyAccountant`: history of (σ, q, steps) Poisson-subsampled Gaussian steps and its ε/δ
  with backend "prv" (prv-accountant, Opacus's PRV as fallback), "rdp" (Opacus) or "pld"
  (dp_accounting, optional extra).
- :func:`calibrate_noise`, :func:`max_steps`, :func:`max_epochs`: invert the accountant.
- :class:`BudgetReport`: ε per epoch as text, JSON and a PNG plot.
- ``python -m accounting`` / ``lipdp budget``: the same from the command line (:mod:`accounting.cli`).

Opacus imports torch as soon as any of its modules is imported, so the Opacus-based parts (RDP
backend, PRV fallback) import it when they first compute, never at ``import accounting``.
"""

from accounting.accountant import MAX_STEPS, PrivacyAccountant
from accounting.backends import (
    BACKENDS,
    AccountingError,
    AccountingResult,
    BackendUnavailable,
    PLDBackend,
    PRVBackend,
    RDPBackend,
    available_backends,
    get_backend,
)
from accounting.calibration import SIGMA_RANGE, calibrate_noise, max_epochs, max_steps, steps_for_epochs
from accounting.history import HistoryEntry
from accounting.report import BudgetReport

__all__ = [
    "BACKENDS",
    "MAX_STEPS",
    "SIGMA_RANGE",
    "AccountingError",
    "AccountingResult",
    "BackendUnavailable",
    "BudgetReport",
    "HistoryEntry",
    "PLDBackend",
    "PRVBackend",
    "PrivacyAccountant",
    "RDPBackend",
    "available_backends",
    "calibrate_noise",
    "get_backend",
    "max_epochs",
    "max_steps",
    "steps_for_epochs",
]
