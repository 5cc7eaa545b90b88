"""Hooks at the model's boundary: input checks on the way in, per-sample output-gradient fixes on the way out.

* ``InputGuard`` (forward pre-hook): refuses NaN/inf inputs, inputs of the wrong per-sample shape, and
  samples whose L2 norm exceeds the declared bound X_0 (unless the model's first layer enforces it).
* ``OutputGradientHook`` (forward hook -> tensor hook on the output, O(batch x classes)): with a "mean"
  loss, multiplies the gradient at the output by the batch size, turning (1/n) sum_i into sum_i so that no
  data-dependent division reaches the parameters; then, with ``loss_grad_clip=C``, clips each sample's
  gradient at the output to norm C (Bethune et al. 2023), which makes G_D = min(C, L) hold for any loss.
  It also counts the backward passes through the output (``PassCounter``), and with K views per record it
  divides each row's (clipped) gradient by K: a record's gradient is then (1/K) sum_k g_k, of norm <= max_k
  ||g_k|| <= the same bound (triangle inequality), so K views cost no privacy (De et al. 2022).

**One pass per sample per step** (docs/design.md §3). The bound Delta holds for a sample whose gradient reaches the
parameters once. A batch forwarded twice into one loss (a second loss term, a repeated forward) or a loss
back-propagated twice (``retain_graph=True``) sums two bounded gradients, up to 2 Delta. So every backward pass
through the output of a training forward is counted, and a step that saw more than it accounts for (one per step,
one per micro-batch of ``virtual_batches``) is refused before anything is released (``RepeatedPassError``).
Forwards of *public* data (a function of public values and the current model only, e.g. one-class negatives drawn
from a prior) are declared with ``public_data()``: their gradients are still clipped, but not counted.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterator

import torch
from torch import nn

from lipdp.layers import InputNormClip, SampleCentring

NORM_TOLERANCE = 1e-5


#: Parameter-free maps that may precede the input clip: the clip still bounds every input of a trainable layer.
_BEFORE_CLIP = (nn.Flatten, nn.Unflatten, nn.Identity, SampleCentring)


def _leading_input_clip(model: nn.Module) -> InputNormClip | None:
    """The ``InputNormClip`` every input passes first (after reshapes and per-sample centring only), if the model
    starts with one."""
    module = model
    while isinstance(module, nn.Sequential):
        children = [child for child in module if not isinstance(child, _BEFORE_CLIP)]
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
        if x.shape[0] == 0:
            return
        # One reduction and one host transfer for both checks: the largest sample norm is NaN or inf iff a sample
        # holds a NaN or an inf (or overflows its norm, which the exact check below tells apart).
        largest = x.detach().flatten(1).norm(dim=1).max().item()
        if not math.isfinite(largest) and not torch.isfinite(x).all():
            raise ValueError("input contains NaN or inf values. Fix: clean or impute the data before training.")
        if not self.model_clips_inputs:
            if not largest <= self.input_norm_bound * (1 + NORM_TOLERANCE):
                raise ValueError(
                    f"a sample has L2 norm {largest:.4g} > input_norm_bound={self.input_norm_bound}: the privacy "
                    "bound would not hold. Fix: start the model with lipdp.layers.InputNormClip("
                    f"{self.input_norm_bound}) or rescale each sample to norm <= {self.input_norm_bound}."
                )


class RepeatedPassError(ValueError):
    """A step whose gradients passed through the model's output more often than it accounts for: nothing released."""


_public = threading.local()


@contextlib.contextmanager
def public_data() -> Iterator[None]:
    """Forwards inside this block are of public data (a function of public values and the current model only):
    their backward passes are not counted against the one-pass rule. Never wrap private records in it."""
    _public.depth = getattr(_public, "depth", 0) + 1
    try:
        yield
    finally:
        _public.depth -= 1


def in_public_block() -> bool:
    """Whether the current forward is inside a ``public_data()`` block."""
    return getattr(_public, "depth", 0) > 0


class PassCounter:
    """Backward passes through the output of private training forwards since the last step, against the passes
    the step accounts for: one, plus one for each further micro-batch of the same logical batch (``allow``)."""

    def __init__(self) -> None:
        self.passes, self.allowed = 0, 1

    def record(self) -> None:
        """One backward pass went through the output of a private forward."""
        self.passes += 1

    def allow(self, extra: int = 1) -> None:
        """Account for ``extra`` more passes in this step (more micro-batches of disjoint samples)."""
        self.allowed += extra

    def reset(self) -> None:
        """A new step starts (after a step, or ``zero_grad``)."""
        self.passes, self.allowed = 0, 1

    def check(self) -> None:
        """Refuse the step if its gradients went through the output more often than accounted for."""
        if self.passes > self.allowed:
            raise RepeatedPassError(
                f"this step's gradient went through the model's output {self.passes} times but the step accounts "
                f"for {self.allowed}: a sample that reaches the loss twice (a batch forwarded twice into one loss, "
                "or backward(retain_graph=True) called twice) has up to twice the certified sensitivity. Nothing "
                "was released. Fix: forward each batch once and call backward once per step (zero_grad first), "
                "split large batches with engine.virtual_batches(...), and wrap forwards of public data (e.g. "
                "generated negatives) in lipdp.hooks.public_data()"
            )


class OutputGradientHook:
    """Forward hook that fixes each sample's loss gradient at the model output and counts the backward passes
    through it (see module docstring)."""

    def __init__(self, model: nn.Module, loss_reduction: str, clip: float | None,
                 passes: PassCounter | None = None, views: int = 1) -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if clip is not None and not clip > 0:
            raise ValueError(f"loss_grad_clip must be > 0 (or None), got {clip}")
        self.loss_reduction = loss_reduction
        self.clip = clip
        self.passes = passes if passes is not None else PassCounter()
        self.views = views
        self.handle = model.register_forward_hook(self)

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """Register the gradient fix (and, for private data, the pass count) on a training forward's output."""
        if isinstance(output, torch.Tensor) and output.requires_grad:
            batch, counted = output.shape[0], not in_public_block()
            if counted and batch % self.views:
                raise ValueError(
                    f"a training batch of {batch} rows is not {self.views} views of each record: the engine averages "
                    f"the gradients of {self.views} views per record. Fix: iterate the loader make_private returned "
                    "(it makes the views), or make the model private with views=1")
            output.register_hook(lambda grad: self._fix(grad, batch, counted))

    def _fix(self, grad: torch.Tensor, batch: int, counted: bool) -> torch.Tensor:
        if counted:
            self.passes.record()
        if self.loss_reduction == "mean":
            grad = grad * batch
        if self.clip is not None and batch > 0:
            norms = grad.flatten(1).norm(dim=1).view(-1, *([1] * (grad.dim() - 1)))
            grad = grad * (self.clip / norms.clamp_min(1e-12)).clamp(max=1.0)
        if counted and self.views > 1:  # a record's gradient: the mean of its K views' (each within the bound)
            grad = grad / self.views
        return grad
