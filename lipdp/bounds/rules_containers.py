"""Bound rules for containers: ``nn.Sequential`` (the chain rule of ``BoundContext`` applied to its children) and
``torch.compile``'s wrapper (the bounds of the module it compiles)."""

from __future__ import annotations

from torch import nn

from lipdp.bounds.registry import BoundRule, register_bound_rule, register_deferred_bound_rule


@register_bound_rule(nn.Sequential)
class SequentialRule(BoundRule):
    """``nn.Sequential``: the chain rule (``BoundContext.chain_*``) over its children, in order."""

    def lipschitz(self, module: nn.Sequential, ctx) -> float:
        """Lip = prod_d Lip(h_d) over the children."""
        return ctx.chain_lipschitz(list(module))

    def output_bound(self, module: nn.Sequential, x_bound: float, ctx) -> float:
        """X_d = out_d(X_{d-1}) through the children, from X_0 = x_bound."""
        return ctx.chain_output_bound(list(module), x_bound)

    def param_sensitivities(self, module: nn.Sequential, x_bound: float, grad_bound: float, ctx) -> dict[str, float]:
        """Children's sensitivities keyed ``<child>.<param>``: child d gets (X_{d-1}, G_d), G_D = grad_bound,
        G_{d-1} = G_d * Lip(h_d)."""
        return ctx.chain_sensitivities(list(module.named_children()), x_bound, grad_bound)

    def children(self, module: nn.Sequential) -> list[nn.Module]:
        """The children, in order (validated in turn)."""
        return list(module)


@register_deferred_bound_rule("torch._dynamo.eval_frame", "OptimizedModule")
class CompiledModuleRule(BoundRule):
    """``torch.compile(model)``'s wrapper (``OptimizedModule``) computes exactly ``model``, so it has the same
    bounds; its parameters are ``model``'s, named ``_orig_mod.<name>``. Registered once torch's compiler is loaded
    (importing it costs a second; a compiled model has loaded it)."""

    def lipschitz(self, module: nn.Module, ctx) -> float:
        """Lip of the compiled module."""
        return ctx.lipschitz(module._orig_mod)

    def output_bound(self, module: nn.Module, x_bound: float, ctx) -> float:
        """Output bound of the compiled module."""
        return ctx.output_bound(module._orig_mod, x_bound)

    def param_sensitivities(self, module: nn.Module, x_bound: float, grad_bound: float, ctx) -> dict[str, float]:
        """The compiled module's sensitivities, under the wrapper's parameter names."""
        inner = ctx.param_sensitivities(module._orig_mod, x_bound, grad_bound)
        return {f"_orig_mod.{name}": value for name, value in inner.items()}

    def children(self, module: nn.Module) -> list[nn.Module]:
        """The compiled module (validated in turn)."""
        return [module._orig_mod]
