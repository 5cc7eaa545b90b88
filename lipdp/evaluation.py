"""The one batched evaluation loop: a model's outputs on a tensor of inputs, in evaluation mode, without gradients.

Used for accuracy, certificates, one-class scores and conformal logits alike. Each submodule's train/eval flag is
restored afterwards as it was (``model.train(flag)`` would reset all of them to the root's flag).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import TensorDataset


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; every submodule's own flag restored after."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags.items():
            module.training = flag


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """``model(inputs)`` computed ``batch_size`` rows at a time, in eval mode, without gradients; reparametrised
    weights (torch parametrizations) are materialised once for all batches."""
    if not batch_size >= 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    with evaluation_mode(model), parametrize.cached():
        return torch.cat([model(inputs[start:start + batch_size]) for start in range(0, len(inputs), batch_size)])


def correct_predictions(model: nn.Module, dataset: TensorDataset, batch_size: int = 2048) -> int:
    """How many of the (inputs, labels) ``dataset``'s samples ``model`` classifies right (top-1)."""
    inputs, labels = dataset.tensors[:2]
    return int((predict(model, inputs, batch_size).argmax(dim=1) == labels).sum())


def accuracy(model: nn.Module, dataset: TensorDataset, batch_size: int = 2048) -> float:
    """Top-1 accuracy of ``model`` on the (inputs, labels) ``dataset``."""
    return correct_predictions(model, dataset, batch_size) / len(dataset)
