"""Weight averaging: an exponential moving average of the iterates (post-processing of released models: free).

a <- d a + (1 - d) theta after every private step (De et al. 2022 use it for DP-SGD). The averages are tensors
keyed by parameter name, never a copy of the module: a module made private carries the engine's hooks, and an
evaluation or an attack must run on an ordinary module.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class WeightAverage:
    """The EMA of ``model``'s parameters with ``decay`` d in [0, 1) (d = 0: the last iterate).

    ``update()`` after each step; ``with average.applied():`` swaps the averages into ``model`` (to evaluate it) and
    restores its weights after; ``copy_into(other)`` writes the averages into ``model`` or into any module with the
    same parameter names (e.g. a hook-free copy for attacks and certificates).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"weight averaging decay must be in [0, 1), got {decay}. Fix: give a decay such as 0.9 "
                             "(--weight-averaging), or none to release the last iterate")
        self.model, self.decay = model, float(decay)
        self.average = {name: p.detach().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self) -> None:
        """a <- d a + (1 - d) theta for every parameter."""
        for name, parameter in self.model.named_parameters():
            self.average[name].lerp_(parameter.detach(), 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[nn.Module]:
        """The model with the averaged weights inside the block, its own weights restored after."""
        current = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        self.copy_into(self.model)
        try:
            yield self.model
        finally:
            self._copy(current, self.model)

    def copy_into(self, module: nn.Module | None = None) -> nn.Module:
        """Write the averaged weights into ``module`` (default: the averaged model itself); returns it."""
        return self._copy(self.average, self.model if module is None else module)

    @staticmethod
    @torch.no_grad()
    def _copy(values: dict[str, torch.Tensor], module: nn.Module) -> nn.Module:
        for name, parameter in module.named_parameters():
            parameter.copy_(values[name])
        return module
