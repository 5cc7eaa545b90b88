"""Certified Lipschitz constants and per-sample gradient bounds (docs/design.md §2)."""

from lipdp.bounds import rules_containers, rules_conv, rules_elementwise, rules_linear  # noqa: F401  (registration)
from lipdp.bounds.analysis import (
    BoundPlan,
    BoundReport,
    ModelValidationError,
    analyze,
    check_model,
    fetch_values,
    lipschitz_constant,
    is_reparametrized,
    sensitivity_keys,
    parameter_sensitivities,
    validate,
)
from lipdp.bounds.context import BoundContext, record_shapes
from lipdp.bounds.registry import BoundRule, LipschitzModule, UnsupportedModuleError, register_bound_rule
from lipdp.bounds.spectral import CertifiedNormCache, ConvGeometry, conv2d_operator_norm, dense_operator_norm

__all__ = [
    "BoundContext", "BoundPlan", "BoundReport", "BoundRule", "CertifiedNormCache", "ConvGeometry", "LipschitzModule",
    "ModelValidationError", "UnsupportedModuleError", "analyze", "check_model", "conv2d_operator_norm",
    "dense_operator_norm", "fetch_values", "lipschitz_constant", "is_reparametrized", "sensitivity_keys", "parameter_sensitivities",
    "record_shapes", "register_bound_rule", "validate",
]
