"""The Opacus DP-SGD baseline that lipdp is compared against (``recipes.compare``, ``benchmarks/``).

Model: the end-to-end CNN of Tramèr & Boneh (2021, "Differentially Private Learning Needs Better Features",
their MNIST/Fashion-MNIST architecture: conv 8x8/2 -> tanh -> maxpool 2/1 -> conv 4x4/2 -> tanh -> maxpool 2/1 ->
dense 32 -> tanh -> dense) with a GroupNorm after each convolution (per-sample, so DP-SGD-compatible), about
26k parameters, comparable to lipdp's default orthogonal CNN (about 24k). Inputs smaller than 16 pixels (the
8x8 digits) get 3x3 convolutions of stride 1 instead, so that the same factory covers every image set.

Training: Opacus ``PrivacyEngine.make_private`` with Poisson sampling (its default), per-sample clipping to
``max_grad_norm``, SGD with momentum (Tramèr & Boneh's Fashion-MNIST settings: batch 2048, lr 4, momentum 0.9,
C = 0.1). The noise multiplier is calibrated with lipdp's own accountant (``accounting.calibrate_noise``, PRV by
default) at Opacus's sample rate q = 1 / len(loader) and its number of steps, and the epsilon spent is
reported by the same accountant, so both methods are held to the same (epsilon, delta). Mechanisms released on the
same data before training (``spent``: e.g. the classify recipe's private mean and channel moments) are composed
with the steps, in the calibration and in the epsilon reported, as lipdp's engine does.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from accounting import HistoryEntry, PrivacyAccountant, calibrate_noise
from lipdp.evaluation import accuracy

logger = logging.getLogger(__name__)

#: Opacus per-sample gradient modes this baseline supports ("ghost" = ghost clipping, no per-sample gradients
#: stored for layers with a norm sampler; "hooks" = per-sample gradients from module hooks; "functorch" =
#: per-sample gradients from torch.func.vmap).
GRAD_SAMPLE_MODES = ("ghost", "hooks", "functorch")

#: (out_channels, kernel, stride, padding) of the two convolutions, by input size.
_CONV_SPECS = {
    "tramer-boneh": ((16, 8, 2, 3), (32, 4, 2, 0)),  # inputs >= 16 pixels (MNIST, Fashion-MNIST: 28x28)
    "small": ((16, 3, 1, 1), (32, 3, 1, 0)),  # smaller inputs (digits: 8x8)
}


def groupnorm_cnn(input_shape: Sequence[int], num_classes: int, groups: int = 4, hidden: int = 32) -> nn.Sequential:
    """Tramèr-Boneh's tanh CNN with ``GroupNorm(groups)`` after each convolution (see the module docstring)."""
    channels, height, width = input_shape
    specs = _CONV_SPECS["tramer-boneh" if min(height, width) >= 16 else "small"]
    layers: list[nn.Module] = []
    for out_channels, kernel, stride, padding in specs:
        layers += [nn.Conv2d(channels, out_channels, kernel, stride, padding), nn.GroupNorm(groups, out_channels),
                   nn.Tanh(), nn.MaxPool2d(2, 1)]
        channels = out_channels
        height = (height + 2 * padding - kernel) // stride + 1 - 1
        width = (width + 2 * padding - kernel) // stride + 1 - 1
    if min(height, width) < 1:
        raise ValueError(f"input shape {tuple(input_shape)} is too small for groupnorm_cnn")
    layers += [nn.Flatten(), nn.Linear(channels * height * width, hidden), nn.Tanh(), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


@dataclass
class OpacusConfig:
    """Settings of one Opacus DP-SGD run."""

    epsilon: float = 3.0
    delta: float = 1e-5
    epochs: int = 20
    batch_size: int = 2048
    learning_rate: float = 4.0
    momentum: float = 0.9
    max_grad_norm: float = 0.1
    grad_sample_mode: str = "ghost"
    accountant: str = "prv"
    seed: int = 0


@dataclass
class OpacusResult:
    """Outcome of :func:`train_opacus`; ``epsilon`` is from lipdp's accountant over the steps taken (and the
    mechanisms spent before them); ``steps`` is the accountant's count, those mechanisms included (as in
    ``lipdp.training.TrainResult``)."""

    test_accuracy: float
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    seconds: float
    epoch_log: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The fields as a plain dict (JSON-able)."""
        return asdict(self)


def make_private(
    model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, criterion: nn.Module,
    noise_multiplier: float, max_grad_norm: float, grad_sample_mode: str, seed: int,
) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module, DataLoader]:
    """Opacus ``make_private`` with the same return shape in every mode: (model, optimizer, criterion, loader).

    Ghost clipping returns a wrapped criterion whose ``backward()`` runs its two passes; the other modes keep
    ``criterion`` as it is.
    """
    from opacus import PrivacyEngine

    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}")
    engine = PrivacyEngine(accountant="prv")  # accounting is ours (see the module docstring); this one is unused
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        private = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, grad_sample_mode=grad_sample_mode,
            poisson_sampling=True, noise_generator=torch.Generator().manual_seed(seed + 1),
        )
    if grad_sample_mode == "ghost":
        return private
    model, optimizer, loader = private
    return model, optimizer, criterion, loader


def train_opacus(model: nn.Module, train_set: TensorDataset, test_set: TensorDataset, config: OpacusConfig,
                 progress: bool = True, spent: Sequence[HistoryEntry] = ()) -> OpacusResult:
    """Train ``model`` with Opacus DP-SGD at (config.epsilon, config.delta); returns accuracy and budget.

    ``spent``: mechanisms already released on ``train_set`` (an accountant history, e.g. the private statistics of
    ``recipes.classify.private_features``: ``engine.accountant.history``). The noise is calibrated so that they and
    the training steps together meet (epsilon, delta), and the reported epsilon includes them.
    """
    torch.manual_seed(config.seed)
    loader = DataLoader(train_set, batch_size=config.batch_size,
                        generator=torch.Generator().manual_seed(config.seed))
    sample_rate = 1 / len(loader)  # Opacus's Poisson rate for this loader
    total_steps = config.epochs * len(loader)
    sigma = calibrate_noise(config.epsilon, config.delta, sample_rate, steps=total_steps, backend=config.accountant,
                            spent=spent)
    logger.info("Opacus noise multiplier %.4f for (%.3g, %.1g)-DP over %d steps at q=%.4g", sigma, config.epsilon,
                config.delta, total_steps, sample_rate)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=config.momentum)
    model, optimizer, criterion, loader = make_private(
        model, optimizer, loader, nn.CrossEntropyLoss(), sigma, config.max_grad_norm, config.grad_sample_mode,
        config.seed)
    accountant = PrivacyAccountant(config.accountant, history=spent)
    start = time.perf_counter()
    epoch_log = []
    for epoch in range(1, config.epochs + 1):
        bar = tqdm(loader, desc=f"opacus epoch {epoch}/{config.epochs}", disable=not progress, leave=False)
        for x, y in bar:
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            with warnings.catch_warnings():  # Opacus's hooks fire on the first layer, whose input needs no grad
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
            optimizer.step()
            accountant.step(sigma, sample_rate)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        entry = {"epoch": epoch, "epsilon": accountant.epsilon(config.delta),
                 "test_accuracy": accuracy(model, test_set), "seconds": time.perf_counter() - start}
        epoch_log.append(entry)
        logger.info("opacus epoch %d: eps=%.3f test acc=%.4f", epoch, entry["epsilon"], entry["test_accuracy"])
    return OpacusResult(
        test_accuracy=epoch_log[-1]["test_accuracy"], epsilon=accountant.epsilon(config.delta), delta=config.delta,
        noise_multiplier=sigma, sample_rate=sample_rate, steps=accountant.total_steps,
        seconds=time.perf_counter() - start, epoch_log=epoch_log,
    )
