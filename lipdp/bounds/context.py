"""Bound analysis of a whole model: forward pass of norm bounds, backward pass of gradient bounds.

For a chain h_1..h_D with input bound X_0 and a loss that is L-Lipschitz in the logits (DESIGN.md §2):
X_d = out_d(X_{d-1}); G_D = L; G_{d-1} = G_d * Lip(h_d); parameters of h_d get bounds from (X_{d-1}, G_d).
Containers (``nn.Sequential``, lipdp's residual block) apply this recursively through the context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from lipdp.bounds.registry import (
    PROTOCOL_ADAPTER,
    BoundRule,
    LipschitzModule,
    UnsupportedModuleError,
    find_rule,
    refusal_for,
)
from lipdp.bounds.spectral import DEFAULT_CACHE, CertifiedNormCache


def record_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> dict[nn.Module, tuple | None]:
    """Per-sample input and output shapes of every submodule, from one forward pass on a zero sample.

    A module called several times on different shapes (one instance reused at two places) is recorded as
    ``None``: rules whose bound depends on the shape then refuse it instead of using one of the shapes.
    Every submodule's train/eval flag is restored as it was (``model.train(flag)`` would reset all of them to
    the root's flag and could, e.g., switch a Dropout the user had put in eval mode back to training mode
    after it passed validation).
    """
    shapes: dict[nn.Module, tuple | None] = {}

    def hook(module, args, output):
        if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
            record = (tuple(args[0].shape[1:]), tuple(output.shape[1:]))
            shapes[module] = record if shapes.get(module, record) == record else None

    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        parameter = next(model.parameters(), None)
        dtype = parameter.dtype if parameter is not None else torch.float32
        device = parameter.device if parameter is not None else "cpu"
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), dtype=dtype, device=device))
    finally:
        for module, training in modes:
            module.training = training
        for handle in handles:
            handle.remove()
    return shapes


@dataclass
class BoundContext:
    """What rules may ask while bounding one model: shapes, paths, cached Lipschitz constants."""

    model: nn.Module
    input_shape: tuple[int, ...] | None = None
    norm_cache: CertifiedNormCache = DEFAULT_CACHE
    shapes: dict | None = None  # from record_shapes(); recorded here when None and input_shape is given
    weights: dict | None = None  # module -> materialised weight to use instead of module.weight
    _shapes: dict = field(default_factory=dict)
    _paths: dict = field(default_factory=dict)
    _lipschitz: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._paths = {module: path for path, module in self.model.named_modules()}
        if self.shapes is not None:
            self._shapes = self.shapes
        elif self.input_shape is not None:
            self._shapes = record_shapes(self.model, tuple(self.input_shape))

    def path(self, module: nn.Module) -> str:
        return self._paths.get(module, "") or "<model>"

    def input_shape_of(self, module: nn.Module) -> tuple[int, ...]:
        """Per-sample input shape of ``module``; a clear error when the analysis was given none."""
        if module not in self._shapes:
            raise ValueError(
                f"{self.path(module)} ({type(module).__name__}) needs the input's shape for its bound: "
                "pass input_shape (one sample's shape, e.g. (C, H, W))."
            )
        if self._shapes[module] is None:
            raise ValueError(
                f"{self.path(module)} ({type(module).__name__}) is called on inputs of different shapes and its "
                "bound depends on the shape. Fix: use a separate instance at each place."
            )
        return self._shapes[module][0]

    def output_shape_of(self, module: nn.Module) -> tuple[int, ...]:
        self.input_shape_of(module)
        return self._shapes[module][1]

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The module's (materialised) weight: the caller's copy when given, else ``module.weight``."""
        if self.weights is not None and module in self.weights:
            return self.weights[module]
        return module.weight

    def rule(self, module: nn.Module) -> BoundRule:
        """The bound rule of ``module``; raises ``UnsupportedModuleError`` naming its path and the fix."""
        path = self.path(module)
        if isinstance(module, LipschitzModule):
            rule = PROTOCOL_ADAPTER
        else:
            rule = find_rule(module)
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

    def lipschitz(self, module: nn.Module) -> float:
        if module not in self._lipschitz:
            self._lipschitz[module] = float(self.rule(module).lipschitz(module, self))
        return self._lipschitz[module]

    def output_bound(self, module: nn.Module, x_bound: float) -> float:
        return float(self.rule(module).output_bound(module, x_bound, self))

    def param_sensitivities(self, module: nn.Module, x_bound: float, grad_bound: float) -> dict[str, float]:
        return self.rule(module).param_sensitivities(module, x_bound, grad_bound, self)

    # --- chains -------------------------------------------------------------------------------
    def chain_output_bound(self, modules: list[nn.Module], x_bound: float) -> float:
        for module in modules:
            x_bound = self.output_bound(module, x_bound)
        return x_bound

    def chain_lipschitz(self, modules: list[nn.Module]) -> float:
        return math.prod(self.lipschitz(module) for module in modules)

    def chain_sensitivities(
        self, named: list[tuple[str, nn.Module]], x_bound: float, grad_bound: float
    ) -> dict[str, float]:
        """Sensitivities of a chain of (name, module), keyed ``name.param``."""
        inputs = []
        for _, module in named:
            inputs.append(x_bound)
            x_bound = self.output_bound(module, x_bound)
        result: dict[str, float] = {}
        for (name, module), x_in in reversed(list(zip(named, inputs))):
            for key, value in self.param_sensitivities(module, x_in, grad_bound).items():
                result[f"{name}.{key}"] = value
            grad_bound = grad_bound * self.lipschitz(module)
        return result
