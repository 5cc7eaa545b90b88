"""The bound protocol and the registry that gives foreign modules (torch, orthogonium) the same rules.

Every supported module answers three questions from its *current* weights (docs/design.md §2):

* ``lipschitz(module, ctx)``: a certified upper bound of its Lipschitz constant (the real operator);
* ``output_bound(module, x_bound, ctx)``: a bound on ``||h(a)||`` for any ``||a|| <= x_bound``;
* ``param_sensitivities(module, x_bound, grad_bound, ctx)``: for each of its parameters (names relative
  to the module, as in ``named_parameters()``; a reparametrised weight under its materialised name), a bound
  on the norm of one sample's gradient, given the input-norm bound and the bound ``grad_bound`` on the
  gradient arriving at its output.

lipdp's own layers implement these as methods ``lipschitz(ctx)``, ``output_bound(x_bound, ctx)`` and
``param_sensitivities(x_bound, grad_bound, ctx)``. Foreign module types get a ``BoundRule`` registered with
``@register_bound_rule(Type, ...)`` (as Opacus registers grad samplers); the rules live one file per layer
family (``rules_linear.py``, ``rules_conv.py``, ...).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Callable, Protocol, runtime_checkable

from torch import nn

if TYPE_CHECKING:
    from lipdp.bounds.context import BoundContext


class UnsupportedModuleError(ValueError):
    """A module lipdp cannot bound; the message names its path in the model and the fix."""

    def __init__(self, path: str, module: nn.Module, reason: str, fix: str) -> None:
        self.path = path or "<model>"
        self.module_type = type(module).__name__
        self.reason = reason
        self.fix = fix
        super().__init__(f"{self.path} ({self.module_type}): {reason} Fix: {fix}")


@runtime_checkable
class LipschitzModule(Protocol):
    """What lipdp's own layers implement (foreign modules get the same through a ``BoundRule``)."""

    def lipschitz(self, ctx: "BoundContext") -> float:
        """A certified upper bound of the layer's Lipschitz constant (the real operator, current weights)."""

    def output_bound(self, x_bound: float, ctx: "BoundContext") -> float:
        """A bound on ||h(a)|| for any ||a|| <= x_bound."""

    def param_sensitivities(self, x_bound: float, grad_bound: float, ctx: "BoundContext") -> dict[str, float]:
        """Per parameter (name relative to the layer), a bound on one sample's gradient norm, given the input
        bound x_bound and the output-gradient bound grad_bound."""


class BoundRule:
    """Bound rule for a foreign module type. Default: a parameter-free, 1-Lipschitz, non-expansive map."""

    def check(self, module: nn.Module, path: str) -> None:
        """Raise ``UnsupportedModuleError`` if this instance's configuration is not supported."""

    def lipschitz(self, module: nn.Module, ctx: "BoundContext") -> float:
        """Certified Lip(module); default 1."""
        return 1.0

    def output_bound(self, module: nn.Module, x_bound: float, ctx: "BoundContext") -> float:
        """Bound on ||h(a)|| for ||a|| <= x_bound; default Lip(module) * x_bound."""
        return ctx.lipschitz(module) * x_bound

    def param_sensitivities(
        self, module: nn.Module, x_bound: float, grad_bound: float, ctx: "BoundContext"
    ) -> dict[str, float]:
        """Per-parameter bounds on one sample's gradient norm (names relative to the module);
        default none (no parameters)."""
        return {}

    def children(self, module: nn.Module) -> list[nn.Module]:
        """Submodules this rule delegates to (validated in turn); none for a leaf layer."""
        return []


_RULES: dict[type, BoundRule] = {}


def register_bound_rule(*module_types: type) -> Callable[[type[BoundRule]], type[BoundRule]]:
    """Class decorator: ``@register_bound_rule(nn.Linear)`` on a ``BoundRule`` subclass."""

    def decorate(rule_class: type[BoundRule]) -> type[BoundRule]:
        for module_type in module_types:
            _RULES[module_type] = rule_class()
        return rule_class

    return decorate


_DEFERRED: list[tuple[str, str, type[BoundRule]]] = []


def register_deferred_bound_rule(module_name: str, type_name: str) -> Callable[[type[BoundRule]], type[BoundRule]]:
    """Class decorator: the rule for ``module_name.type_name``, registered as soon as that module is imported
    (by anyone), without importing it here."""

    def decorate(rule_class: type[BoundRule]) -> type[BoundRule]:
        _DEFERRED.append((module_name, type_name, rule_class))
        return rule_class

    return decorate


def _register_deferred() -> None:
    for entry in list(_DEFERRED):
        loaded = sys.modules.get(entry[0])
        if loaded is not None and hasattr(loaded, entry[1]):
            register_bound_rule(getattr(loaded, entry[1]))(entry[2])
            _DEFERRED.remove(entry)


# Methods that define what a module computes. A rule registered for a class describes that class's
# computation; a subclass that redefines one of them (e.g. an ``nn.Sequential`` subclass whose forward adds a
# skip connection, whose Lipschitz constant is 1 + Lip(f), not Lip(f)) computes something else.
_BEHAVIOUR_METHODS = ("forward", "_conv_forward")


def _registered_base(module: nn.Module) -> type | None:
    for cls in type(module).__mro__:
        if cls in _RULES:
            return cls
    return None


def _overridden_method(module: nn.Module, base: type) -> str | None:
    """A behaviour method that ``type(module)`` redefines below the registered class ``base``, if any."""
    for name in _BEHAVIOUR_METHODS:
        owner = next((cls for cls in type(module).__mro__ if name in vars(cls)), None)
        if owner is not None and owner is not base and issubclass(owner, base):
            return name
    return None


def find_rule(module: nn.Module) -> BoundRule | None:
    """The rule registered for the module's type, or for its nearest registered base class.

    A subclass inherits its base's rule only if it keeps the base's computation (does not redefine
    ``forward``/``_conv_forward``); orthogonium's layers only change how ``weight`` is built, so they do.
    """
    if _DEFERRED:
        _register_deferred()
    base = _registered_base(module)
    if base is None or _overridden_method(module, base) is not None:
        return None
    return _RULES[base]


class _ProtocolAdapter(BoundRule):
    """Presents a lipdp layer's own methods as a ``BoundRule``."""

    def check(self, module: nn.Module, path: str) -> None:
        check = getattr(module, "check_supported", None)
        if check is not None:
            check(path)

    def lipschitz(self, module, ctx):
        return module.lipschitz(ctx)

    def output_bound(self, module, x_bound, ctx):
        return module.output_bound(x_bound, ctx)

    def param_sensitivities(self, module, x_bound, grad_bound, ctx):
        return module.param_sensitivities(x_bound, grad_bound, ctx)

    def children(self, module):
        children = getattr(module, "bound_children", None)
        return list(children()) if children is not None else []


PROTOCOL_ADAPTER = _ProtocolAdapter()

_PROTOCOL_TYPES: dict[type, bool] = {}


def _implements_protocol(module: nn.Module) -> bool:
    """``isinstance(module, LipschitzModule)``, memoised per class when the methods come from the class (a runtime
    ``Protocol`` check costs tens of microseconds; instance attributes are checked each time)."""
    cls = type(module)
    if cls not in _PROTOCOL_TYPES:
        _PROTOCOL_TYPES[cls] = all(callable(getattr(cls, name, None))
                                   for name in ("lipschitz", "output_bound", "param_sensitivities"))
    return _PROTOCOL_TYPES[cls] or isinstance(module, LipschitzModule)


def resolve_rule(module: nn.Module, path: str) -> BoundRule:
    """The rule of ``module`` (its own protocol methods, else the registry's rule for its type), after checking
    the instance's configuration; ``UnsupportedModuleError`` naming ``path`` and the fix otherwise."""
    rule = PROTOCOL_ADAPTER if _implements_protocol(module) else find_rule(module)
    if rule is None:
        refusal = refusal_for(module)
        if refusal is None:
            refusal = (
                "lipdp does not know this module type, so it cannot bound its gradients.",
                "use lipdp/orthogonium layers, implement lipschitz/output_bound/param_sensitivities on the "
                "module, or register a rule with @lipdp.register_bound_rule(YourModule).",
            )
        raise UnsupportedModuleError(path, module, *refusal)
    rule.check(module, path)
    return rule


# Modules refused on purpose, with the fix a user can act on.
KNOWN_UNSUPPORTED: dict[tuple[type, ...], tuple[str, str]] = {
    (nn.modules.batchnorm._BatchNorm,): (
        "batch normalisation mixes the samples of a batch, so one sample's gradient is not bounded.",
        "remove it (orthogonal layers keep activations well scaled); normalise each input sample instead.",
    ),
    (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm): (
        "normalisation layers divide by a data-dependent norm and are not Lipschitz.",
        "remove it; use orthogonal layers (orthogonium) and lipdp.layers.InputNormClip at the input.",
    ),
    (
        nn.Softplus, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Softmax,
        nn.LogSoftmax, nn.Hardswish, nn.Hardsigmoid, nn.Softsign, nn.PReLU, nn.RReLU, nn.Threshold,
    ): (
        "this activation has no bound rule in lipdp (not Lipschitz with a known constant, or it does not map 0 to 0).",
        "use orthogonium.layers.MaxMin or lipdp.layers.GroupSort (gradient-norm preserving), or nn.ReLU.",
    ),
    (nn.Embedding, nn.EmbeddingBag, nn.RNNBase, nn.MultiheadAttention, nn.Transformer): (
        "lipdp has no sensitivity bound for this layer type.",
        "use a Lipschitz architecture (orthogonal dense/conv layers, MaxMin, L2 pooling).",
    ),
}


def refusal_for(module: nn.Module) -> tuple[str, str] | None:
    """(reason, fix) for a module refused on purpose (it redefines forward/_conv_forward below a registered base, or
    is a ``KNOWN_UNSUPPORTED`` type), else None."""
    base = _registered_base(module)
    if base is not None:
        method = _overridden_method(module, base)
        if method is not None:
            return (
                f"it subclasses {base.__name__} but redefines {method}, so {base.__name__}'s bound rule does not "
                "describe what it computes.",
                "implement lipschitz/output_bound/param_sensitivities on the class (derive them), or register a "
                "rule for it with @lipdp.register_bound_rule(YourModule).",
            )
    for types, reason_fix in KNOWN_UNSUPPORTED.items():
        if isinstance(module, types):
            return reason_fix
    return None
