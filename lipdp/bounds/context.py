"""Bound analysis of a whole model: forward pass of norm bounds, backward pass of gradient bounds.

For a chain h_1..h_D with input bound X_0 and a loss that is L-Lipschitz in the logits (docs/design.md §2):
X_d = out_d(X_{d-1}); G_D = L; G_{d-1} = G_d * Lip(h_d); parameters of h_d get bounds from (X_{d-1}, G_d).
Containers (``nn.Sequential``, lipdp's residual block) apply this recursively through the context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from lipdp.bounds.registry import BoundRule, resolve_rule
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


class ModelChanged(Exception):
    """A sealed context (``BoundPlan``'s) met a module it never resolved: the model changed after the plan."""


@dataclass
class BoundContext:
    """What rules may ask while bounding one model: shapes, paths, weights, certified norms.

    A context lives as long as its ``BoundPlan`` (the engine keeps one per model): each module's rule is
    resolved once (``rule``), Lipschitz constants and output bounds are memoised within one evaluation (``begin``
    starts the next one), and the tensor norms rules ask for (``operator_norm``, ``parameter_norm``) are recorded so that the
    plan can measure all of them for the next evaluation in one batched device computation (``measured``).
    """

    model: nn.Module
    input_shape: tuple[int, ...] | None = None
    norm_cache: CertifiedNormCache = DEFAULT_CACHE
    shapes: dict | None = None  # from record_shapes(); recorded here when None and input_shape is given
    weights: dict | None = None  # module -> materialised weight to use instead of module.weight
    _shapes: dict = field(default_factory=dict)
    _paths: dict = field(default_factory=dict)
    _lipschitz: dict = field(default_factory=dict)
    _rules: dict = field(default_factory=dict)
    sealed: bool = False  # set by BoundPlan once compiled: an unseen module raises ModelChanged
    _outputs: dict = field(default_factory=dict)  # (module, x_bound) -> output bound, within one evaluation
    _drifts: dict = field(default_factory=dict)  # (module, key) -> PendingDrift of this evaluation
    _norms: dict = field(default_factory=dict)  # (module, name) -> (tensor, float) of this evaluation
    operator_requests: dict = field(default_factory=dict)  # (module, key) -> None, in first-use order
    parameter_requests: dict = field(default_factory=dict)  # (module, name) -> None

    def __post_init__(self) -> None:
        self._paths = {module: path for path, module in self.model.named_modules()}
        if self.shapes is not None:
            self._shapes = self.shapes
        elif self.input_shape is not None:
            self._shapes = record_shapes(self.model, tuple(self.input_shape))

    def begin(self, weights: dict | None, drifts: dict, norms: dict) -> None:
        """Start one evaluation at new weights, with the norms measured for it (possibly none)."""
        self.weights = weights
        self._lipschitz = {}
        self._outputs = {}
        self._drifts = drifts
        self._norms = norms

    def path(self, module: nn.Module) -> str:
        """The module's dotted path in the model (``"<model>"`` for the root or an unknown module)."""
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
        """Per-sample output shape of ``module``; the same errors as ``input_shape_of``."""
        self.input_shape_of(module)
        return self._shapes[module][1]

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The module's (materialised) weight: the caller's copy when given, else ``module.weight``."""
        if self.weights is not None and module in self.weights:
            return self.weights[module]
        return module.weight

    def operator_norm(self, module: nn.Module, key: object, exact, frobenius_factor: float) -> float:
        """Certified ``||op(W)||`` of the module's current weight W (``CertifiedNormCache.bound``: exact(W0) +
        c ||W - W0||_F, Weyl), with the drift measured in this evaluation's batch when there is one."""
        self.operator_requests.setdefault((module, key))
        return self.norm_cache.bound(module, key, self.weight(module), exact, frobenius_factor,
                                     drift=self._drifts.get((module, key)), path=self._paths.get(module, ""))

    def parameter_norm(self, module: nn.Module, name: str) -> float:
        """``||module.<name>||_2`` in float64 (e.g. a bias), from this evaluation's batch when measured there."""
        self.parameter_requests.setdefault((module, name))
        tensor = getattr(module, name)
        measured = self._norms.get((module, name))
        if measured is not None and measured[0] is tensor:
            return measured[1]
        return tensor.detach().to(torch.float64).norm().item()

    def rule(self, module: nn.Module) -> BoundRule:
        """The bound rule of ``module``, resolved (and its configuration checked) once per context; raises
        ``UnsupportedModuleError`` naming its path and the fix."""
        rule = self._rules.get(module)
        if rule is None:
            if self.sealed:
                raise ModelChanged(f"{type(module).__name__} was not in the model when its bound plan was built")
            rule = resolve_rule(module, self.path(module))
            self._rules[module] = rule
        return rule

    def resolved_rules(self) -> list[tuple[nn.Module, BoundRule, str]]:
        """(module, rule, path) of every module resolved so far (the plan re-checks them at each evaluation)."""
        return [(module, rule, self.path(module)) for module, rule in self._rules.items()]

    def lipschitz(self, module: nn.Module) -> float:
        """Certified Lip(module), memoised within one evaluation."""
        if module not in self._lipschitz:
            self._lipschitz[module] = float(self.rule(module).lipschitz(module, self))
        return self._lipschitz[module]

    def output_bound(self, module: nn.Module, x_bound: float) -> float:
        """Bound on ||module(a)|| for ||a|| <= x_bound, memoised within one evaluation."""
        key = (module, x_bound)
        if key not in self._outputs:
            self._outputs[key] = float(self.rule(module).output_bound(module, x_bound, self))
        return self._outputs[key]

    def param_sensitivities(self, module: nn.Module, x_bound: float, grad_bound: float) -> dict[str, float]:
        """The module rule's per-parameter gradient bounds (names relative to it), from input bound x_bound and
        output-gradient bound grad_bound."""
        return self.rule(module).param_sensitivities(module, x_bound, grad_bound, self)

    # --- chains -------------------------------------------------------------------------------
    def chain_output_bound(self, modules: list[nn.Module], x_bound: float) -> float:
        """Output bound of a chain: X_d = out_d(X_{d-1}) applied in order, starting from X_0 = x_bound."""
        for module in modules:
            x_bound = self.output_bound(module, x_bound)
        return x_bound

    def chain_lipschitz(self, modules: list[nn.Module]) -> float:
        """Lip of a chain: prod_d Lip(h_d)."""
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
