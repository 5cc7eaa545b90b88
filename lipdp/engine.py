"""``LipDPEngine``: private training with no per-sample gradients, shaped like Opacus' ``PrivacyEngine``.

    engine = LipDPEngine(accountant="prv")
    model, optimizer, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader,
        criterion=loss, noise_multiplier=1.2, input_norm_bound=1.0)
    ... ordinary training loop ...
    engine.get_epsilon(delta=1e-5)

The returned model is the same module with hooks (input checks, output-gradient fix, materialised weights),
the optimizer noises the summed gradient in ``step()`` (``mechanism.py``), and the loader draws Poisson
batches from the engine's own generator (docs/design.md §3). This class is a facade: argument checks live in
``checks.py``, statistics releases in ``statistics.py``, micro-batches in ``sampling.py``, checkpoint files in
``checkpoint.py`` and crash-safe resume in ``journal.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from accounting import BudgetReport, PrivacyAccountant, calibrate_noise
from accounting.validation import check_steps
from lipdp import distributed
from lipdp.bounds import BoundReport, check_model, lipschitz_constant, record_shapes
from lipdp.augment import Augmentation
from lipdp.checkpoint import load_state, save_state
from lipdp.checks import check_mechanism, check_private_arguments, reject_unknown_arguments, warn_if_unfittable
from lipdp.clipping import PerSampleClipping
from lipdp.hooks import InputGuard, OutputGradientHook, PassCounter
from lipdp.journal import StepJournal, count_journaled_steps, fresh_seed
from lipdp.mechanism import GradientMechanism, MechanismConfig, PrivacyBudgetExceeded
from lipdp.optimizer import DPOptimizer
from lipdp.reparametrization import MaterializedWeights
from lipdp.sampling import PoissonDataLoader, random_seed, virtual_batches
from lipdp.statistics import ChannelBlock, StatisticsReleases, private_channel_moments, private_mean

__all__ = ["LipDPEngine", "PrivacyBudgetExceeded"]

logger = logging.getLogger(__name__)

SAMPLING_SEED, NOISE_SEED, STATISTICS_SEED, VIEWS_SEED = 0, 1, 2, 3  # offsets of the generators' seeds from seed


def _device_of(module: nn.Module) -> torch.device:
    parameter = next((p for p in module.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


class LipDPEngine:
    """Makes a Lipschitz model, its optimizer and its data loader differentially private.

    ``secure_mode=True`` seeds the sampling and noise generator from the OS's entropy (``os.urandom``) and
    ignores ``seed``; otherwise ``seed`` (or a random one) makes runs reproducible. Note: torch's Gaussian
    sampler is not a cryptographically secure source; secure_mode protects the seed, as Opacus does without
    torchcsprng.
    """

    def __init__(self, accountant: str = "prv", secure_mode: bool = False, seed: int | None = None) -> None:
        self.accountant = PrivacyAccountant(backend=accountant)
        self.secure_mode = secure_mode
        self.seed = random_seed() if secure_mode or seed is None else int(seed)
        self.sampling_generator = torch.Generator().manual_seed(self.seed + SAMPLING_SEED)
        self.noise_generator = torch.Generator().manual_seed(self.seed + NOISE_SEED)  # moved to the model's device
        self.statistics = StatisticsReleases(self.accountant,
                                             torch.Generator().manual_seed(self.seed + STATISTICS_SEED))
        self.model: nn.Module | None = None
        self.optimizer: DPOptimizer | None = None
        self.data_loader: PoissonDataLoader | None = None
        self.mechanism: GradientMechanism | None = None
        self.journal: StepJournal | None = None
        self.passes = PassCounter()  # backward passes through the output since the last step (lipdp.hooks)
        self._hooks: list = []

    @property
    def statistics_generator(self) -> torch.Generator:
        """The generator of the statistics released before training (``private_mean``...)."""
        return self.statistics.generator

    # ---------------------------------------------------------------------------------- releases before training
    def private_mean(self, data: torch.Tensor, noise_multiplier: float, norm_bound: float) -> torch.Tensor:
        """The mean of ``data``'s rows, each clipped to ``norm_bound``, released by the Gaussian mechanism
        (``lipdp.statistics.private_mean``) and recorded in this engine's accountant as one step at sample rate 1:
        ``make_private_with_epsilon`` then leaves room for it and ``get_epsilon`` includes it. Call it before
        ``make_private``, on the whole training set (every rank the same, in multi-process runs)."""
        return self._release(noise_multiplier, lambda generator: private_mean(
            data, norm_bound, noise_multiplier, generator))

    def private_channel_moments(self, data: torch.Tensor, blocks: list[ChannelBlock], noise_multiplier: float,
                                norm_bound: float) -> list[torch.Tensor]:
        """Each block's channel second moments (sum over rows and positions of x_p x_p^T, rows clipped to
        ``norm_bound``), released by one Gaussian mechanism (``lipdp.statistics.private_channel_moments``) and
        accounted as ``private_mean`` is: one step at sample rate 1, before ``make_private``."""
        return self._release(noise_multiplier, lambda generator: private_channel_moments(
            data, blocks, norm_bound, noise_multiplier, generator))

    def _release(self, noise_multiplier: float, mechanism):
        if self.model is not None:
            raise RuntimeError("release statistics before make_private(...): the training budget is set there")
        released, self.seed = self.statistics.release(noise_multiplier, mechanism, self.seed, STATISTICS_SEED)
        return released

    # ------------------------------------------------------------------------------------------ make private
    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        criterion: nn.Module,
        noise_multiplier: float,
        input_norm_bound: float,
        input_shape: tuple[int, ...] | None = None,
        loss_reduction: str = "mean",
        noise_strategy: str = "global",
        loss_grad_clip: float | None = None,
        max_epsilon: float | None = None,
        target_delta: float | None = None,
        views: int = 1,
        augment: Augmentation | None = None,
        mechanism: str = "bounds",
        max_grad_norm: float | None = None,
        **opacus_arguments,
    ) -> tuple[nn.Module, DPOptimizer, PoissonDataLoader]:
        """Attach the private mechanism. Every argument is checked here, before any training step
        (``lipdp.checks``; Opacus-only arguments such as ``grad_sample_mode`` get an error naming lipdp's equivalent).

        ``views`` K > 1 (augmentation multiplicity, De et al. 2022): the loader yields K random views
        (``augment``, e.g. ``lipdp.augment.RandomShift(2)``) of every sampled record in one batch, and each record's
        gradient is the mean of its views', within the same bound: no privacy cost, K times the compute.

        ``mechanism='clipping'`` with ``max_grad_norm=C``: DP-SGD's per-sample clipping on this same model instead of
        the certified bounds (``lipdp.clipping``): each record's gradient clipped to C, noise sigma C, the same
        sampling and accounting; to compare the two on one model and budget.

        Multi-process (``lipdp.distributed``): call it on every rank with the same model, the full dataset and
        the *global* expected batch size; ``module`` may be plain or wrapped in DistributedDataParallel.
        """
        reject_unknown_arguments(opacus_arguments, "make_private")
        if self.model is not None:
            raise RuntimeError("this engine is already attached to a model; create one engine per training run")
        clip_norm = check_mechanism(mechanism, max_grad_norm, noise_strategy)
        checked = check_private_arguments(
            module=module, optimizer=optimizer, data_loader=data_loader, criterion=criterion,
            noise_multiplier=noise_multiplier, input_norm_bound=input_norm_bound, loss_reduction=loss_reduction,
            noise_strategy=noise_strategy, loss_grad_clip=loss_grad_clip, max_epsilon=max_epsilon,
            target_delta=target_delta)
        wrapper, (module, ddp) = module, distributed.unwrap(module)
        check_model(module)
        if distributed.is_distributed():  # one mechanism over all ranks: shared generators, equal replicas
            self.seed = distributed.broadcast_seed(self.seed)
            self.sampling_generator.manual_seed(self.seed + SAMPLING_SEED)
            distributed.broadcast_module(module)
            if ddp is not None:
                distributed.disable_gradient_sync(ddp)
        # Noise is drawn where the gradients live: a CPU generator cannot draw CUDA noise.
        self.noise_generator = torch.Generator(device=_device_of(module)).manual_seed(self.seed + NOISE_SEED)
        poisson_loader = PoissonDataLoader(
            data_loader.dataset, data_loader.batch_size, self.sampling_generator,
            num_workers=data_loader.num_workers, pin_memory=data_loader.pin_memory,
            rank=distributed.rank(), world_size=distributed.world_size(), views=views, augment=augment,
            view_generator=torch.Generator().manual_seed(self.seed + VIEWS_SEED),
        )
        input_shape = tuple(input_shape if input_shape is not None else poisson_loader.dataset[0][0].shape)
        model_params = {id(p) for p in module.parameters() if p.requires_grad}
        if not {id(p) for group in optimizer.param_groups for p in group["params"]} <= {
                id(p) for p in module.parameters()}:
            raise ValueError("the optimizer holds parameters that are not the model's")
        if not model_params:
            raise ValueError("the model has no trainable parameters")

        materialized = MaterializedWeights(module)
        try:
            shapes = record_shapes(module, input_shape)
            config = MechanismConfig(
                noise_multiplier=checked["noise_multiplier"], sample_rate=poisson_loader.sample_rate,
                expected_batch_size=poisson_loader.expected_batch_size,
                input_norm_bound=checked["input_norm_bound"], loss_lipschitz=checked["loss_lipschitz"],
                input_shape=input_shape, noise_strategy=noise_strategy, max_epsilon=checked["max_epsilon"],
                target_delta=checked["target_delta"])
            self.mechanism = GradientMechanism(
                module, config, self.accountant, self.noise_generator, shapes, materialized,
                reduce_gradients=distributed.gradient_reducer(ddp) if distributed.is_distributed() else None)
            self.mechanism.analysis()  # fail now, not at the first step, if anything cannot be bounded
            output_shape = (shapes.get(module) or (None, ()))[1]
            warn_if_unfittable(criterion, module, lipschitz_constant(module, input_shape), config.input_norm_bound,
                               output_shape[-1] if output_shape else None)
            # The output hook clips each sample's logit gradient at the constant the bounds use, min(L, clip): a
            # no-op for the declared criterion, and what keeps the bound true if the loss back-propagated is another.
            self._hooks.append(InputGuard(module, input_shape, config.input_norm_bound).handle)
            self._hooks.append(OutputGradientHook(module, loss_reduction, config.loss_lipschitz, self.passes,
                                                  views=views).handle)
            if clip_norm is not None:  # registered after the output fix: it sees the fixed output gradient
                clipping = PerSampleClipping(module, materialized, self.mechanism.plan.plain_parameters(),
                                             clip_norm, views=views)
                self._hooks.extend(clipping.handles)
                self.mechanism.clipping = clipping
        except BaseException:  # leave the user's model as it was
            materialized.detach_from()
            for handle in self._hooks:
                handle.remove()
            self._hooks, self.mechanism = [], None
            raise
        self.model, self.data_loader = module, poisson_loader
        self.optimizer = DPOptimizer(optimizer, self.mechanism, self.passes)
        return wrapper, self.optimizer, poisson_loader

    def make_private_with_epsilon(
        self, *, target_epsilon: float, target_delta: float, epochs: int, **kwargs
    ) -> tuple[nn.Module, DPOptimizer, PoissonDataLoader]:
        """As ``make_private``, with the smallest noise multiplier that spends at most ``target_epsilon``
        after ``epochs`` epochs (calibrated with this engine's accountant backend), statistics released
        before (``private_mean``) included."""
        if "noise_multiplier" in kwargs:
            raise ValueError("make_private_with_epsilon calibrates noise_multiplier itself; do not pass it")
        loader = kwargs["data_loader"]
        if loader.batch_size is None:
            raise ValueError("data_loader needs a batch_size (the expected Poisson batch size)")
        num_samples = len(loader.dataset)
        if num_samples == 0:
            raise ValueError("the dataset is empty: there is nothing to train on")
        epochs = check_steps(epochs, "epochs", minimum=1)
        sample_rate = loader.batch_size / num_samples
        steps = epochs * max(1, round(num_samples / loader.batch_size))
        sigma = calibrate_noise(target_epsilon, target_delta, sample_rate, steps=steps,
                                backend=self.accountant.backend, spent=self.accountant.history)
        kwargs.setdefault("target_delta", target_delta)
        return self.make_private(noise_multiplier=sigma, **kwargs)

    # ------------------------------------------------------------------------------------------------ reading
    def _require_attached(self) -> GradientMechanism:
        if self.mechanism is None:
            raise RuntimeError("call make_private(...) first")
        return self.mechanism

    @property
    def noise_multiplier(self) -> float:
        """The noise multiplier sigma every step is accounted with."""
        return self._require_attached().config.noise_multiplier

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (the accountant's conservative estimate)."""
        return self.accountant.epsilon(delta)

    def sensitivities(self) -> dict[str, float]:
        """Per-parameter Delta used at the last step (materialised-weight names for reparametrised layers)."""
        return dict(self._require_attached().last_sensitivities)

    def noise_stds(self) -> dict[str, float]:
        """Std of the noise added to each parameter's summed gradient at the last step (same keys)."""
        return dict(self._require_attached().last_stds)

    def current_bounds(self) -> BoundReport:
        """The bound analysis (``BoundReport``) of the current weights, without taking a step."""
        return self._require_attached().analysis()

    def lipschitz_constant(self) -> float:
        """Certified Lipschitz constant of the model with its current weights."""
        mechanism = self._require_attached()
        return lipschitz_constant(self.model, mechanism.config.input_shape)

    def report(self, delta: float | None = None, target_epsilon: float | None = None) -> BudgetReport:
        """Budget report (text, JSON, plot) of the steps taken so far."""
        mechanism = self._require_attached()
        delta = delta if delta is not None else mechanism.config.target_delta
        if delta is None:
            raise ValueError("report() needs a delta (or make_private(..., target_delta=...))")
        target = target_epsilon if target_epsilon is not None else mechanism.config.max_epsilon
        return BudgetReport(self.accountant, delta, self.data_loader.steps_per_epoch, target_epsilon=target)

    def virtual_batches(self, max_physical_batch_size: int) -> contextlib.AbstractContextManager[Iterator]:
        """Split each Poisson (logical) batch into micro-batches of at most ``max_physical_batch_size``;
        gradients accumulate and the optimizer takes ONE noisy step per logical batch (``sampling.virtual_batches``).

            with engine.virtual_batches(256) as batches:
                for x, y in batches:
                    optimizer.zero_grad(); criterion(model(x), y).backward(); optimizer.step()
        """
        self._require_attached()
        return virtual_batches(self.data_loader, self.optimizer, max_physical_batch_size, self.passes)

    # ------------------------------------------------------------------------------------ checkpoints, resume
    def state_dict(self) -> dict:
        """Everything a resumed run needs, as plain data: model, optimizer, accountant history, generator states,
        seed, and the (sigma, q, strategy) the checkpoint was trained with."""
        mechanism = self._require_attached()
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "accountant": self.accountant.state_dict(),
            "sampling_generator": self.sampling_generator.get_state(),
            "noise_generator": self.noise_generator.get_state(),
            "seed": self.seed,
            "noise_multiplier": mechanism.config.noise_multiplier,
            "sample_rate": mechanism.config.sample_rate,
            "noise_strategy": mechanism.config.noise_strategy,
        }

    def save_checkpoint(self, path: str | os.PathLike, **extra) -> Path:
        """Write model, optimizer, accountant history and generator states atomically (``lipdp.checkpoint``):
        the file at ``path`` is always a whole checkpoint, old or new. ``extra`` (plain values, e.g. epoch=3) is
        stored alongside and returned by ``load_checkpoint``. An attached journal is then compacted to the steps
        after this checkpoint. Multi-process: call it on every rank; rank 0 writes, the others wait for it."""
        path = Path(path)
        if not distributed.is_main_process():
            distributed.barrier()
            return path
        state = self.state_dict()
        save_state(path, {**state, "extra": extra})
        if self.journal is not None:
            self.journal.compact(self.accountant.total_steps)
        distributed.barrier()
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> dict:
        """Restore a checkpoint into this (already ``make_private``-d) engine; returns the saved ``extra``.
        The file is read with torch's restricted unpickler (a tampered file raises ``CheckpointError``, no code
        runs) and checked against this engine before any state is replaced."""
        mechanism = self._require_attached()
        state = load_state(path)
        if (state["noise_multiplier"], state["sample_rate"]) != (mechanism.config.noise_multiplier,
                                                                   mechanism.config.sample_rate):
            raise ValueError(
                f"checkpoint was trained with noise_multiplier={state['noise_multiplier']}, sample_rate="
                f"{state['sample_rate']}; this engine has {mechanism.config.noise_multiplier}, "
                f"{mechanism.config.sample_rate}. Fix: make the engine private with the same settings to resume."
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.accountant.load_state_dict(state["accountant"])
        self.sampling_generator.set_state(state["sampling_generator"])
        self.noise_generator.set_state(state["noise_generator"])
        self.seed = state["seed"]
        mechanism.materialized.invalidate()
        if self.journal is not None:
            self._count_journaled_steps()
        return state.get("extra", {})

    def attach_journal(self, path: str | os.PathLike, fsync: bool = True) -> int:
        """Record every future step in the write-ahead journal at ``path`` (``lipdp.journal``), and count the
        steps it holds beyond this engine's accountant. Returns the number of steps so counted.

        Crash-safe resume (steps after the last checkpoint are *counted*, never replayed):

            engine.make_private(...)
            if ckpt.exists():
                engine.load_checkpoint(ckpt)
            engine.attach_journal(lipdp.journal.journal_path(ckpt))  # counts steps lost after ckpt, re-seeds

        (Attached first, the journal is re-read by ``load_checkpoint``, with the same result.)

        Multi-process: call it on every rank with the same (shared) path; only rank 0 writes.
        """
        mechanism = self._require_attached()
        if self.journal is not None:
            raise RuntimeError("a journal is already attached to this engine")
        writer = distributed.is_main_process()
        self.journal = StepJournal(path, fsync=fsync, writable=writer)
        mechanism.journal = self.journal if writer else None
        return self._count_journaled_steps()

    def _count_journaled_steps(self) -> int:
        """Add the journaled steps the accountant has not counted; if any, draw fresh randomness (re-seed sampling
        and noise, so no batch or noise draw of a lost step is re-used)."""
        missing = count_journaled_steps(self.journal, self.accountant)
        if missing:
            self.seed = distributed.broadcast_seed(
                fresh_seed(self.seed, self.accountant.total_steps, self.secure_mode))
            self.sampling_generator.manual_seed(self.seed + SAMPLING_SEED)
            self.noise_generator.manual_seed(self.seed + NOISE_SEED)
        return len(missing)
