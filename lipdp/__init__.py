"""lipdp: differentially private deep learning without per-sample gradient clipping.

The names below are imported on first use (PEP 562), so that ``import lipdp.cli`` (``lipdp --help``,
``lipdp budget``) starts without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BoundReport": "lipdp.bounds", "ModelValidationError": "lipdp.bounds", "UnsupportedModuleError": "lipdp.bounds",
    "analyze": "lipdp.bounds", "check_model": "lipdp.bounds", "lipschitz_constant": "lipdp.bounds",
    "parameter_sensitivities": "lipdp.bounds", "register_bound_rule": "lipdp.bounds", "validate": "lipdp.bounds",
    "LipDPEngine": "lipdp.engine", "PrivacyBudgetExceeded": "lipdp.mechanism",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import ``lipdp.NAME`` from its module on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lipdp' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
