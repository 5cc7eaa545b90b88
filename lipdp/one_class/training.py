"""OCSDF training loop (Bethune et al. 2023, Algorithm 1), private or not.

Each step: draw negatives Q from the current model (``NegativeSampler``: public, model-only), then one
optimiser step on

    loss = scale * ( (1/B) * sum_{x in batch} l_P(f(x))  +  mean_{z in Q} l_Q(f(z)) ),

with B the *expected* batch size of normal samples (docs/design.md §1: never the actual one). ``scale`` undoes the
optimiser's own normalisation so that both terms keep their weights:

* plain training: ``gradient_divisor=1`` (the optimiser steps on this gradient as is);
* ``LipDPEngine`` with ``loss_reduction="sum"``: the private optimiser adds noise to the *sum* of per-sample
  gradients and divides by B, so ``gradient_divisor=B``: the normal term is then the plain sum (its per-sample
  gradients are what the sensitivity bounds) and the negatives' term is multiplied by B before the division,
  i.e. it enters as a mean. It depends on no private record (only on the public parameters and the sampler's
  own randomness), so adding it shifts the Gaussian mechanism's output by a public quantity: no sensitivity.
  Use ``loss_reduction="sum"`` and no ``loss_grad_clip``: the engine's output-gradient hook then leaves every
  output gradient as it is, which the negatives' Newton steps (gradients of f in its input) rely on.

Optional weight averaging (an exponential moving average of the parameters, Polyak & Juditsky 1992) is
post-processing of the released iterates, so it is free in privacy; it damps the DP noise in the final model.
For orthogonium layers the raw parameters are averaged and the weight is re-orthogonalised from them, so the
averaged model is as Lipschitz as any iterate (its certified constant is recomputed from its own weights).
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from lipdp.averaging import WeightAverage
from lipdp.hooks import public_data
from lipdp.one_class.generator import NegativeSampler
from lipdp.one_class.loss import OneClassHKR

__all__ = ["ocsdf_step_loss", "train_ocsdf"]

log = logging.getLogger(__name__)


def ocsdf_step_loss(
    model: nn.Module,
    x: torch.Tensor,
    negatives: torch.Tensor,
    criterion: OneClassHKR,
    expected_batch_size: float,
    gradient_divisor: float = 1.0,
) -> torch.Tensor:
    """The loss of one OCSDF step (module doc): normal term summed over the private batch, negatives averaged."""
    if not expected_batch_size > 0:
        raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
    if criterion.reduction != "sum":
        raise ValueError(
            f"criterion.reduction must be 'sum' (normalised here by the expected batch size), got "
            f"{criterion.reduction!r}"
        )
    positive = criterion(model(x)) if len(x) else torch.zeros(())
    with public_data():  # the negatives are a function of the prior and the current model: public
        negative = criterion.negative_loss(model(negatives), reduction="mean")
    return gradient_divisor * (positive / expected_batch_size + negative)


def train_ocsdf(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    criterion: OneClassHKR,
    sampler: NegativeSampler,
    epochs: int,
    expected_batch_size: float,
    negatives_per_step: int | None = None,
    warm_start_steps: int = 0,
    gradient_divisor: float = 1.0,
    ema: WeightAverage | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> None:
    """Train ``model`` in place by OCSDF (and update ``ema`` after every step if given).

    ``loader`` yields ``(x, y)`` batches of normal samples only (a lipdp Poisson loader when private; ``y`` is
    ignored). Negatives: ``negatives_per_step`` (default: the expected batch size) per step, drawn from the
    current ``model`` with ``steps=0`` (the prior alone) during the first ``warm_start_steps`` steps.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    n_negatives = int(round(expected_batch_size)) if negatives_per_step is None else int(negatives_per_step)
    if n_negatives <= 0:
        raise ValueError(f"negatives_per_step must be > 0, got {n_negatives}")
    step = 0
    model.train()
    bar = tqdm(range(epochs), desc="OCSDF", disable=not progress, leave=False)
    for epoch in bar:
        total, batches = 0.0, 0
        for x, _ in loader:
            steps = 0 if step < warm_start_steps else None
            optimizer.zero_grad(set_to_none=True)
            with parametrize.cached():  # reparametrised weights (Björck, ...) computed once per step
                negatives = sampler.sample(model, n_negatives, generator, steps=steps)
                loss = ocsdf_step_loss(model, x, negatives, criterion, expected_batch_size, gradient_divisor)
                loss.backward()
            optimizer.step()
            if ema is not None:
                ema.update()
            total += loss.item() / gradient_divisor
            batches += 1
            step += 1
        bar.set_postfix(loss=f"{total / max(batches, 1):.4f}")
        log.debug("epoch %d: mean loss %.4f over %d steps", epoch, total / max(batches, 1), batches)
