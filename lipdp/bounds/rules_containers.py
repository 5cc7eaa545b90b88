"""Bound rule for ``nn.Sequential``: the chain rule of ``BoundContext`` applied to its children."""

from __future__ import annotations

from torch import nn

from lipdp.bounds.registry import BoundRule, register_bound_rule


@register_bound_rule(nn.Sequential)
class SequentialRule(BoundRule):
    def lipschitz(self, module: nn.Sequential, ctx) -> float:
        return ctx.chain_lipschitz(list(module))

    def output_bound(self, module: nn.Sequential, x_bound: float, ctx) -> float:
        return ctx.chain_output_bound(list(module), x_bound)

    def param_sensitivities(self, module: nn.Sequential, x_bound: float, grad_bound: float, ctx) -> dict[str, float]:
        return ctx.chain_sensitivities(list(module.named_children()), x_bound, grad_bound)

    def children(self, module: nn.Sequential) -> list[nn.Module]:
        return list(module)
