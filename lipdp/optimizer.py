"""The optimizer wrapper: noise in ``step()``, then the user's optimizer runs unchanged (SGD, Adam, ...)."""

from __future__ import annotations

import torch

from lipdp.hooks import PassCounter
from lipdp.mechanism import GradientMechanism

#: Key of the mechanism's bound state in ``DPOptimizer.state_dict()``.
BOUNDS_KEY = "lipdp_bound_cache"


class DPOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer``; ``step()`` releases the noisy gradient (one accountant step) then steps.

    ``skip_next_step`` lets gradient accumulation over physical micro-batches take one noisy step per
    logical batch (see ``LipDPEngine.virtual_batches``). ``passes`` counts the backward passes through the model's
    output since the last step (``lipdp.hooks``): a step that saw more than it accounts for is refused before
    anything is released (``RepeatedPassError``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, mechanism: GradientMechanism,
                 passes: PassCounter | None = None) -> None:
        self.original_optimizer = optimizer
        self.mechanism = mechanism
        self.passes = passes if passes is not None else PassCounter()
        self.skip_next_step = False
        self._accumulating = False  # a step was skipped: the logical batch is not finished

    # Delegate the optimizer interface to the wrapped optimizer.
    @property
    def param_groups(self):
        """The wrapped optimizer's ``param_groups``."""
        return self.original_optimizer.param_groups

    @property
    def state(self):
        """The wrapped optimizer's ``state``."""
        return self.original_optimizer.state

    @property
    def defaults(self):
        """The wrapped optimizer's ``defaults``."""
        return self.original_optimizer.defaults

    def state_dict(self) -> dict:
        """The wrapped optimizer's state, plus (key ``BOUNDS_KEY``) the mechanism's certified-norm references, so
        that a resumed run takes the same refresh decisions (and the same noise stds) as an uninterrupted one."""
        state = self.original_optimizer.state_dict()
        state[BOUNDS_KEY] = self.mechanism.norm_cache.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Inverse of ``state_dict``; a plain optimizer's state (no ``BOUNDS_KEY``) loads too."""
        state_dict = dict(state_dict)
        bounds = state_dict.pop(BOUNDS_KEY, None)
        self.original_optimizer.load_state_dict(state_dict)
        if bounds is not None:
            self.mechanism.norm_cache.load_state_dict(bounds)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group of the model's own parameters (any other tensor would be stepped with an un-noised
        gradient: refused)."""
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        known = {id(p) for p in self.mechanism.model.parameters()}
        if any(id(p) not in known for p in params):
            raise ValueError("add_param_group: every parameter must be one of the private model's parameters")
        self.original_optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"DPOptimizer({self.original_optimizer!r})"

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients and start a new step (a no-op between micro-batches of one logical batch)."""
        if self._accumulating:
            return  # micro-batches of one logical batch accumulate until its (real) step
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        self.mechanism.zero_grad()
        self.passes.reset()

    def step(self, closure=None):
        """Release the noisy gradient (one accountant step), then step the wrapped optimizer; refused, releasing
        nothing, if the gradients passed through the output more often than accounted for."""
        if closure is not None:
            raise ValueError("DPOptimizer.step does not take a closure: compute the loss and call backward() first")
        if self.skip_next_step:
            self._accumulating = True
            return None
        self.passes.check()
        self.mechanism.release()
        self.passes.reset()
        self._accumulating = False
        result = self.original_optimizer.step()
        self.mechanism.materialized.invalidate()
        return result
