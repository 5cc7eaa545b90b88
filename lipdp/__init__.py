"""lipdp: differentially private deep learning without per-sample gradient clipping."""

from lipdp.bounds import (
    BoundReport,
    ModelValidationError,
    UnsupportedModuleError,
    analyze,
    check_model,
    lipschitz_constant,
    parameter_sensitivities,
    register_bound_rule,
    validate,
)
from lipdp.engine import LipDPEngine, PrivacyBudgetExceeded

__all__ = [
    "BoundReport", "LipDPEngine", "ModelValidationError", "PrivacyBudgetExceeded", "UnsupportedModuleError",
    "analyze", "check_model", "lipschitz_constant", "parameter_sensitivities", "register_bound_rule", "validate",
]
