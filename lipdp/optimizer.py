"""The optimizer wrapper: noise in ``step()``, then the user's optimizer runs unchanged (SGD, Adam, ...)."""

from __future__ import annotations

import torch

from lipdp.mechanism import GradientMechanism


class DPOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer``; ``step()`` releases the noisy gradient (one accountant step) then steps.

    ``skip_next_step`` lets gradient accumulation over physical micro-batches take one noisy step per
    logical batch (see ``LipDPEngine.virtual_batches``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, mechanism: GradientMechanism) -> None:
        self.original_optimizer = optimizer
        self.mechanism = mechanism
        self.skip_next_step = False
        self._accumulating = False  # a step was skipped: the logical batch is not finished

    # Delegate the optimizer interface to the wrapped optimizer.
    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    @property
    def state(self):
        return self.original_optimizer.state

    @property
    def defaults(self):
        return self.original_optimizer.defaults

    def state_dict(self):
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group) -> None:
        self.original_optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"DPOptimizer({self.original_optimizer!r})"

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._accumulating:
            return  # micro-batches of one logical batch accumulate until its (real) step
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        self.mechanism.materialized.zero_grad()

    def step(self, closure=None):
        if closure is not None:
            raise ValueError("DPOptimizer.step does not take a closure: compute the loss and call backward() first")
        if self.skip_next_step:
            self._accumulating = True
            return None
        self.mechanism.release()
        self._accumulating = False
        result = self.original_optimizer.step()
        self.mechanism.materialized.invalidate()
        return result
