"""Public entry points of the bound analysis: sensitivities, Lipschitz constant, validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from lipdp.bounds.context import BoundContext, ModelChanged
from lipdp.bounds.registry import UnsupportedModuleError
from lipdp.bounds.spectral import DEFAULT_CACHE, CertifiedNormCache

def is_reparametrized(module: nn.Module) -> bool:
    """A dense/conv layer whose ``weight`` is computed from other tensors (torch parametrize or a property,
    as orthogonium's Björck/BCOP/RKO layers do) instead of being a parameter itself."""
    return isinstance(module, (nn.Linear, nn.Conv2d)) and module._parameters.get("weight") is None


def sensitivity_keys(model: nn.Module) -> dict[str, str]:
    """Map each trainable parameter name to the name its sensitivity is reported under.

    Plain parameters keep their name. Every raw tensor that builds a reparametrised weight maps to the
    materialised weight's name (``path.weight``): bounds hold for the gradient of the materialised W only.
    """
    parameters = dict(model.named_parameters())
    keys = {name: name for name in parameters}
    for owner_name, module in model.named_modules():
        if is_reparametrized(module):
            prefix = f"{owner_name}." if owner_name else ""
            for local, _ in module.named_parameters():
                if local != "bias":
                    keys[prefix + local] = f"{prefix}weight"
    return {name: key for name, key in keys.items() if parameters[name].requires_grad}


class ModelValidationError(ValueError):
    """All the reasons a model cannot be trained privately, one per line."""

    def __init__(self, errors: list[Exception]) -> None:
        self.errors = errors
        lines = "\n".join(f"  - {error}" for error in errors)
        super().__init__(f"lipdp cannot bound this model's per-sample gradients:\n{lines}")


def validate(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> list[UnsupportedModuleError]:
    """Every unsupported module of ``model`` (empty list if none), like Opacus' ``ModuleValidator.validate``."""
    ctx = BoundContext(model, None)
    errors: list[UnsupportedModuleError] = []
    pending = [model]
    while pending:
        module = pending.pop(0)
        try:
            rule = ctx.rule(module)
        except UnsupportedModuleError as error:
            errors.append(error)
            continue
        pending.extend(rule.children(module))
    return errors + _tied_parameter_errors(model)


def _tied_parameter_errors(model: nn.Module) -> list[UnsupportedModuleError]:
    """A trainable tensor reachable under several names (a module reused at several places, or tied weights).

    Its per-sample gradient is the sum of one term per use, while the rules bound each use on its own (and
    the report keeps one name): the bound would miss the other uses. Refused rather than summed, since the
    uses may also see inputs of different shapes.
    """
    uses: dict[nn.Parameter, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if parameter.requires_grad:
            uses.setdefault(parameter, []).append(name)
    errors = []
    for names in uses.values():
        if len(names) > 1:
            path = names[1].rpartition(".")[0]
            module = model.get_submodule(path) if path else model
            errors.append(UnsupportedModuleError(
                path, module,
                f"parameter {names[0]} is also used as {', '.join(names[1:])} (a module reused, or tied weights): "
                "one sample's gradient sums over the uses, but each use is bounded on its own.",
                "use a separate module instance (its own parameters) at each place.",
            ))
    return errors


def check_model(model: nn.Module) -> None:
    """Strict validation: raise ``ModelValidationError`` listing every unsupported module."""
    errors = validate(model)
    if errors:
        raise ModelValidationError(errors)


@dataclass(frozen=True)
class BoundReport:
    """Per-parameter sensitivities and the model's certified constants for one set of weights."""

    sensitivities: dict[str, float]
    lipschitz: float
    output_bound: float
    sizes: dict[str, int]

    def to_text(self) -> str:
        """A text table of each parameter's size and Delta, then the model's Lipschitz and output-norm bounds."""
        width = max([len(name) for name in self.sensitivities] + [9])
        lines = [f"{'parameter':<{width}}  {'size':>8}  {'Delta (per-sample grad norm bound)':>34}"]
        for name, value in self.sensitivities.items():
            lines.append(f"{name:<{width}}  {self.sizes.get(name, 0):>8d}  {value:>34.6g}")
        lines.append(f"model Lipschitz constant <= {self.lipschitz:.6g}; output norm <= {self.output_bound:.6g}")
        return "\n".join(lines)


def fetch_values(tensors: Sequence[torch.Tensor]) -> list[float]:
    """The values of 0-dim tensors as floats, with one host transfer per device (not one per tensor)."""
    values: list[float | None] = [None] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_device.setdefault(tensor.device, []).append(index)
    for indices in by_device.values():
        stacked = torch.stack([tensors[i] if tensors[i].dtype == torch.float64 else tensors[i].to(torch.float64)
                               for i in indices]).tolist()
        for i, value in zip(indices, stacked):
            values[i] = value
    return values


class BoundPlan:
    """The bound analysis of one model, resolved once and re-evaluated cheaply (docs/design.md §3, "a plan").

    Built once (at ``make_private``): the model is validated, every module's rule resolved and checked, the
    per-sample shapes recorded, the sensitivity keys and group sizes fixed. ``evaluate`` then only refreshes the
    numbers that depend on the weights: the certified operator norms (``CertifiedNormCache``: Weyl drift
    ||W||_2 <= ||W0||_2 + c ||W - W0||_F between exact computations every K steps) and the bias norms, all
    measured in one batched device computation with one host transfer, then the rules' float arithmetic
    (X_d = out_d(X_{d-1}), G_{d-1} = G_d Lip(h_d), Delta from (X_{d-1}, G_d)).

    Each evaluation re-runs every rule's ``check`` (e.g. a Dropout switched to training mode is refused). If the
    set of trainable parameters changed, or a module the plan has not seen is reached (a layer was swapped), the
    plan is built again from the model (validation and shapes included) before anything is returned.
    """

    def __init__(
        self,
        model: nn.Module,
        input_norm_bound: float,
        loss_lipschitz: float,
        input_shape: tuple[int, ...] | None = None,
        norm_cache: CertifiedNormCache = DEFAULT_CACHE,
        shapes: dict | None = None,
        weights: dict | None = None,
    ) -> None:
        if not input_norm_bound > 0:
            raise ValueError(f"input_norm_bound must be > 0, got {input_norm_bound}")
        if not loss_lipschitz > 0:
            raise ValueError(f"loss_lipschitz must be > 0, got {loss_lipschitz}")
        self.model = model
        self.input_norm_bound = float(input_norm_bound)
        self.loss_lipschitz = float(loss_lipschitz)
        self.input_shape = None if input_shape is None else tuple(input_shape)
        self.norm_cache = norm_cache
        self.first_report = self._compile(shapes, weights)

    def _compile(self, shapes: dict | None, weights: dict | None) -> BoundReport:
        model = self.model
        check_model(model)
        self.context = BoundContext(model, self.input_shape, self.norm_cache, shapes)
        named = dict(model.named_parameters())
        self.keys = sensitivity_keys(model)
        owners = {}
        for name in named:
            owner, _, attribute = name.rpartition(".")
            owners[name] = (model.get_submodule(owner), attribute)
        self._owners = owners
        self._trainable = self._trainable_flags()
        with parametrize.cached():  # materialise each reparametrised weight once per evaluation
            self.context.begin(weights, {}, {})
            self.sizes = {}
            for key in dict.fromkeys(self.keys.values()):
                owner, _, attribute = key.rpartition(".")
                module = model.get_submodule(owner)
                self.sizes[key] = (self.context.weight(module) if attribute == "weight"
                                   else getattr(module, attribute)).numel()
            report = self._report()
        self._checks = self.context.resolved_rules()
        self.context.sealed = True
        return report

    def _trainable_flags(self) -> list[bool]:
        return [module._parameters.get(attribute) is not None and module._parameters[attribute].requires_grad
                for module, attribute in self._owners.values()]

    def plain_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable parameters reported under their own name (not raw tensors of a reparametrised weight)."""
        return {name: self._owners[name][0]._parameters[self._owners[name][1]]
                for name, key in self.keys.items() if key == name}

    def evaluate(self, weights: dict | None = None,
                 norms_of: Sequence[torch.Tensor] = ()) -> tuple[BoundReport, list[float]]:
        """The ``BoundReport`` of the current weights (``weights``: module -> materialised weight), and the L2 norms
        (float64 accumulation) of the tensors ``norms_of``, measured in the same batched call and host transfer as
        the plan's own numbers (the mechanism passes the gradients: a norm is finite iff every entry is, unless
        float64 squares overflow)."""
        if self._trainable_flags() != self._trainable:
            self._compile(None, weights)
        for module, rule, path in self._checks:
            rule.check(module, path)
        context = self.context
        with parametrize.cached():
            context.begin(weights, {}, {})
            requests = list(context.operator_requests)
            pending = self.norm_cache.pending_drifts([(module, key, context.weight(module)) for module, key in requests])
            drifts = {request: drift for request, drift in zip(requests, pending) if drift is not None}
            biases = [(module, name, getattr(module, name)) for module, name in context.parameter_requests]
            measured = [t.detach() for *_, t in biases] + list(norms_of)
            norms = list(torch._foreach_norm(measured, 2, dtype=torch.float64)) if measured else []
            values = fetch_values([d.tensor for d in drifts.values()] + norms)
            for drift, value in zip(drifts.values(), values):
                drift.value = value
            values = values[len(drifts):]
            context.begin(weights, drifts, {(m, n): (t, v) for (m, n, t), v in zip(biases, values)})
            try:
                report = self._report()
            except ModelChanged:  # a layer was swapped in: build the plan again (validation, shapes), evaluate
                self._compile(None, weights)
                return self.evaluate(weights, norms_of)
        return report, values[len(biases):]

    def report(self, weights: dict | None = None) -> BoundReport:
        """``evaluate`` without extra values."""
        return self.evaluate(weights)[0]

    def _report(self) -> BoundReport:
        context, x0 = self.context, self.input_norm_bound
        raw = context.param_sensitivities(self.model, x0, self.loss_lipschitz)
        missing = sorted(set(self.sizes) - set(raw))
        if missing:
            raise ValueError(
                f"trainable parameters without a sensitivity bound: {missing}. Their module's rule must bound them "
                "(or freeze them with requires_grad_(False))."
            )
        return BoundReport(
            sensitivities={name: raw[name] for name in self.sizes},
            lipschitz=context.lipschitz(self.model),
            output_bound=context.output_bound(self.model, x0),
            sizes=dict(self.sizes),
        )


def analyze(
    model: nn.Module,
    input_norm_bound: float,
    loss_lipschitz: float,
    input_shape: tuple[int, ...] | None = None,
    norm_cache: CertifiedNormCache = DEFAULT_CACHE,
    shapes: dict | None = None,
    weights: dict | None = None,
) -> BoundReport:
    """Bounds of every trainable parameter's per-sample gradient, from the current weights (a one-off
    ``BoundPlan``; the engine keeps its plan across steps).

    Raises ``ModelValidationError`` for unsupported modules and ``ValueError`` if a trainable parameter gets
    no bound (which would otherwise be released without noise). ``shapes`` (from ``record_shapes``) saves
    the shape-recording forward pass when the caller analyses the same model often; ``weights`` (module ->
    tensor) supplies already materialised weights of reparametrised layers.
    """
    return BoundPlan(model, input_norm_bound, loss_lipschitz, input_shape, norm_cache, shapes, weights).first_report


def parameter_sensitivities(
    module: nn.Module,
    input_norm_bound: float,
    loss_lipschitz: float,
    input_shape: tuple[int, ...] | None = None,
) -> dict[str, float]:
    """Bound on the L2 norm of ONE sample's loss gradient w.r.t. each trainable parameter.

    Keyed like ``module.named_parameters()``; a reparametrised weight (orthogonium's W = f(raw)) is keyed by
    its materialised name (``path.weight``), and the bound is on the gradient of that materialised weight.
    ``input_shape`` is one sample's shape, needed by rules that depend on spatial sizes (convolutions).
    """
    return analyze(module, input_norm_bound, loss_lipschitz, input_shape).sensitivities


def lipschitz_constant(module: nn.Module, input_shape: tuple[int, ...] | None = None) -> float:
    """Certified upper bound of the model's L2 Lipschitz constant (for robustness certificates)."""
    check_model(module)
    return BoundContext(module, input_shape).lipschitz(module)
