"""Reparametrised weights (orthogonium's W = f(raw), by Björck/BCOP/RKO at every forward), done soundly.

Bounds hold for the gradient of the *materialised* W, not of the raw tensors (f's Jacobian is not bounded by
1). So (docs/design.md §2): once per optimizer step W = f(raw) is computed with its graph and a detached leaf copy
W~ is what the layer's forward uses; backward fills W~.grad (the summed per-sample gradients of W, no
per-sample work). The optimizer noises W~.grad, then carries the *noisy* gradient back through f into the
raw tensors with one vector-Jacobian product: post-processing of the released quantity. Materialising once
per step also saves the orthogonalisation cost of every extra micro-batch.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from lipdp.bounds import is_reparametrized


def _materialized_forward(module: nn.Module, manager: "MaterializedWeights"):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = manager.leaf(self)
        if isinstance(self, nn.Conv2d):
            return self._conv_forward(x, weight, self.bias)
        return F.linear(x, weight, self.bias)

    return types.MethodType(forward, module)


class MaterializedWeights:
    """Owns the materialised weight of every reparametrised dense/conv layer of a model."""

    def __init__(self, model: nn.Module) -> None:
        self.modules: dict[str, nn.Module] = {
            (f"{name}.weight" if name else "weight"): module
            for name, module in model.named_modules()
            if is_reparametrized(module)
        }
        self._graphs: dict[nn.Module, torch.Tensor] = {}
        self._leaves: dict[nn.Module, torch.Tensor] = {}
        self._versions: dict[nn.Module, tuple[int, ...]] = {}
        self._raw: dict[nn.Module, list[torch.Tensor]] = {m: list(m.parameters()) for m in self.modules.values()}
        self._substitutes: dict[nn.Module, torch.Tensor] | None = None
        for module in self.modules.values():
            module.forward = _materialized_forward(module, self)

    def detach_from(self) -> None:
        """Restore the modules' own forward (used when the engine is detached from the model)."""
        for module in self.modules.values():
            if "forward" in module.__dict__:
                del module.forward

    def _raw_versions(self, module: nn.Module) -> tuple[int, ...]:
        """Version counters of the module's raw tensors (listed once: walking the parametrisation each call
        costs more than the rest of ``leaf``)."""
        return tuple(p._version for p in self._raw[module])

    def leaf(self, module: nn.Module) -> torch.Tensor:
        """The weight this step's forwards use; materialised (with its graph when grad is on) once per step,
        and again whenever a raw tensor changed in place (optimizer step, checkpoint load, weight copy). Inside
        ``substituted`` the given tensor instead."""
        if self._substitutes is not None:
            return self._substitutes[module]
        leaf = self._leaves.get(module)
        stale = self._versions.get(module) != self._raw_versions(module)
        needs_graph = torch.is_grad_enabled() and module not in self._graphs
        if leaf is None or stale or needs_graph:
            self._graphs.pop(module, None)
            weight = module.weight
            if weight.requires_grad:
                self._graphs[module] = weight
            leaf = weight.detach().requires_grad_(torch.is_grad_enabled())
            self._leaves[module] = leaf
            self._versions[module] = self._raw_versions(module)
        return leaf

    @contextlib.contextmanager
    def substituted(self, weights: dict[nn.Module, torch.Tensor]) -> Iterator[None]:
        """Forwards inside this block use ``weights`` (module -> tensor) as the materialised weights: the per-sample
        replay of ``lipdp.clipping`` differentiates with respect to them (torch.func)."""
        previous, self._substitutes = self._substitutes, weights
        try:
            yield
        finally:
            self._substitutes = previous

    def gradients(self) -> dict[str, torch.Tensor | None]:
        """Summed gradient of each materialised weight since the last ``invalidate`` (None if unused)."""
        return {key: getattr(self._leaves.get(module), "grad", None) for key, module in self.modules.items()}

    def backpropagate(self, noisy_gradients: dict[str, torch.Tensor]) -> None:
        """raw.grad = J_f(raw)^T g for each layer's noisy gradient g (materialising W if no forward ran)."""
        graphs, grads = [], []
        for key, gradient in noisy_gradients.items():
            module = self.modules[key]
            graph = self._graphs.get(module)
            if graph is None:
                with torch.enable_grad():
                    graph = module.weight
            for parameter in self._raw[module]:
                if parameter is not module.bias:
                    parameter.grad = None
            graphs.append(graph)
            grads.append(gradient.to(graph.dtype))
        if graphs:
            torch.autograd.backward(graphs, grads)

    def zero_grad(self) -> None:
        """Clear the gradient of every materialised weight (set to None)."""
        for leaf in self._leaves.values():
            leaf.grad = None

    def invalidate(self) -> None:
        """Weights changed (optimizer step or checkpoint load): re-materialise at the next forward."""
        self._graphs.clear()
        self._leaves.clear()
        self._versions.clear()
