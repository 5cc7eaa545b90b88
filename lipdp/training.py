"""A complete private training run (used by ``lipdp train``, ``make demo`` and the recipes)."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from lipdp import distributed
from lipdp.augment import Augmentation, Compose, RandomFlip, RandomShift
from lipdp.averaging import WeightAverage
from lipdp.engine import LipDPEngine
from lipdp.evaluation import accuracy
from lipdp.losses import LipschitzCrossEntropy

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything ``train_private`` needs besides the model and the data (defaults: the orthogonal CNN's)."""

    epsilon: float = 3.0
    delta: float = 1e-5
    epochs: int = 10
    batch_size: int = 1024
    learning_rate: float = 1e-2
    temperature: float = 8.0
    margin: float = 0.0  # logit margin m of the cross-entropy (lipdp.losses.LipschitzCrossEntropy)
    input_norm_bound: float = 1.0
    noise_strategy: str = "global"
    loss_grad_clip: float | None = None
    accountant: str = "prv"
    seed: int = 0
    max_physical_batch_size: int | None = None
    weight_averaging: float | None = None  # EMA decay of the released iterates (post-processing), e.g. 0.99
    optimizer: str = "adam"  # "adam", or "sgd" (momentum 0.9)
    views: int = 1  # K views per record (augmentation multiplicity): no privacy cost, K times the compute
    max_shift: int = 0  # views shifted by up to this many pixels (zero-filled), images only
    flip: bool = False  # views flipped left-right at random, images only
    mechanism: str = "bounds"  # or "clipping": DP-SGD's per-sample clipping on the same model (lipdp.clipping)
    max_grad_norm: float | None = None  # the clipping norm C of mechanism="clipping"


def view_augmentation(config: TrainConfig) -> Augmentation | None:
    """The per-sample augmentation of ``config``'s views: a random shift and/or flip (None: identical views)."""
    parts: list[Augmentation] = ([RandomShift(config.max_shift)] if config.max_shift else []) + (
        [RandomFlip()] if config.flip else [])
    return None if not parts else parts[0] if len(parts) == 1 else Compose(parts)


@dataclass
class TrainResult:
    """What a private run reports: held-out accuracy (None without a held-out set), (epsilon, delta) spent, sigma,
    steps, time, per-epoch log."""

    test_accuracy: float | None
    epsilon: float
    delta: float
    noise_multiplier: float
    steps: int
    seconds: float
    epoch_log: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The result as a JSON-able dict."""
        return asdict(self)


OPTIMIZERS = ("adam", "sgd")


def make_optimizer(name: str, parameters, learning_rate: float) -> torch.optim.Optimizer:
    """The user-side optimizer the engine wraps: Adam, or SGD with momentum 0.9 (Tramèr & Boneh's choice)."""
    if name == "adam":
        return torch.optim.Adam(parameters, lr=learning_rate)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=learning_rate, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def train_private(
    model: nn.Module, train_set: TensorDataset, test_set: TensorDataset | None, config: TrainConfig,
    progress: bool = True, engine: LipDPEngine | None = None,
) -> tuple[TrainResult, LipDPEngine]:
    """Train ``model`` with (config.epsilon, config.delta)-DP on ``train_set``; Adam (or SGD) + cosine schedule.

    ``test_set``: held-out data scored after every epoch (a non-private function of them); None scores nothing
    (``lipdp.tuning`` scores its trials itself, privately).

    ``engine``: a fresh engine that may already have released statistics of ``train_set`` (e.g.
    ``engine.private_mean``); the noise is calibrated so that they and the training fit (epsilon, delta).

    Under ``torchrun`` (WORLD_SIZE > 1) every rank runs this with the same arguments: it joins the process group
    (``lipdp.distributed.init_from_env``), each rank trains on its shard of every Poisson batch of expected
    size ``config.batch_size`` (global), and only rank 0 shows progress.
    """
    distributed.init_from_env()
    progress = progress and distributed.is_main_process()
    torch.manual_seed(config.seed)
    if engine is None:
        engine = LipDPEngine(accountant=config.accountant, seed=config.seed)
    criterion = LipschitzCrossEntropy(temperature=config.temperature, margin=config.margin)
    optimizer = make_optimizer(config.optimizer, model.parameters(), config.learning_rate)
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=DataLoader(train_set, batch_size=config.batch_size),
        criterion=criterion, target_epsilon=config.epsilon, target_delta=config.delta, epochs=config.epochs,
        input_norm_bound=config.input_norm_bound, noise_strategy=config.noise_strategy,
        loss_grad_clip=config.loss_grad_clip, max_epsilon=config.epsilon, views=config.views,
        augment=view_augmentation(config), mechanism=config.mechanism, max_grad_norm=config.max_grad_norm,
    )
    averaged = WeightAverage(model, config.weight_averaging) if config.weight_averaging else None
    total_steps = config.epochs * loader.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer.original_optimizer, T_max=total_steps)
    logger.info("noise multiplier %.4f for (%.3g, %.1g)-DP over %d steps", engine.noise_multiplier,
                config.epsilon, config.delta, total_steps)
    start = time.perf_counter()
    epoch_log = []
    for epoch in range(1, config.epochs + 1):
        if config.max_physical_batch_size:
            batches_cm = engine.virtual_batches(config.max_physical_batch_size)
        else:
            batches_cm = contextlib.nullcontext(loader)
        with batches_cm as batches:
            bar = tqdm(batches, total=loader.steps_per_epoch if not config.max_physical_batch_size else None,
                       desc=f"epoch {epoch}/{config.epochs}", disable=not progress, leave=False)
            for x, y in bar:
                optimizer.zero_grad()
                loss = criterion(model(x), y)
                loss.backward()
                stepping = not optimizer.skip_next_step
                optimizer.step()
                if stepping:
                    scheduler.step()
                    if averaged is not None:
                        averaged.update()
                    bar.set_postfix(loss=f"{loss.item():.3f}")
        steps, test_accuracy = engine.accountant.total_steps, None
        if test_set is not None:
            with averaged.applied() if averaged else contextlib.nullcontext(model) as evaluated:
                test_accuracy = accuracy(evaluated, test_set)
            logger.info("epoch %d: %d steps, test acc=%.4f", epoch, steps, test_accuracy)
            if progress:
                tqdm.write(f"epoch {epoch}: {steps} steps, held-out accuracy = {test_accuracy:.4f}")
        epoch_log.append({"epoch": epoch, "steps": steps, "test_accuracy": test_accuracy,
                          "seconds": time.perf_counter() - start})
    if averaged is not None:  # the released model is the average (post-processing of released iterates)
        averaged.copy_into()
    result = TrainResult(
        test_accuracy=epoch_log[-1]["test_accuracy"], epsilon=engine.get_epsilon(config.delta), delta=config.delta,
        noise_multiplier=engine.noise_multiplier, steps=engine.accountant.total_steps,
        seconds=time.perf_counter() - start, epoch_log=epoch_log,
    )
    return result, engine
