"""Hooks at the model's boundary: input checks on the way in, per-sample output-gradient fixes on the way out.

* ``InputGuard`` (forward pre-hook): refuses NaN/inf inputs, inputs of the wrong per-sample shape, and
  samples whose L2 norm exceeds the declared bound X_0 (unless the model's first layer enforces it).
* ``OutputGradientHook`` (forward hook -> tensor hook on the output, O(batch x classes)): with a "mean"
  loss, multiplies the gradient at the output by the batch size, turning (1/n) sum_i into sum_i so that no
  data-dependent division reaches the parameters; then, with ``loss_grad_clip=C``, clips each sample's
  gradient at the output to norm C (Bethune et al. 2023), which makes G_D = min(C, L) hold for any loss.
"""

from __future__ import annotations

import torch
from torch import nn

from lipdp.layers import InputNormClip

NORM_TOLERANCE = 1e-5


_RESHAPES = (nn.Flatten, nn.Unflatten, nn.Identity)


def _leading_input_clip(model: nn.Module) -> InputNormClip | None:
    """The ``InputNormClip`` every input passes first (after reshapes only), if the model starts with one."""
    module = model
    while isinstance(module, nn.Sequential):
        children = [child for child in module if not isinstance(child, _RESHAPES)]
        module = children[0] if children else None
    return module if isinstance(module, InputNormClip) else None


class InputGuard:
    """Forward pre-hook that checks every training input at the boundary."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], input_norm_bound: float) -> None:
        self.input_shape = tuple(input_shape)
        self.input_norm_bound = input_norm_bound
        clip = _leading_input_clip(model)
        # Sound only if the clip is at most the declared bound: the analysis assumes ||x|| <= input_norm_bound.
        self.model_clips_inputs = clip is not None and clip.output_bound(float("inf")) <= input_norm_bound
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if not args or not isinstance(args[0], torch.Tensor):
            raise TypeError("lipdp models take one input tensor of shape (batch, *input_shape)")
        x = args[0]
        if not x.is_floating_point():
            raise TypeError(
                f"input dtype {x.dtype} is not floating point: the norm bound is defined on real inputs. "
                "Fix: convert the data with .float() (or the model's dtype)."
            )
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not match the per-sample shape {self.input_shape} the bounds "
                "were computed for. Fix: reshape the data, or make the model private again with input_shape=..."
            )
        # One reduction instead of a mask: a sum is finite only if every term is (an overflowing sum of finite
        # values falls through to the exact check).
        if not torch.isfinite(x.detach().sum()) and not torch.isfinite(x).all():
            raise ValueError("input contains NaN or inf values. Fix: clean or impute the data before training.")
        if not self.model_clips_inputs and x.shape[0] > 0:
            largest = x.detach().flatten(1).norm(dim=1).max().item()
            if largest > self.input_norm_bound * (1 + NORM_TOLERANCE):
                raise ValueError(
                    f"a sample has L2 norm {largest:.4g} > input_norm_bound={self.input_norm_bound}: the privacy "
                    "bound would not hold. Fix: start the model with lipdp.layers.InputNormClip("
                    f"{self.input_norm_bound}) or rescale each sample to norm <= {self.input_norm_bound}."
                )


class OutputGradientHook:
    """Forward hook that fixes each sample's loss gradient at the model output (see module docstring)."""

    def __init__(self, model: nn.Module, loss_reduction: str, clip: float | None) -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if clip is not None and not clip > 0:
            raise ValueError(f"loss_grad_clip must be > 0 (or None), got {clip}")
        self.loss_reduction = loss_reduction
        self.clip = clip
        self.handle = model.register_forward_hook(self)

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            batch = output.shape[0]
            output.register_hook(lambda grad: self._fix(grad, batch))

    def _fix(self, grad: torch.Tensor, batch: int) -> torch.Tensor:
        if self.loss_reduction == "mean":
            grad = grad * batch
        if self.clip is not None and batch > 0:
            norms = grad.flatten(1).norm(dim=1).view(-1, *([1] * (grad.dim() - 1)))
            grad = grad * (self.clip / norms.clamp_min(1e-12)).clamp(max=1.0)
        return grad
