"""Public entry points of the bound analysis: sensitivities, Lipschitz constant, validation."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn.utils import parametrize

from lipdp.bounds.context import BoundContext
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
        width = max([len(name) for name in self.sensitivities] + [9])
        lines = [f"{'parameter':<{width}}  {'size':>8}  {'Delta (per-sample grad norm bound)':>34}"]
        for name, value in self.sensitivities.items():
            lines.append(f"{name:<{width}}  {self.sizes.get(name, 0):>8d}  {value:>34.6g}")
        lines.append(f"model Lipschitz constant <= {self.lipschitz:.6g}; output norm <= {self.output_bound:.6g}")
        return "\n".join(lines)


def analyze(
    model: nn.Module,
    input_norm_bound: float,
    loss_lipschitz: float,
    input_shape: tuple[int, ...] | None = None,
    norm_cache: CertifiedNormCache = DEFAULT_CACHE,
    shapes: dict | None = None,
    weights: dict | None = None,
) -> BoundReport:
    """Bounds of every trainable parameter's per-sample gradient, from the current weights.

    Raises ``ModelValidationError`` for unsupported modules and ``ValueError`` if a trainable parameter gets
    no bound (which would otherwise be released without noise). ``shapes`` (from ``record_shapes``) saves
    the shape-recording forward pass when the caller analyses the same model often; ``weights`` (module ->
    tensor) supplies already materialised weights of reparametrised layers.
    """
    with parametrize.cached():  # materialise each reparametrised weight once per analysis
        return _analyze(model, input_norm_bound, loss_lipschitz, input_shape, norm_cache, shapes, weights)


def _analyze(model, input_norm_bound, loss_lipschitz, input_shape, norm_cache, shapes, weights) -> BoundReport:
    if not input_norm_bound > 0:
        raise ValueError(f"input_norm_bound must be > 0, got {input_norm_bound}")
    if not loss_lipschitz > 0:
        raise ValueError(f"loss_lipschitz must be > 0, got {loss_lipschitz}")
    check_model(model)
    ctx = BoundContext(model, input_shape, norm_cache, shapes, weights)
    raw = ctx.param_sensitivities(model, float(input_norm_bound), float(loss_lipschitz))
    sizes: dict[str, int] = {}
    for key in dict.fromkeys(sensitivity_keys(model).values()):
        owner, _, attribute = key.rpartition(".")
        module = model.get_submodule(owner)
        sizes[key] = (ctx.weight(module) if attribute == "weight" else getattr(module, attribute)).numel()
    missing = sorted(set(sizes) - set(raw))
    if missing:
        raise ValueError(
            f"trainable parameters without a sensitivity bound: {missing}. Their module's rule must bound them "
            "(or freeze them with requires_grad_(False))."
        )
    sensitivities = {name: raw[name] for name in sizes}
    return BoundReport(
        sensitivities=sensitivities,
        lipschitz=ctx.lipschitz(model),
        output_bound=ctx.output_bound(model, float(input_norm_bound)),
        sizes=sizes,
    )


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
