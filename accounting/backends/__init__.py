"""Accounting backends: ``prv`` (default), ``rdp`` and the optional ``pld``. See :mod:`.base` for the interface."""

from __future__ import annotations

from accounting.backends.base import (
    AccountingError,
    AccountingResult,
    Backend,
    BackendUnavailable,
    EpsilonEvaluator,
    options_of,
)
from accounting.backends.pld import PLDBackend
from accounting.backends.pld import available as pld_available
from accounting.backends.prv import PRVBackend
from accounting.backends.rdp import RDPBackend

BACKENDS: dict[str, type] = {"prv": PRVBackend, "rdp": RDPBackend, "pld": PLDBackend}


def get_backend(backend: str | Backend = "prv", **options) -> Backend:
    """The backend named ``backend`` ("prv", "rdp" or "pld") with the given numerical options,
    or ``backend`` itself if it already is a backend object (then no options may be given)."""
    if not isinstance(backend, str):
        if options:
            raise ValueError("backend options can only be given with a backend name")
        return backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    try:
        return BACKENDS[backend](**options)
    except TypeError as error:
        raise ValueError(f"bad options for backend {backend!r}: {error}") from None


def available_backends() -> list[str]:
    """Names of the backends whose dependencies are installed."""
    return [name for name in BACKENDS if name != "pld" or pld_available()]


__all__ = [
    "BACKENDS",
    "AccountingError",
    "AccountingResult",
    "Backend",
    "BackendUnavailable",
    "EpsilonEvaluator",
    "PLDBackend",
    "PRVBackend",
    "RDPBackend",
    "available_backends",
    "get_backend",
    "options_of",
]
